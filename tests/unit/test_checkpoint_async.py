"""Asynchronous save in one process (checkpoint/async_save.py, checkpoint.async_save): an async checkpoint's files
are byte for byte a synchronous one's; the sha256 both paths compute while writing is the file's;
a save that finds the previous one still writing waits and says so; a stop waits for the save in flight and
publishes it. Across processes (bit-exact resume from async saves at (2,2,2) with ZeRO-1 and dropout, kill -9 of
a writer, a failing rank): tests/distributed/test_checkpoint.py."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch

from megagpt.checkpoint import save as sync_save
from megagpt.checkpoint.async_save import AsyncSaver, HostBuffers
from megagpt.checkpoint.format import HashingWriter, sha256_of
from megagpt.checkpoint.reader import SavedCheckpoint
from megagpt.log import get_logger
from tests.conftest import tiny_config
from tests.unit.test_checkpoint import BASE, listing, run, sigterm_during_step

ASYNC = "checkpoint.async_save=true"
QUICK = "logging.memory_report=false"  # the first step runs under an allocation tracker otherwise


def test_async_and_sync_saves_write_the_same_files_and_hash_them_while_writing(tmp_path):
    """The same trainer saved both ways, twice (the second async save reuses the first one's host buffers):
    byte-identical rank files, and the sha256 in metadata.json, computed while writing, is the file's."""
    from megagpt.parallel.context import ParallelContext
    from megagpt.train.run import build_data, build_trainer

    cfg = tiny_config(*BASE, QUICK, "parallel.zero=1", "train.precision=bf16", f"logging.dir={tmp_path / 'run'}")
    ctx = ParallelContext.single_process()
    trainer = build_trainer(cfg, ctx, *build_data(cfg), None)
    saver = AsyncSaver(ctx)
    for _ in range(2):
        trainer.train_step()
        sync = sync_save.save_checkpoint(trainer, tmp_path / "sync", keep=1)
        saver.start(trainer, tmp_path / "async", "tag", sync_save.Pruning(tmp_path / "async", 1))
        saver.wait()
        folders = (sync, tmp_path / "async" / sync.name)
        a, s = (SavedCheckpoint(folder).meta for folder in folders)
        assert a.files == s.files and a.index == s.index and a.to_json() == s.to_json()
        for name, record in s.files.items():
            assert record == {"bytes": (sync / name).stat().st_size, "sha256": sha256_of(sync / name)}
        for name in s.files:
            assert (sync / name).read_bytes() == (folders[1] / name).read_bytes()
    assert saver.in_flight is None and len(saver.buffers.buffers) > 0


def test_hashing_writer_gives_the_files_size_and_sha256(tmp_path):
    path = tmp_path / "f.pt"
    with open(path, "wb") as f:
        hashing = HashingWriter(f)
        torch.save({"x": torch.arange(10_000.0), "y": [1, "two"]}, hashing)
    assert hashing.record() == {"bytes": path.stat().st_size, "sha256": sha256_of(path)}


def test_host_buffers_are_reused_between_saves():
    buffers = HostBuffers()
    a, b = torch.randn(5), torch.randn(3)
    for _ in range(2):
        buffers.start()
        copies = [buffers.copy(a), buffers.copy(b)]
        buffers.finish()
        assert torch.equal(copies[0], a) and copies[0].data_ptr() != a.data_ptr()
    assert copies[0].data_ptr() == buffers.buffers[0].data_ptr() and len(buffers.buffers) == 2
    buffers.start()
    buffers.copy(torch.randn(4))  # another size: a new buffer; the unused second one is let go
    buffers.finish()
    assert [tuple(x.shape) for x in buffers.buffers] == [(4,)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_host_buffers_of_gpu_tensors_are_pinned_and_complete_after_finish():
    buffers = HostBuffers()
    data = torch.randn(1 << 20, device="cuda")
    buffers.start()
    copy = buffers.copy(data)
    data.add_(1.0)  # queued after the copy: finish() waits for the copy, not for this
    buffers.finish()
    assert copy.is_pinned() and copy.device.type == "cpu"
    assert torch.equal(copy + 1.0, data.cpu())


@pytest.fixture
def info_log():
    """The megagpt logger's INFO lines, recorded (tests run without the launcher's setup_logging)."""
    lines, logger = [], get_logger()

    class Record(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler, level = Record(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def writer_held_until_the_next_save(monkeypatch, hold_s=0.2):
    """Make each background write finish only after the training thread has started waiting for it (and hold_s
    more): every save then finds the previous one still in flight, deterministically."""
    waiting, real_wait, real_write = threading.Event(), AsyncSaver.wait, sync_save.write_rank_file

    def wait(self):
        if self.in_flight is not None:
            waiting.set()
        real_wait(self)

    def slow_write(payload, path):
        if threading.current_thread().name == "megagpt-checkpoint-writer":
            assert waiting.wait(timeout=120)
            waiting.clear()
            time.sleep(hold_s)
        return real_write(payload, path)

    monkeypatch.setattr(AsyncSaver, "wait", wait)
    monkeypatch.setattr(sync_save, "write_rank_file", slow_write)


def test_a_save_waits_for_the_one_in_flight_and_a_sigterm_waits_and_publishes(tmp_path, monkeypatch, info_log):
    """Saves every step, each writer slower than a step: each save waits for the previous and logs it. SIGTERM
    during step 3 stops the run after step 3's save is written and published."""
    writer_held_until_the_next_save(monkeypatch)
    sigterm_during_step(monkeypatch, 3)
    ck = tmp_path / "ck"
    stopped = run(
        tmp_path, "r", ASYNC, QUICK, "checkpoint.save_interval=1", "checkpoint.keep=5", f"checkpoint.dir={ck}"
    )
    assert [row["step"] for row in stopped.history] == [1, 2, 3]
    assert listing(ck) == ["latest", "step_00000001", "step_00000002", "step_00000003"]
    assert (ck / "latest").read_text().strip() == "step_00000003"
    waits = [line for line in info_log if line.startswith("waited ")]
    # Steps 2 and 3 waited for steps 1 and 2; the stop waited for step 3; each at least the writer's hold.
    assert [line.split("checkpoint ")[1].split(" ")[0] for line in waits] == [
        str(ck / f"step_0000000{n}") for n in (1, 2, 3)
    ]
    assert all(float(line.split()[1].rstrip("s")) >= 0.2 for line in waits)
    assert any("(SIGTERM): checkpoint saved" in line for line in info_log)


def test_exit_after_minutes_waits_for_the_async_save(tmp_path, monkeypatch):
    writer_held_until_the_next_save(monkeypatch, hold_s=0.0)
    ck = tmp_path / "ck"
    state = run(tmp_path, "r", ASYNC, QUICK, f"checkpoint.dir={ck}", "checkpoint.exit_after_minutes=0.0001")
    assert [row["step"] for row in state.history] == [1]
    assert (ck / "latest").read_text().strip() == "step_00000001"
    assert SavedCheckpoint(ck / "step_00000001").step == 1
