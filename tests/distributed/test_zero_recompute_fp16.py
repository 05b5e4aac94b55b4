"""ZeRO-1, activation recomputation and fp16 loss scaling across processes (CPU, gloo).

- zero=1 trains exactly what one process with zero=0 trains (fp32, 10 steps, losses to 1e-5), with dp, tp +
  sequence parallelism and pipeline stages; each rank's optimizer state is 1/dp of the unsharded one.
- recompute full and selective give the losses of recompute none with dropout on, under tp x pp.
- an inf gradient on one rank makes every rank skip the step and lower the fp16 loss scale, even in a replicated
  parameter the gradient norm counts on another rank only; fp16's unscaled gradient norm under tp x pp is fp32's.
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
    """Train 6 fp16 steps at tp 2 x pp 2; on `poisoned_rank` (tp rank 1) put an inf into the gradient of a
    parameter replicated across tp, which the gradient norm counts on tp rank 0 only, at steps 3 and 4. Returns,
    per step: (skipped, scale before, scale after, whether any parameter changed)."""
    from megagpt.data.gpt_dataset import SyntheticDataset
    from megagpt.parallel.params import spec_of
    from megagpt.train.run import build_trainer

    cfg = pipeline_config(2, 2, 1, False, 4, run_dir, "train.precision=fp16", "train.initial_loss_scale=1024")
    data = SyntheticDataset(64, cfg.model.seq_length, cfg.model.vocab_size, seed=5)
    trainer = build_trainer(cfg, ctx, data, None, None)
    finish = trainer.optimizer.finish_gradients
    replicated = next(m for m in trainer.optimizer.mains if not spec_of(m).tp_split)

    def finish_then_poison():
        finish()
        if ctx.rank == poisoned_rank and trainer.state.step + 1 in (3, 4):
            assert ctx.tp_group.index == 1
            replicated.grad[0] = math.inf

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
    from megagpt.train.run import pretrain

    ctx = ParallelContext.initialize(Topology(tp, dp, pp), rank, torch.device("cpu"))
    state = pretrain(pipeline_config(tp, pp, 1, sp, 4, run_dir, "parallel.zero=1"), ctx)
    return {"losses": losses_of(state), "memory": state.memory[rank]}


@pytest.fixture(scope="module")
def unsharded(tmp_path_factory):
    """One process, zero=0: the curve every layout must reproduce, and the whole optimizer state's bytes."""
    from megagpt.parallel.context import ParallelContext
    from megagpt.train.run import pretrain

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


def check_recompute(rank, world_size, run_dir):
    from megagpt.parallel.context import ParallelContext
    from megagpt.parallel.topology import Topology
    from megagpt.train.run import pretrain

    ctx = ParallelContext.initialize(Topology(2, 1, 2), rank, torch.device("cpu"))
    curves = {}
    for mode in ("none", "selective", "full"):
        cfg = pipeline_config(
            2, 2, 1, True, 4, f"{run_dir}/{mode}", "model.dropout=0.2", f"parallel.recompute={mode}", "train.iters=4"
        )
        curves[mode] = losses_of(pretrain(cfg, ctx))
    # fp16 with a fixed scale: the loss is scaled once (on the last stage) and the gradients unscaled once.
    cfg = pipeline_config(
        2, 2, 1, True, 4, f"{run_dir}/fp16", "model.dropout=0.2", "train.iters=4", "train.precision=fp16",
        "train.loss_scale=1024",
    )  # fmt: skip
    curves["fp16"] = losses_of(pretrain(cfg, ctx))
    curves["overflow"] = fp16_overflow_check(ctx, f"{run_dir}/overflow", poisoned_rank=1)
    return curves


def test_recompute_and_fp16_under_tensor_and_pipeline_parallelism(tmp_path):
    for rank, curves in enumerate(run_world(4, check_recompute, str(tmp_path))):
        for mode in ("selective", "full"):
            for (loss, norm), (want_loss, want_norm) in zip(curves[mode], curves["none"]):
                assert loss == pytest.approx(want_loss, rel=1e-6), (rank, mode)
                assert norm == pytest.approx(want_norm, rel=1e-5), (rank, mode)
        # fp16's unscaled gradient norm is fp32's up to fp16 rounding (a missing or doubled scale is 1024x off).
        for (loss, norm), (want_loss, want_norm) in zip(curves["fp16"], curves["none"]):
            assert loss == pytest.approx(want_loss, rel=1e-2) and norm == pytest.approx(want_norm, rel=2e-2), rank

        rows = curves["overflow"]
        skipped = [row[0] for row in rows]
        assert skipped == [False, False, True, True, False, False], f"rank {rank}"
        # Hysteresis 2: the first overflow only skips, the second also halves the scale.
        assert [(before, after) for _, before, after, _ in rows[2:4]] == [(1024, 1024), (1024, 512)]
        assert [changed for *_, changed in rows] == [not s for s in skipped], f"rank {rank}"
