"""The zero-bubble schedules (parallel.pp_schedule=zb-h1, zb-h2) compute what one process computes, and what 1F1B
computes: every gradient of a step, and the losses and gradient norms of 10 steps (fp32, CPU, gloo). One world per
layout checks all the schedules: tp2 x pp2 x dp2 with sequence parallelism, pp3 and pp4. In each, B (the input
gradients) must leave every weight gradient to W, the fused tp=1 output layer's excepted (model/gpt.py). A pp2 x dp2
world with ZeRO-1 checks ZB-H1 against 1F1B in bf16 and fp16, with recomputation."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.harness import run_world
from tests.distributed.test_pipeline_parallel import one_step_gradients, pipeline_config

SCHEDULES = ("zb-h1", "zb-h2")
STEPS = 10
LAYOUTS = [(2, 2, 2, True, 4), (1, 3, 1, False, 3), (1, 4, 1, False, 4)]  # (tp, pp, dp, sequence_parallel, layers)


def watch_backward_input(trainer, allowed: set[str]) -> list[str]:
    """Wrap the executor's B so that it fails if a gradient other than `allowed` reaches main_grad during it."""
    executor, params = trainer.executor, dict(trainer.chunks.named_parameters())
    original, seen = executor._backward, []

    def backward_input(action, *args):
        before = {name: p.main_grad.clone() for name, p in params.items()}
        original(action, *args)
        changed = {name for name, p in params.items() if not torch.equal(p.main_grad, before[name])}
        assert changed <= allowed, f"B of {action} computed weight gradients: {sorted(changed - allowed)}"
        seen.append(repr(action))

    executor._backward = backward_input
    return seen


def train_history(cfg, ctx) -> list[tuple[float, float]]:
    """(loss, grad norm) of STEPS optimizer steps."""
    from megagpt.data.gpt_dataset import SyntheticDataset
    from megagpt.train.run import build_trainer

    data = SyntheticDataset(cfg.train.global_batch_size * STEPS, cfg.model.seq_length, cfg.model.vocab_size, seed=5)
    trainer = build_trainer(cfg, ctx, data, None, None)
    results = [trainer.train_step() for _ in range(STEPS)]
    losses = trainer.reduce_losses([r.loss for r in results])
    return [(loss, float(r.grad_norm)) for loss, r in zip(losses, results)]


def relative_errors(grads, reference) -> dict[str, float]:
    errors = {}
    for name, grad in grads.items():
        ref = reference[name]
        if name == "wte.weight":  # the padded vocabulary rows of a tp layout
            grad, ref = grad[:1001], ref[:1001]
        errors[name] = ((grad - ref).norm() / ref.norm()).item()
    return errors


def check_schedules(rank, world_size, tp, pp, dp, sp, layers, run_dir):
    from megagpt.parallel.context import ParallelContext
    from megagpt.parallel.pipeline import max_alive_promised, schedule
    from megagpt.parallel.topology import Topology
    from megagpt.train import run

    ctx = ParallelContext.initialize(Topology(tp, dp, pp), rank, torch.device("cpu"))
    configs = {
        name: pipeline_config(tp, pp, 1, sp, layers, run_dir, f"parallel.pp_schedule={name}") for name in SCHEDULES
    }
    ref_loss, _, ref_grads = one_step_gradients(pipeline_config(1, 1, 1, False, layers, run_dir), ctx.single_process())
    one_f_one_b = one_step_gradients(pipeline_config(tp, pp, 1, sp, layers, run_dir, "parallel.pp_schedule=1f1b"), ctx)

    # B leaves every weight gradient to W, checked while one_step_gradients runs the step (the tp=1 output layer
    # computes its weight gradient in the forward and applies it in B).
    last_stage = ctx.pp_group.index == pp - 1
    allowed = {"0.wte.weight"} if tp == 1 and last_stage else set()
    original_build, watched = run.build_trainer, []

    def build_watched_trainer(*args, **kwargs):
        trainer = original_build(*args, **kwargs)
        watched.append(watch_backward_input(trainer, allowed))
        return trainer

    num_micro = 8 // dp
    histories = {}
    for name, cfg in configs.items():
        run.build_trainer = build_watched_trainer
        try:
            loss, record, grads = one_step_gradients(cfg, ctx)
        finally:
            run.build_trainer = original_build
        assert len(watched[-1]) == num_micro, watched[-1]
        assert abs(loss - ref_loss) / ref_loss < 1e-6, (name, loss, ref_loss)
        assert loss == pytest.approx(one_f_one_b[0], rel=1e-6), (name, loss, one_f_one_b[0])
        bad = {k: e for k, e in relative_errors(grads, ref_grads).items() if e > 1e-5}
        assert not bad, f"{name}: gradients differ from the single-process model: {bad}"
        bad = {k: e for k, e in relative_errors(grads, one_f_one_b[2]).items() if e > 1e-6}
        assert not bad, f"{name}: gradients differ from 1F1B's: {bad}"
        # The schedule ran as written (W included) and kept its memory promise.
        assert record.order == schedule(pp, 1, ctx.pp_group.index, num_micro, name)
        assert record.max_alive == max_alive_promised(pp, 1, ctx.pp_group.index, num_micro, name)
        histories[name] = train_history(cfg, ctx)
    return histories


@pytest.fixture(scope="module")
def reference_histories(tmp_path_factory):
    """The single process's 10 steps, per layer count, computed when a layout first asks."""
    from megagpt.parallel.context import ParallelContext

    run_dir, histories = str(tmp_path_factory.mktemp("zb-ref")), {}

    def history(layers: int):
        if layers not in histories:
            cfg = pipeline_config(1, 1, 1, False, layers, run_dir)
            histories[layers] = train_history(cfg, ParallelContext.single_process())
        return histories[layers]

    return history


@pytest.mark.parametrize(
    "tp, pp, dp, sp, layers", LAYOUTS, ids=[f"tp{t}-pp{p}-dp{d}-sp{int(s)}-L{n}" for t, p, d, s, n in LAYOUTS]
)
def test_zero_bubble_schedules_match_one_process_and_1f1b(tp, pp, dp, sp, layers, tmp_path, reference_histories):
    results = run_world(tp * pp * dp, check_schedules, tp, pp, dp, sp, layers, str(tmp_path / "run"))
    reference = reference_histories(layers)
    for rank, histories in enumerate(results):
        for name in SCHEDULES:
            assert len(histories[name]) == STEPS
            for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(histories[name], reference), 1):
                assert loss == pytest.approx(ref_loss, rel=1e-5), f"{name} rank {rank} step {step}"
                assert norm == pytest.approx(ref_norm, rel=1e-4), f"{name} rank {rank} step {step}"


def low_precision_histories(rank, world_size, run_dir):
    """{(precision, recompute): {schedule: (loss, grad norm) per step}} at pp 2 x dp 2 with ZeRO-1."""
    from megagpt.parallel.context import ParallelContext
    from megagpt.parallel.topology import Topology

    ctx = ParallelContext.initialize(Topology(1, 2, 2), rank, torch.device("cpu"))
    out = {}
    for precision, recompute in (("bf16", "selective"), ("fp16", "full")):
        extra = [f"train.precision={precision}", f"parallel.recompute={recompute}", "parallel.zero=1"]
        out[(precision, recompute)] = {
            name: train_history(
                pipeline_config(1, 2, 1, False, 4, run_dir, *extra, f"parallel.pp_schedule={name}"), ctx
            )
            for name in ("1f1b", "zb-h1")
        }
    return out


def test_zero_bubble_in_bf16_and_fp16_with_recompute_and_zero1_matches_1f1b(tmp_path):
    """W's low-precision path (bf16 and fp16 gradients formed first, then added into the fp32 main gradients, as
    autograd's are) under a real pipeline with data parallelism, ZeRO-1, recomputation and fp16 loss scaling:
    ZB-H1's losses and gradient norms are 1F1B's (fp32 parity with one process is checked above)."""
    results = run_world(4, low_precision_histories, str(tmp_path / "run"))
    for rank, runs in enumerate(results):
        for case, histories in runs.items():
            for step, (got, want) in enumerate(zip(histories["zb-h1"], histories["1f1b"]), 1):
                assert got[0] == pytest.approx(want[0], rel=1e-6), (case, rank, step)
                assert got[1] == pytest.approx(want[1], rel=1e-5, nan_ok=True), (case, rank, step)
