"""What the training loop reads back from the device: on a GPU each read is a host sync that stalls the CPU
until the GPU's queue drains, so the steps between logged rows must need none (fp16's overflow check aside)."""

from __future__ import annotations

import collections
import sys

import pytest
import torch

from megagpt.errors import UserError
from megagpt.parallel.context import ParallelContext
from megagpt.train.run import configure_tf32, pretrain
from megagpt.train.trainer import Trainer
from tests.conftest import tiny_config

BASE = ["logging.tensorboard=false", "train.eval_iters=0", "logging.memory_report=false"]
READS = ("item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy")


def count_reads(monkeypatch) -> collections.Counter:
    """Count tensor reads made by megagpt code, by the function that made them."""
    reads = collections.Counter()
    for name in READS:
        original = getattr(torch.Tensor, name)

        def read(self, *args, _original=original, **kwargs):
            caller = sys._getframe(1)
            while caller.f_code.co_name.startswith("<"):  # a comprehension: its function
                caller = caller.f_back
            if "/megagpt/" in caller.f_code.co_filename:
                reads[caller.f_code.co_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, read)
    return reads


def test_steps_between_logged_rows_read_nothing_back(tmp_path, monkeypatch):
    """Also: the rows' performance fields cost no read, and training needs no wandb (an import of it fails here)."""
    cfg = tiny_config(*BASE, "train.iters=10", "logging.log_interval=5", f"logging.dir={tmp_path}")
    monkeypatch.setitem(sys.modules, "wandb", None)
    reads = count_reads(monkeypatch)
    state = pretrain(cfg, ParallelContext.single_process())
    monkeypatch.undo()
    assert [row["step"] for row in state.history] == [5, 10]
    for row in state.history:
        assert row["step_time_ms"] > 0 and row["tflops_per_device"] > 0 and row["mfu"] > 0 and row["rss_gib"] > 0
        assert row["peak_source"] == "measured" and row["hfu"] == row["mfu"]  # CPU; no recomputation
    reads.pop("read_batch", None)  # checks token ids of CPU samples before they go to the device
    reads.pop("ensure_same_config", None)  # once, before training
    # Per logged row: the window's losses in one read, the last step's gradient norm in another.
    assert reads == {"reduce_losses": 2, "train": 2}, reads


def nan_loss_at_step_2(cfg, monkeypatch):
    """The last micro-batch of step 2 returns a NaN loss."""
    original, calls = Trainer.forward, []

    def forward(self, chunk, x, labels):
        y = original(self, chunk, x, labels)
        if labels is not None:
            calls.append(1)
            if len(calls) == 2 * cfg.train.global_batch_size // cfg.train.micro_batch_size:
                return y * float("nan")
        return y

    monkeypatch.setattr(Trainer, "forward", forward)


def test_a_non_finite_loss_ends_the_run_at_the_next_logged_row_naming_its_step(tmp_path, monkeypatch):
    cfg = tiny_config(*BASE, "train.iters=10", "logging.log_interval=4", f"logging.dir={tmp_path}")
    nan_loss_at_step_2(cfg, monkeypatch)
    with pytest.raises(UserError, match="the training loss became nan at step 2; lower optim.lr"):
        pretrain(cfg, ParallelContext.single_process())


def test_tf32_follows_train_allow_tf32():
    assert tiny_config().train.allow_tf32 is True
    saved = torch.get_float32_matmul_precision()
    try:
        configure_tf32(False)
        assert torch.get_float32_matmul_precision() == "highest"
        configure_tf32(True)
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cuda.matmul.allow_tf32  # the legacy flag reads back consistently, no "mix" error
    finally:
        torch.set_float32_matmul_precision(saved)


def test_a_non_finite_loss_is_caught_before_a_save_makes_it_a_checkpoint(tmp_path, monkeypatch):
    """A save between logged rows reads the window's losses first: NaN weights never become `latest`."""
    ck = tmp_path / "ck"
    cfg = tiny_config(*BASE, "train.iters=10", "logging.log_interval=4", f"logging.dir={tmp_path / 'run'}",
                      f"checkpoint.dir={ck}", "checkpoint.save_interval=3")  # fmt: skip
    nan_loss_at_step_2(cfg, monkeypatch)
    with pytest.raises(UserError, match="the training loss became nan at step 2"):
        pretrain(cfg, ParallelContext.single_process())
    assert not list(ck.glob("step_*"))  # step 3's save never happened
