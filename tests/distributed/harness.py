"""The multi-process test harness (tests/local_world.py, shared with bench/)."""

from tests.local_world import DIED, WorldError, run_world

__all__ = ["DIED", "WorldError", "run_world"]
