"""Shared test helpers: tiny configs, the demo corpus (fetched once, shared with `make demo`)."""

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


def tiny_config(*overrides: str, **sections):
    """The tiny-cpu preset plus overrides; logs and metrics go wherever logging.dir says."""
    raw = {"preset": "tiny-cpu", **sections}
    return config_from_dict(raw, list(overrides))


@pytest.fixture(scope="session")
def shakespeare_prefix() -> str:
    """The demo corpus, prepared once into data/shakespeare (what `make demo` uses too)."""
    from megagpt.data.demo_corpus import prepare_demo_corpus

    return str(prepare_demo_corpus(REPO / "data" / "shakespeare"))
