"""Shared test helpers: tiny configs, the demo corpus (fetched once, shared with `make demo`), and the markers.

Every test gets a marker from its folder (pyproject registers them): tests/unit -> `unit`; tests/distributed,
tests/e2e and tests/slurm, which start processes, -> `distributed`; tests/gpu -> `gpu`. The tests listed in SLOW
also get `slow`. So `pytest -m unit` is the quick loop and `pytest -m "not slow"` skips the long runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from megagpt.config import config_from_dict

REPO = Path(__file__).resolve().parents[1]

# Tests build tiny random transformers models; nothing may be downloaded (the tools' subprocesses inherit this).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch.set_num_threads(2)


MARK_BY_FOLDER = {
    "unit": "unit",
    "distributed": "distributed",
    "e2e": "distributed",
    "slurm": "distributed",
    "gpu": "gpu",
}

# Tests that take a minute or more on a 2-core machine (measured with --durations), by file or file::test name.
SLOW = (
    "tests/e2e/test_launchers.py::test_a_finished_run_exits_0_every_time",  # 15 torchrun runs
    "tests/slurm/",  # starts a Slurm cluster, runs jobs through sbatch, requeues one
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = Path(str(item.path)).resolve().relative_to(REPO).as_posix()
        parts = path.split("/")
        if len(parts) > 2 and parts[0] == "tests" and parts[1] in MARK_BY_FOLDER:
            item.add_marker(MARK_BY_FOLDER[parts[1]])
        node = f"{path}::{item.originalname}"
        if any(node == slow or (slow.endswith("/") and path.startswith(slow)) for slow in SLOW):
            item.add_marker("slow")


def tiny_config(*overrides: str, **sections):
    """The tiny-cpu preset plus overrides; logs and metrics go wherever logging.dir says."""
    raw = {"preset": "tiny-cpu", **sections}
    return config_from_dict(raw, list(overrides))


@pytest.fixture(scope="session")
def shakespeare_prefix() -> str:
    """The demo corpus, prepared once into data/shakespeare (what `make demo` uses too)."""
    from megagpt.data.demo_corpus import prepare_demo_corpus

    return str(prepare_demo_corpus(REPO / "data" / "shakespeare"))
