"""The multi-process test harness lives in the library (megagpt/parallel/local_world.py), shared with bench/."""

from megagpt.parallel.local_world import DIED, WorldError, run_world

__all__ = ["DIED", "WorldError", "run_world"]
