"""bench/train_throughput.py runs end to end at a toy size: its three contenders step and it prints their ratio.

A script's own folder comes first on sys.path, so a bench script named like a package that a library imports
hides that package (bench/kernels.py once broke transformers' import of `kernels`)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.conftest import REPO


def test_train_throughput_runs_and_prints_the_ratios():
    cmd = [sys.executable, str(REPO / "bench/train_throughput.py"), "--layers", "1", "--hidden", "64"]
    cmd += ["--heads", "2", "--seq", "32", "--batch", "1", "--steps", "1", "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("megagpt", "transformers", "transformers+fused"):
        assert re.search(rf"^{re.escape(name)} +[\d.]+ ms/step +\d+ tokens/s$", result.stdout, re.M), result.stdout
    assert re.search(r"^megagpt / transformers\+fused tokens/s: [\d.]+x$", result.stdout, re.M), result.stdout
