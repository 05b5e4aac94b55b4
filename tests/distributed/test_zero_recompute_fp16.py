"""ZeRO-1, activation recomputation and fp16 loss scaling across processes (CPU, gloo).

- zero=1 trains exactly what one process with zero=0 trains (fp32, 10 steps, losses to 1e-5), with dp, tp +
  sequence parallelism and pipeline stages; each rank's optimizer state is 1/dp of the unsharded one.
- recompute full and selective give the losses of recompute none with dropout on, under tp x pp.
- an inf gradient on one rank makes every rank skip the step and lower the fp16 loss scale.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.distributed.harness import run_world
from tests.distributed.test_pipeline_parallel import STEPS, pipeline_config

ZERO_LAYOUTS = [  # (tp, pp, dp, sequence_parallel)
    (1, 1, 2, False),
    (1, 1, 4, False),
    (2, 1, 2, True),
    (1, 2, 2, False),
]


def losses_of(state) -> list[tuple[float, float]]:
    return [(row["loss"], row["grad_norm"]) for row in state.history]


def fp16_overflow_check(ctx, run_dir: str, poisoned_rank: int) -> list[tuple]:
    """Train 6 fp16 steps (zero=1); on `poisoned_rank` put an inf into a gradient at steps 3 and 4. Returns, per
    step: (skipped, scale before, scale after, whether any parameter changed)."""
    from megagpt.data.gpt_dataset import SyntheticDataset
    from megagpt.train.pretrain import build_trainer

    dp = ctx.dp_group.size
    cfg = pipeline_config(
        1, 1, 1, False, 4, run_dir, "train.precision=fp16", "train.initial_loss_scale=1024", "parallel.zero=1"
    )
    data = SyntheticDataset(64, cfg.model.seq_length, cfg.model.vocab_size, seed=5)
    trainer = build_trainer(cfg, ctx, data, None, None)
    assert ctx.dp_group.size == dp and trainer.grads.shard
    finish = trainer.optimizer.finish_gradients

    def finish_then_poison():
        finish()
        if ctx.rank == poisoned_rank and trainer.state.step + 1 in (3, 4):
            trainer.optimizer.mains[-1].grad[0] = math.inf

    trainer.optimizer.finish_gradients = finish_then_poison
    rows = []
    for _ in range(6):
        before = [p.detach().clone() for p in trainer.chunks.parameters()]
        scale = trainer.scaler.scale
        result = trainer.train_step()
        changed = any(not torch.equal(b, p) for b, p in zip(before, trainer.chunks.parameters()))
        rows.append((result.skipped, scale, trainer.scaler.scale, changed))
    return rows


def check_zero(rank, world_size, tp, pp, dp, sp, run_dir):
    from megagpt.parallel.context import ParallelContext
    from megagpt.parallel.topology import Topology
    from megagpt.train.pretrain import pretrain

    ctx = ParallelContext.initialize(Topology(tp, dp, pp), rank, torch.device("cpu"))
    state = pretrain(pipeline_config(tp, pp, 1, sp, 4, run_dir, "parallel.zero=1"), ctx)
    result = {"losses": losses_of(state), "memory": state.memory[rank]}
    if (tp, pp, dp) == (1, 1, 4):
        result["fp16"] = fp16_overflow_check(ctx, run_dir, poisoned_rank=3)
    return result


@pytest.fixture(scope="module")
def unsharded(tmp_path_factory):
    """One process, zero=0: the curve every layout must reproduce, and the whole optimizer state's bytes."""
    from megagpt.parallel.context import ParallelContext
    from megagpt.train.pretrain import pretrain

    run_dir = str(tmp_path_factory.mktemp("unsharded"))
    state = pretrain(pipeline_config(1, 1, 1, False, 4, run_dir), ParallelContext.single_process())
    return {"losses": losses_of(state), "memory": state.memory[0]}


@pytest.mark.parametrize("tp, pp, dp, sp", ZERO_LAYOUTS, ids=[f"tp{t}-pp{p}-dp{d}" for t, p, d, _ in ZERO_LAYOUTS])
def test_zero1_matches_unsharded_training(tp, pp, dp, sp, tmp_path, unsharded):
    results = run_world(tp * pp * dp, check_zero, tp, pp, dp, sp, str(tmp_path / "run"))
    for rank, result in enumerate(results):
        assert len(result["losses"]) == STEPS
        for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(result["losses"], unsharded["losses"]), 1):
            assert loss == pytest.approx(ref_loss, rel=1e-5), f"rank {rank} step {step}"
            assert norm == pytest.approx(ref_norm, rel=1e-4), f"rank {rank} step {step}"

    if (tp, pp) == (1, 1):
        # Each rank keeps Adam's two fp32 moments for its 1/dp slice of every bucket (slices padded to equal size).
        whole = unsharded["memory"]["optimizer_bytes"]
        for result in results:
            assert result["memory"]["optimizer_bytes"] * dp == pytest.approx(whole, rel=1e-3)
            assert result["memory"]["params_bytes"] == unsharded["memory"]["params_bytes"]

    if "fp16" in results[0]:
        for rank, rows in enumerate(r["fp16"] for r in results):
            skipped = [row[0] for row in rows]
            assert skipped == [False, False, True, True, False, False], f"rank {rank}"
            # Hysteresis 2: the first overflow only skips, the second also halves the scale.
            assert [(before, after) for _, before, after, _ in rows[2:4]] == [(1024, 1024), (1024, 512)]
            assert [changed for *_, changed in rows] == [not s for s in skipped], f"rank {rank}"


def check_recompute(rank, world_size, run_dir):
    from megagpt.parallel.context import ParallelContext
    from megagpt.parallel.topology import Topology
    from megagpt.train.pretrain import pretrain

    ctx = ParallelContext.initialize(Topology(2, 1, 2), rank, torch.device("cpu"))
    curves = {}
    for mode in ("none", "selective", "full"):
        cfg = pipeline_config(
            2, 2, 1, True, 4, f"{run_dir}/{mode}", "model.dropout=0.2", f"parallel.recompute={mode}", "train.iters=4"
        )
        curves[mode] = losses_of(pretrain(cfg, ctx))
    return curves


def test_recompute_matches_with_dropout_under_tensor_and_pipeline_parallelism(tmp_path):
    for rank, curves in enumerate(run_world(4, check_recompute, str(tmp_path))):
        for mode in ("selective", "full"):
            for (loss, norm), (want_loss, want_norm) in zip(curves[mode], curves["none"]):
                assert loss == pytest.approx(want_loss, rel=1e-6), (rank, mode)
                assert norm == pytest.approx(want_norm, rel=1e-5), (rank, mode)
