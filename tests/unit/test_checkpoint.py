"""Checkpoints in one process (megagpt/checkpoint/, train/run_control.py): exact resume, what a damaged or mismatched
checkpoint says, keeping the newest K, unsafe files, stopping on SIGTERM or a time limit and resuming exactly."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from megagpt.checkpoint.format import CheckpointError, sha256_of
from megagpt.checkpoint.reader import SavedCheckpoint
from megagpt.config import validate
from megagpt.errors import ConfigError
from megagpt.parallel.context import ParallelContext
from megagpt.train.run import pretrain
from tests.conftest import REPO, tiny_config

BASE = ["train.iters=6", "logging.log_interval=1", "logging.tensorboard=false", "train.eval_iters=0"]


def run(tmp_path, name, *overrides):
    cfg = tiny_config(*BASE, f"logging.dir={tmp_path / name}", *overrides)
    return pretrain(cfg, ParallelContext.single_process())


def listing(folder):
    """What a checkpoint folder holds, besides the run's lock file (train/run_folders.py)."""
    return sorted(p.name for p in folder.iterdir() if p.name != ".megagpt.lock")


def losses(state):
    return [row["loss"] for row in state.history]


@pytest.fixture
def saved(tmp_path):
    """A 2-step run with a checkpoint at step 2; returns the checkpoint folder."""
    run(tmp_path, "base", "train.iters=2", f"checkpoint.dir={tmp_path / 'ck'}")
    return tmp_path / "ck" / "step_00000002"


def test_resume_at_one_process_is_bit_exact_with_dropout_and_zero1(tmp_path):
    extra = ["model.dropout=0.1", "parallel.zero=1", "checkpoint.save_interval=3"]
    whole = run(tmp_path, "whole", *extra, f"checkpoint.dir={tmp_path / 'ck'}")
    step3 = tmp_path / "ck" / "step_00000003"  # the directory's latest is step 6, saved at the end
    resumed = run(tmp_path, "resumed", *extra, f"checkpoint.load={step3}", f"checkpoint.dir={tmp_path / 'ck2'}")
    assert [row["step"] for row in resumed.history] == [4, 5, 6]
    assert losses(resumed) == losses(whole)[3:]  # exactly
    assert [row["grad_norm"] for row in resumed.history] == [row["grad_norm"] for row in whole.history][3:]


def test_bf16_resume_keeps_the_fp32_main_weights(tmp_path):
    extra = ["train.precision=bf16", "checkpoint.save_interval=3"]
    whole = run(tmp_path, "whole", *extra, f"checkpoint.dir={tmp_path / 'ck'}")
    step3 = tmp_path / "ck" / "step_00000003"  # the directory's latest is step 6, saved at the end
    meta = SavedCheckpoint(step3)
    assert meta.full("main", "wte.weight").dtype == torch.float32
    assert meta.full("weight", "wte.weight").dtype == torch.bfloat16
    resumed = run(tmp_path, "resumed", *extra, f"checkpoint.load={step3}", f"checkpoint.dir={tmp_path / 'ck2'}")
    assert losses(resumed) == losses(whole)[3:]


def test_only_the_newest_k_checkpoints_are_kept(tmp_path):
    run(tmp_path, "r", "checkpoint.save_interval=1", "checkpoint.keep=2", f"checkpoint.dir={tmp_path / 'ck'}")
    assert listing(tmp_path / "ck") == ["latest", "step_00000005", "step_00000006"]
    assert (tmp_path / "ck" / "latest").read_text().strip() == "step_00000006"


def load_into_fresh_run(tmp_path, checkpoint, *overrides):
    return run(tmp_path, "again", "train.iters=3", f"checkpoint.load={checkpoint}", *overrides)


def test_a_damaged_checkpoint_names_the_file(saved, tmp_path):
    rank_file = saved / "rank_00000.pt"
    original = rank_file.read_bytes()

    rank_file.write_bytes(original[: len(original) // 2])
    with pytest.raises(CheckpointError, match=r"rank_00000.pt has \d+ bytes, \d+ were written: it is truncated"):
        load_into_fresh_run(tmp_path, saved)

    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0xFF
    rank_file.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="rank_00000.pt fails its sha256 check: it is corrupt"):
        load_into_fresh_run(tmp_path, saved)

    rank_file.unlink()
    with pytest.raises(CheckpointError, match="checkpoint file .*rank_00000.pt is missing"):
        load_into_fresh_run(tmp_path, saved)

    (saved / "metadata.json").unlink()
    with pytest.raises(CheckpointError, match="has no metadata.json: it is not a complete checkpoint"):
        load_into_fresh_run(tmp_path, saved)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_into_fresh_run(tmp_path, tmp_path / "nowhere")


def test_a_checkpoint_of_another_model_is_refused_with_the_differences(saved, tmp_path):
    with pytest.raises(CheckpointError) as info:
        load_into_fresh_run(tmp_path, saved, "model.hidden_size=128", "model.num_layers=2")
    message = str(info.value)
    assert "was saved for another model" in message
    assert "model.num_layers: checkpoint 4, config 2" in message
    assert "model.hidden_size: checkpoint 64, config 128" in message


def test_a_checkpoint_with_other_local_layers_is_refused(saved, tmp_path):
    """Which layers are local and how far they see change what the weights compute: a resume must match them."""
    with pytest.raises(CheckpointError) as info:
        load_into_fresh_run(tmp_path, saved, "model.attention_pattern=[local,dense]", "model.local_window=8")
    assert "model.attention_pattern: checkpoint ['dense', 'local'], config ['local', 'dense']" in str(info.value)
    assert "model.local_window: checkpoint 16, config 8" in str(info.value)


def test_damaged_metadata_and_a_file_for_a_folder_are_named(saved, tmp_path):
    with pytest.raises(CheckpointError, match="rank_00000.pt is a file; give a checkpoint folder"):
        load_into_fresh_run(tmp_path, saved / "rank_00000.pt")
    meta = json.loads((saved / "metadata.json").read_text())
    for key, broken in (("consumed_samples", None), ("files", []), ("step", "2")):
        damaged = {k: v for k, v in meta.items() if k != key or broken is not None}
        if broken is not None:
            damaged[key] = broken
        (saved / "metadata.json").write_text(json.dumps(damaged))
        what = "lacks" if broken is None else f"has a {type(broken).__name__} as"
        with pytest.raises(CheckpointError, match=f"metadata.json {what} '{key}' .* the checkpoint is damaged"):
            load_into_fresh_run(tmp_path, saved)
    (saved / "metadata.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="holds a list, not an object"):
        load_into_fresh_run(tmp_path, saved)


def test_a_checkpoint_file_that_would_run_code_is_refused(saved, tmp_path):
    rank_file = saved / "rank_00000.pt"
    torch.save({"format": 1, "chunks": [], "rng": None, "payload": shutil.rmtree}, rank_file)  # a pickled callable
    meta = json.loads((saved / "metadata.json").read_text())
    meta["files"]["rank_00000.pt"] = {"bytes": rank_file.stat().st_size, "sha256": sha256_of(rank_file)}
    (saved / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="cannot be read safely"):
        load_into_fresh_run(tmp_path, saved)


def test_load_auto_starts_fresh_or_takes_the_latest(tmp_path):
    first = run(tmp_path, "a", "train.iters=2", f"checkpoint.dir={tmp_path / 'ck'}", "checkpoint.load=auto")
    assert [row["step"] for row in first.history] == [1, 2]
    second = run(tmp_path, "b", "train.iters=4", f"checkpoint.dir={tmp_path / 'ck'}", "checkpoint.load=auto")
    assert [row["step"] for row in second.history] == [3, 4]
    # A lost `latest` pointer: the newest complete checkpoint is found anyway.
    (tmp_path / "ck" / "latest").unlink()
    third = run(tmp_path, "c", "train.iters=5", f"checkpoint.dir={tmp_path / 'ck'}", "checkpoint.load=auto")
    assert [row["step"] for row in third.history] == [5]


def test_checkpoint_settings_are_validated():
    for overrides, message in [
        (["checkpoint.load=auto"], "checkpoint.load=auto needs checkpoint.dir"),
        (["checkpoint.save_interval=5"], "checkpoint.save_interval needs checkpoint.dir"),
        (["checkpoint.async_save=true"], "checkpoint.async_save needs checkpoint.dir"),
        (["checkpoint.dir=x", "checkpoint.async_save=maybe"], "checkpoint.async_save"),
        (["checkpoint.dir=x", "checkpoint.keep=0"], "checkpoint.keep=0 must be at least 1"),
        (["checkpoint.dir=x", "checkpoint.exit_after_minutes=0"], "exit_after_minutes=0.0 must be positive"),
    ]:
        with pytest.raises(ConfigError, match=message):
            validate(tiny_config(*overrides))


def sigterm_during_step(monkeypatch, n: int) -> None:
    """Step n sends SIGTERM to this process (as Slurm would, mid-step)."""
    from megagpt.train.trainer import Trainer

    step = Trainer.train_step

    def step_with_sigterm(self):
        result = step(self)
        if self.state.step == n:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(Trainer, "train_step", step_with_sigterm)


def test_sigterm_in_a_step_saves_and_stops_and_the_resume_is_exact(tmp_path, monkeypatch):
    """The signal arrives during step 3 (sent by the process to itself); the run saves after step 3 and returns."""
    whole = run(tmp_path, "whole", "model.dropout=0.1")
    sigterm_during_step(monkeypatch, 3)
    stopped = run(tmp_path, "stopped", "model.dropout=0.1", f"checkpoint.dir={tmp_path / 'ck'}")
    monkeypatch.undo()
    assert [row["step"] for row in stopped.history] == [1, 2, 3]
    assert (tmp_path / "ck" / "latest").read_text().strip() == "step_00000003"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed after training
    resumed = run(tmp_path, "resumed", "model.dropout=0.1", f"checkpoint.dir={tmp_path / 'ck'}", "checkpoint.load=auto")
    assert losses(stopped) + losses(resumed) == losses(whole)


def test_exit_after_minutes_saves_and_stops(tmp_path):
    state = run(tmp_path, "r", f"checkpoint.dir={tmp_path / 'ck'}", "checkpoint.exit_after_minutes=0.0001")
    assert [row["step"] for row in state.history] == [1]
    assert (tmp_path / "ck" / "latest").read_text().strip() == "step_00000001"


def test_the_launcher_stops_cleanly_on_a_real_sigterm_and_resumes(tmp_path):
    """launcher/pretrain.py as its own process, sent SIGTERM from outside while it trains."""
    overrides = [
        "train.iters=400",
        "logging.log_interval=1",
        "logging.tensorboard=false",
        "train.eval_iters=0",
        f"checkpoint.dir={tmp_path / 'ck'}",
        "checkpoint.load=auto",
        "logging.memory_report=false",
    ]
    cmd = [
        sys.executable,
        str(REPO / "launcher/pretrain.py"),
        "--config",
        str(REPO / "configs/tiny-cpu.yaml"),
        f"logging.dir={tmp_path / 'run'}",
        *overrides,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-2000:]
    assert "(SIGTERM): checkpoint saved, resume with checkpoint.load=auto" in out
    stopped_at = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert 3 <= stopped_at < 400
    assert (tmp_path / "ck" / "latest").read_text().strip() == f"step_{stopped_at:08d}"
    # The same command again resumes after that step.
    cmd[-len(overrides) - 1] = f"logging.dir={tmp_path / 'run2'}"
    cmd[cmd.index("train.iters=400")] = f"train.iters={stopped_at + 2}"
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "run2" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [stopped_at + 1, stopped_at + 2]


def test_after_resuming_from_an_older_checkpoint_pruning_keeps_the_new_ones(tmp_path):
    """A rollback: the folder holds steps 1..6 of a first run; resuming from step 3 and saving step 4 must keep the
    new step 4 (and point latest at it), pruning the abandoned run's checkpoints instead."""
    ck = tmp_path / "ck"
    run(tmp_path, "first", "checkpoint.save_interval=1", "checkpoint.keep=10", f"checkpoint.dir={ck}")
    run(
        tmp_path,
        "rollback",
        "train.iters=4",
        "checkpoint.save_interval=1",
        "checkpoint.keep=2",
        f"checkpoint.dir={ck}",
        f"checkpoint.load={ck / 'step_00000003'}",
    )
    assert listing(ck) == ["latest", "step_00000004", "step_00000006"]
    assert (ck / "latest").read_text().strip() == "step_00000004"
    resumed = run(tmp_path, "auto", "train.iters=5", f"checkpoint.dir={ck}", "checkpoint.load=auto")
    assert [row["step"] for row in resumed.history] == [5]


def test_a_bf16_checkpoint_loads_into_fp32_at_the_main_weights_precision(tmp_path):
    from megagpt.checkpoint.load import load_checkpoint
    from megagpt.data.gpt_dataset import SyntheticDataset
    from megagpt.train.run import build_trainer

    run(tmp_path, "bf16", "train.iters=2", "train.precision=bf16", f"checkpoint.dir={tmp_path / 'ck'}")
    saved = tmp_path / "ck" / "step_00000002"
    cfg = tiny_config(*BASE, f"logging.dir={tmp_path / 'fp32'}")
    data = SyntheticDataset(64, cfg.model.seq_length, cfg.model.vocab_size, seed=5)
    trainer = build_trainer(cfg, ParallelContext.single_process(), data, None, None)
    load_checkpoint(trainer, saved)
    main = SavedCheckpoint(saved).full("main", "blocks.1.mlp.fc.weight")
    param = dict(trainer.chunks[0].named_parameters())["blocks.1.mlp.fc.weight"]
    assert param.dtype == torch.float32 and torch.equal(param.detach(), main)
    assert not torch.equal(param.detach(), main.bfloat16().float())  # not the rounded bf16 weight


def test_a_resumed_run_continues_metrics_jsonl_after_the_checkpoint(tmp_path):
    """Resuming into the same logging.dir keeps the rows up to the checkpoint and drops later ones (a run that
    went on past its last save), so the file reads as one run."""
    ck = f"checkpoint.dir={tmp_path / 'ck'}"
    run(tmp_path, "same", "checkpoint.save_interval=2", "checkpoint.keep=5", ck)
    run(tmp_path, "same", ck, f"checkpoint.load={tmp_path / 'ck' / 'step_00000004'}")
    rows = [json.loads(line) for line in (tmp_path / "same" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]


def test_old_checkpoints_are_deleted_off_the_training_thread(tmp_path, monkeypatch):
    """Rank 0 deletes beyond checkpoint.keep in a thread, so a slow delete does not hold the other ranks in the
    save's barrier past NCCL's watchdog; a save returns while its delete still runs."""
    import threading

    from megagpt.checkpoint import publish
    from megagpt.train import run_control

    deleted, real_delete = [], publish.delete_checkpoint
    release = threading.Event()

    def slow_delete(path):
        assert release.wait(timeout=60)
        deleted.append((path.name, threading.current_thread().name))
        real_delete(path)

    saves_done = []
    real_save = run_control.save_checkpoint

    def save_then_release(trainer, *args):
        release.clear()
        folder = real_save(trainer, *args)  # returns while the delete it started is still blocked
        saves_done.append((folder.name, list(deleted)))
        release.set()
        if trainer.checkpointer.pruner.thread is not None:
            trainer.checkpointer.pruner.thread.join()  # deterministic: each prune ends before the next save
        return folder

    monkeypatch.setattr(publish, "delete_checkpoint", slow_delete)
    monkeypatch.setattr(run_control, "save_checkpoint", save_then_release)
    ck = tmp_path / "ck"
    run(tmp_path, "r", "train.iters=4", "checkpoint.save_interval=1", "checkpoint.keep=2", f"checkpoint.dir={ck}")
    assert saves_done[2] == ("step_00000003", [])  # step 3's save returned before step 1 was deleted
    assert [name for name, _ in deleted] == ["step_00000001", "step_00000002"]
    assert {thread for _, thread in deleted} == {"megagpt-prune"}
    assert listing(ck) == ["latest", "step_00000003", "step_00000004"]


@pytest.mark.parametrize("async_save", [False, True])
def test_a_full_disk_during_a_save_names_the_checkpoint_and_the_intact_one(tmp_path, monkeypatch, async_save):
    """Synchronous: the save raises. Asynchronous: the writer's error is raised at the next step boundary."""
    import errno

    from megagpt.checkpoint import save

    real_write, calls = save.write_rank_file, []

    def fill_the_disk(payload, path):
        calls.append(path)
        if len(calls) == 3:
            path.write_bytes(b"partial")
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError as e:  # as torch.save reports it: a RuntimeError over the OSError
                raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed") from e
        return real_write(payload, path)

    monkeypatch.setattr(save, "write_rank_file", fill_the_disk)
    ck = tmp_path / "ck"
    with pytest.raises(CheckpointError) as info:
        run(
            tmp_path,
            "r",
            "checkpoint.save_interval=1",
            "checkpoint.keep=5",
            f"checkpoint.dir={ck}",
            f"checkpoint.async_save={async_save}",
        )
    message = str(info.value)
    assert f"checkpoint {ck / 'step_00000003'} could not be saved (rank 0 could not write its file: No space" in message
    assert "No space left on device: " in message and "rank_00000.pt; " in message
    assert "GiB are free there); its partial files were removed" in message
    assert f"the newest intact checkpoint is {ck / 'step_00000002'}" in message
    assert listing(ck) == ["latest", "step_00000001", "step_00000002"]
    assert SavedCheckpoint(ck / "step_00000002").step == 2


def test_a_prune_put_off_by_a_slow_one_is_done_by_the_end(tmp_path):
    """While one delete still runs, the next save does not wait for it: its prune is put off, and done later."""
    import threading

    from megagpt.checkpoint.publish import BackgroundPruner

    ck = tmp_path / "ck"
    run(tmp_path, "r", "train.iters=4", "checkpoint.save_interval=1", "checkpoint.keep=10", f"checkpoint.dir={ck}")
    pruner, gate = BackgroundPruner(), threading.Event()
    pruner.thread = threading.Thread(target=gate.wait)  # a slow delete, still running
    pruner.thread.start()
    pruner.start(ck, 2, ck / "step_00000004")
    assert listing(ck) == ["latest", "step_00000001", "step_00000002", "step_00000003", "step_00000004"]
    gate.set()
    pruner.wait()
    assert listing(ck) == ["latest", "step_00000003", "step_00000004"]
