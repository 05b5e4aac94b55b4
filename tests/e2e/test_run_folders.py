"""A run never destroys another run's work (train/run_folders.py), proven with real launcher processes: a second
run on the folders of one that is still training is refused; a fresh run into a checkpoint.dir that holds an
earlier run's checkpoints is refused, and those checkpoints stay as they were; an earlier run's metrics are
kept aside, not overwritten."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

from tests.conftest import REPO

BASE = ["logging.tensorboard=false", "train.eval_iters=0", "logging.memory_report=false", "logging.log_interval=1"]


def launcher(tmp_path, *overrides) -> list[str]:
    return [sys.executable, str(REPO / "launcher/pretrain.py"), "--config", str(REPO / "configs/tiny-cpu.yaml"),
            *BASE, *overrides]  # fmt: skip


ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def run(cmd):
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)


def fingerprint(folder):
    """Every file under folder with its sha256."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".megagpt.lock"
    }


def test_a_second_run_on_the_folders_of_a_running_one_is_refused(tmp_path):
    folders = [f"logging.dir={tmp_path / 'run'}", f"checkpoint.dir={tmp_path / 'ck'}", "checkpoint.save_interval=2"]
    first = subprocess.Popen(
        launcher(tmp_path, "train.iters=400", *folders), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=ENV,
    )  # fmt: skip
    try:
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
            time.sleep(0.05)
        second = run(launcher(tmp_path, "train.iters=4", *folders, "checkpoint.load=auto"))
        assert second.returncode == 2, second.stderr[-2000:]
        assert "Traceback" not in second.stderr
        assert f"is in use by pid {first.pid} on host " in second.stderr, second.stderr
        # Another logging.dir does not help: the checkpoint folder is held too.
        elsewhere = run(launcher(tmp_path, "train.iters=4", f"logging.dir={tmp_path / 'other'}", *folders[1:]))
        assert elsewhere.returncode == 2 and f"checkpoint.dir={tmp_path / 'ck'} is in use by pid" in elsewhere.stderr
        assert first.poll() is None, "the first run must go on"
    finally:
        first.send_signal(signal.SIGTERM)
        out, _ = first.communicate(timeout=120)
    assert first.returncode == 0, out[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))  # one run's history, nobody else's
    # Once it has ended, the folders are free again: resuming there works.
    stopped_at = rows[-1]["step"]
    again = run(launcher(tmp_path, f"train.iters={stopped_at + 1}", *folders, "checkpoint.load=auto"))
    assert again.returncode == 0, again.stderr[-2000:]


def test_a_fresh_run_into_a_used_checkpoint_folder_is_refused_and_loses_nothing(tmp_path):
    ck = tmp_path / "ck"
    earlier = run(launcher(tmp_path, "train.iters=6", f"logging.dir={tmp_path / 'a'}", f"checkpoint.dir={ck}",
                           "checkpoint.save_interval=2", "checkpoint.keep=5"))  # fmt: skip
    assert earlier.returncode == 0, earlier.stderr[-2000:]
    before = fingerprint(ck)
    assert {name.split("/")[0] for name in before} == {"latest", "step_00000002", "step_00000004", "step_00000006"}
    for load in ([], [f"checkpoint.load={tmp_path / 'elsewhere'}"]):
        fresh = run(launcher(tmp_path, "train.iters=6", f"logging.dir={tmp_path / 'b'}", f"checkpoint.dir={ck}",
                             "checkpoint.save_interval=2", *load))  # fmt: skip
        assert fresh.returncode == 2, fresh.stderr[-2000:]
        assert "Traceback" not in fresh.stderr
        expected = f"checkpoint.dir={ck} already holds 3 checkpoint(s) of an earlier run (newest step_00000006)"
        assert expected in fresh.stderr, fresh.stderr
        assert fingerprint(ck) == before
        assert not (tmp_path / "b").exists()
    resumed = run(launcher(tmp_path, "train.iters=8", f"logging.dir={tmp_path / 'a'}", f"checkpoint.dir={ck}",
                           "checkpoint.save_interval=2", "checkpoint.keep=5", "checkpoint.load=auto"))  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))  # the resumed run continued the earlier run's file


def test_a_fresh_run_keeps_an_earlier_runs_metrics_aside(tmp_path):
    run_dir = tmp_path / "run"
    for iters in (3, 2):
        result = run(launcher(tmp_path, f"train.iters={iters}", f"logging.dir={run_dir}"))
        assert result.returncode == 0, result.stderr[-2000:]
    kept = sorted(p.name for p in run_dir.glob("metrics.*.jsonl"))
    assert len(kept) == 1 and len(list(run_dir.glob("config.*.yaml"))) == 1
    assert len((run_dir / kept[0]).read_text().splitlines()) == 3
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2


def test_folders_that_cannot_be_written_are_found_before_training(tmp_path):
    """checkpoint.dir an existing file: refused at the start, not at the first save after hours of training."""
    occupied = tmp_path / "ck"
    occupied.write_text("not a folder")
    result = run(launcher(tmp_path, "train.iters=3", f"logging.dir={tmp_path / 'run'}", f"checkpoint.dir={occupied}"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"checkpoint.dir={occupied} is a file, not a folder" in result.stderr
    assert not (tmp_path / "run").exists()  # nothing left behind
