"""The CPU allocation tracker, and what activation recomputation does to gradients (nothing) and memory (less)."""

import pytest
import torch

from megagpt.train.memory import MIB, AllocationTracker, step_peak
from tests.conftest import tiny_config


def test_tracker_counts_live_storages_and_their_peak():
    keep = torch.zeros(MIB // 4)  # allocated before: not counted
    with AllocationTracker() as tracker:
        a = torch.ones(MIB // 4)  # 1 MiB of float32
        b = torch.ones(MIB // 2)  # 2 MiB
        view = b[:10]  # a view allocates nothing
        b.add_(1)  # neither does an in-place op
        keep[:10].mul_(2).t()  # nor views of, or writes into, storages from before the block
        torch.nn.functional.linear(torch.ones(1, 4), keep.view(-1, 4)[:8])  # only its input and (1, 8) output count
        del a
        c = torch.ones(MIB // 8)  # 0.5 MiB
        assert tracker.live == int(2.5 * MIB)
    assert tracker.peak == 3 * MIB + 16 + 32  # a, b, and the linear's 16-byte input and 32-byte output
    del b, view, c
    assert tracker.live == 0 and keep.numel()


def gradients_and_peak(recompute: str, dropout: float):
    from megagpt.model.build import build_model
    from megagpt.parallel.context import ParallelContext

    cfg = tiny_config(
        "model.vocab_size=1001", "model.seq_length=128", "model.local_window=32", f"model.dropout={dropout}",
        f"parallel.recompute={recompute}",
    )  # fmt: skip
    (model,) = build_model(cfg, ParallelContext.single_process())
    tokens = torch.randint(0, 1001, (4, 129), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    with step_peak(torch.device("cpu")) as peak:
        model(tokens[:, :-1], tokens[:, 1:]).backward()
    return {name: p.grad for name, p in model.named_parameters()}, peak["peak_bytes"]


def test_recompute_gives_the_same_gradients_with_dropout_and_lowers_the_peak():
    grads, peaks = {}, {}
    for mode in ("none", "selective", "full"):
        grads[mode], peaks[mode] = gradients_and_peak(mode, dropout=0.3)
    for mode in ("selective", "full"):
        for name, grad in grads["none"].items():
            torch.testing.assert_close(grads[mode][name], grad, rtol=0, atol=0, msg=f"{mode}: {name}")
    # The attention core's (b, heads, s, s) probabilities and dropout masks are the biggest activations here.
    assert peaks["full"] < peaks["selective"] < peaks["none"], peaks
    # Dropout is really on: other draws give other gradients, so the equality above is not trivial.
    other, _ = gradients_and_peak("none", dropout=0.0)
    assert not torch.equal(other["blocks.0.attn.qkv.weight"], grads["none"]["blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize("precision, param_bytes", [("fp32", 4), ("bf16", 2)])
def test_memory_report_in_metrics(tmp_path, precision, param_bytes):
    from megagpt.parallel.context import ParallelContext
    from megagpt.train.run import pretrain

    cfg = tiny_config(
        "model.vocab_size=1001", "train.iters=2", f"train.precision={precision}", f"logging.dir={tmp_path}",
        "logging.log_interval=1", "logging.tensorboard=false",
    )  # fmt: skip
    state = pretrain(cfg, ParallelContext.single_process())
    first = state.history[0]
    from megagpt.model.facts import num_parameters

    numel = num_parameters(cfg.model, vocab_rows=1024)  # padded to a multiple of 128
    assert first["memory_params_bytes"] == numel * param_bytes
    assert first["memory_grads_bytes"] == numel * 4  # fp32 gradient buffers whatever the precision
    # Adam's two fp32 moments, plus the fp32 main weights when the model computes in bf16.
    assert first["memory_optimizer_bytes"] == numel * (8 if precision == "fp32" else 12)
    assert first["memory_peak_step_bytes"] > 0
    assert "memory_params_bytes" not in state.history[1]
