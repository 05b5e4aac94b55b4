"""ZeRO-2 (gradients sharded over dp) and ZeRO-3 (parameters too) against the single process (CPU, gloo, fp32).

One dp=4 world checks zero 2 (both accumulation modes) and zero 3: every gradient of the first step, the loss and
gradient norm of 10 steps, 1/dp of the gradient (zero 2) and parameter (zero 3) bytes per rank, exact resume at
each level, a zero=0 dp=1 checkpoint loaded into zero 3 at dp 4 and back, and bf16 main weights (zero 3 follows
zero 1 to 1e-4). One tp 2 x pp 2 x dp 2 world with sequence parallelism checks both levels with recomputation.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed.harness import run_world
from tests.distributed.test_pipeline_parallel import pipeline_config

STEPS, RESUME_AT = 10, 5


def zero_config(tp, pp, sp, run_dir, *extra, steps=STEPS):
    # decay_iters fixed: a run stopped at RESUME_AT follows the schedule of the STEPS-step run it is compared to
    return pipeline_config(
        tp, pp, 1, sp, 4, str(run_dir), f"train.iters={steps}", f"optim.decay_iters={STEPS}", "train.eval_iters=0",
        *extra,
    )  # fmt: skip


def curve(state) -> list[tuple[float, float]]:
    return [(row["loss"], row["grad_norm"]) for row in state.history]


def full_gradients(trainer, ctx) -> dict[str, torch.Tensor]:
    """Every parameter's whole dp-reduced gradient after finish_gradients, whatever the zero level: the owned
    slices gathered over dp, the tensor-parallel shards over tp."""
    from megagpt.parallel.comm import all_gather, all_gather_flat
    from megagpt.parallel.params import spec_of

    buckets, flat = trainer.buckets, {}
    for bucket in buckets.buckets:
        whole = torch.zeros_like(bucket.buffer) if buckets.shard_grads else bucket.buffer.clone()
        low, high = buckets.owned_range(bucket)
        local = bucket.grad_shard if buckets.shard_grads else whole[low:high].clone()
        all_gather_flat(whole, ctx.dp_group, local=local if buckets.shard else None)
        for param, offset in zip(bucket.params, bucket.offsets):
            flat[param] = whole[offset : offset + param.numel()].view(param.shape)
    grads = {}
    for chunk in trainer.chunks:
        for name, param in chunk.named_parameters():
            grad = flat[param]
            if spec_of(param).tp_split:
                grad = all_gather(grad, spec_of(param).tp_split_dim, ctx.tp_group)
            grads[name] = grad
    return grads


def one_step_gradients(cfg, ctx):
    from megagpt.data.gpt_dataset import SyntheticDataset
    from megagpt.train.run import build_trainer

    data = SyntheticDataset(64, cfg.model.seq_length, cfg.model.vocab_size, seed=5)
    trainer = build_trainer(cfg, ctx, data, None, None)
    loss, _ = trainer.compute_gradients(cfg.train.global_batch_size)
    # numpy: a tensor would travel back from a spawned rank through shared memory its exit releases
    grads = {name: grad.numpy().copy() for name, grad in full_gradients(trainer, ctx).items()}
    return loss, grads, trainer.optimizer.grad_norm().item()


def pretrain_in(rank, topology, cfg):
    from megagpt.parallel.context import ParallelContext
    from megagpt.train.run import pretrain

    ctx = ParallelContext.initialize(topology, rank, torch.device("cpu"))
    state = pretrain(cfg, ctx)
    return curve(state), state.memory[rank]


def pretrain_loading_slices_only(rank, topology, cfg):
    """pretrain_in, failing if loading the checkpoint gives a full parameter buffer memory: at zero 3 each rank
    writes its slices straight from the checkpoint, so loading never holds more than one parameter whole."""
    from megagpt.checkpoint import load
    from megagpt.parallel import data_parallel, zero3

    originals = load.load_weights_and_optimizer, data_parallel.alloc_storage, zero3.alloc_storage
    loading = []

    def alloc_storage(tensor):
        assert not loading, f"loading a zero 3 checkpoint allocated a {tensor.numel()}-element full buffer"
        return originals[1](tensor)

    def load_weights_and_optimizer(*args):
        loading.append(True)
        try:
            return originals[0](*args)
        finally:
            loading.pop()

    load.load_weights_and_optimizer = load_weights_and_optimizer
    data_parallel.alloc_storage = zero3.alloc_storage = alloc_storage
    try:
        return pretrain_in(rank, topology, cfg)
    finally:
        load.load_weights_and_optimizer, data_parallel.alloc_storage, zero3.alloc_storage = originals


def dp4_world(rank, world_size, root, reference_checkpoint):
    from megagpt.parallel.context import ParallelContext
    from megagpt.parallel.topology import Topology

    root, topology = Path(root), Topology(1, 4, 1)
    ctx = ParallelContext.initialize(topology, rank, torch.device("cpu"))
    out = {"grads": {}}
    for zero, accumulate in ((2, "bucket"), (2, "slice"), (3, "bucket"), (3, "slice")):
        cfg = zero_config(
            1, 1, False, root / "grads", f"parallel.zero={zero}", f"parallel.zero_accumulate={accumulate}"
        )
        loss, grads, norm = one_step_gradients(cfg, ctx)
        out["grads"][(zero, accumulate)] = (loss, grads if rank == 0 else None, norm)
    for zero in (2, 3):
        save = [f"checkpoint.save_interval={RESUME_AT}", f"checkpoint.dir={root / f'ck{zero}'}"]
        cfg = zero_config(1, 1, False, root / f"whole{zero}", f"parallel.zero={zero}", *save)
        out[f"whole{zero}"], out[f"memory{zero}"] = pretrain_in(rank, topology, cfg)
        resume = [f"checkpoint.load={root / f'ck{zero}' / 'step_00000005'}", f"checkpoint.dir={root / f'ckr{zero}'}"]
        cfg = zero_config(1, 1, False, root / f"resumed{zero}", f"parallel.zero={zero}", *resume)
        out[f"resumed{zero}"], _ = pretrain_loading_slices_only(rank, topology, cfg)
    # A zero=0 dp=1 checkpoint goes on at zero=3 dp=4.
    load = [f"checkpoint.load={reference_checkpoint}", f"checkpoint.dir={root / 'ck_from_ref'}"]
    out["from_reference"], _ = pretrain_loading_slices_only(
        rank, topology, zero_config(1, 1, False, root / "fr", "parallel.zero=3", *load)
    )
    for zero in (1, 3):  # bf16 with fp32 main weights: zero 3 computes what zero 1 does
        cfg = zero_config(1, 1, False, root / f"bf16_{zero}", f"parallel.zero={zero}", "train.precision=bf16", steps=2)
        out[f"bf16_{zero}"], _ = pretrain_in(rank, topology, cfg)
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, zero=0: the first step's gradients, 10 steps' losses and norms, a checkpoint at step 5."""
    from megagpt.parallel.context import ParallelContext
    from megagpt.train.run import pretrain

    root = tmp_path_factory.mktemp("reference")
    ctx = ParallelContext.single_process()
    loss, grads, norm = one_step_gradients(zero_config(1, 1, False, root / "grads"), ctx)
    save = [f"checkpoint.save_interval={RESUME_AT}", f"checkpoint.dir={root / 'ck'}"]
    state = pretrain(zero_config(1, 1, False, root / "run", *save), ctx)
    return {
        "loss": loss, "grads": grads, "norm": norm, "curve": curve(state), "memory": state.memory[0],
        "checkpoint": root / "ck" / "step_00000005",
    }  # fmt: skip


def assert_same_gradients(grads, ref_grads, what):
    bad = {}
    for name, grad in grads.items():
        grad, ref = torch.from_numpy(grad), torch.from_numpy(ref_grads[name])
        if name == "wte.weight":  # the padded vocabulary rows differ with tp; they never reach the loss
            grad, ref = grad[:1001], ref[:1001]
        error = ((grad - ref).norm() / ref.norm()).item()
        if error > 1e-5:
            bad[name] = error
    assert not bad and len(grads) == len(ref_grads), f"{what}: gradients differ from one process: {bad}"


def assert_same_curve(got, want, what, rel=1e-5):
    assert len(got) == len(want), what
    for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(got, want), 1):
        assert loss == pytest.approx(ref_loss, rel=rel), f"{what} step {step}"
        assert norm == pytest.approx(ref_norm, rel=10 * rel), f"{what} step {step}"


def test_zero2_and_zero3_at_dp4_match_one_process_and_resume(tmp_path, reference):
    from megagpt.parallel.context import ParallelContext
    from megagpt.train.run import pretrain

    results = run_world(4, dp4_world, str(tmp_path), str(reference["checkpoint"]))
    for (zero, accumulate), (loss, grads, norm) in results[0]["grads"].items():
        assert loss == pytest.approx(reference["loss"], rel=1e-6), (zero, accumulate)
        assert norm == pytest.approx(reference["norm"], rel=1e-5), (zero, accumulate)
        assert_same_gradients(grads, reference["grads"], f"zero={zero} accumulate={accumulate}")
    whole_params, whole_grads = reference["memory"]["params_bytes"], reference["memory"]["grads_bytes"]
    for rank, out in enumerate(results):
        for zero in (2, 3):
            assert_same_curve(out[f"whole{zero}"], reference["curve"], f"rank {rank} zero={zero}")
            # Exact resume: the steps after the checkpoint are the uninterrupted run's, bit for bit.
            assert out[f"resumed{zero}"] == out[f"whole{zero}"][RESUME_AT:], f"rank {rank} zero={zero} resume"
            # Each rank keeps 1/dp of the fp32 gradients (zero 2, 3) and of the parameters (zero 3), padded.
            memory = out[f"memory{zero}"]
            assert memory["grads_bytes"] * 4 == pytest.approx(whole_grads, rel=1e-2)
            want_params = whole_params / 4 if zero == 3 else whole_params
            assert memory["params_bytes"] == pytest.approx(want_params, rel=1e-2)
        assert_same_curve(out["from_reference"], reference["curve"][RESUME_AT:], f"rank {rank} zero 0 -> zero 3")
        # Not bit for bit: the gradient norm sums other pieces in another order, and the clipped update's last-bit
        # differences can round a bf16 weight the other way (a step's loss moves by ~1e-3 here).
        assert_same_curve(out["bf16_3"], out["bf16_1"], f"rank {rank} bf16 zero 3 vs zero 1", rel=1e-4)
    # And back: the zero=3 dp=4 checkpoint goes on at zero=0 in one process.
    cfg = zero_config(
        1, 1, False, tmp_path / "back", f"checkpoint.load={tmp_path / 'ck3' / 'step_00000005'}",
        f"checkpoint.dir={tmp_path / 'ck_back'}",
    )  # fmt: skip
    back = curve(pretrain(cfg, ParallelContext.single_process()))
    assert_same_curve(back, reference["curve"][RESUME_AT:], "zero 3 dp 4 -> zero 0 dp 1")


def tp2_pp2_dp2_world(rank, world_size, run_dir):
    from megagpt.parallel.context import ParallelContext
    from megagpt.parallel.topology import Topology

    topology = Topology(2, 2, 2)
    ctx = ParallelContext.initialize(topology, rank, torch.device("cpu"))
    cfg = zero_config(2, 2, True, f"{run_dir}/grads", "parallel.zero=3")
    loss, grads, norm = one_step_gradients(cfg, ctx)
    out = {"loss": loss, "norm": norm, "grads": grads if (ctx.tp_group.index, ctx.dp_group.index) == (0, 0) else {}}
    for zero, recompute, steps in ((2, "selective", 4), (3, "full", 6)):
        cfg = zero_config(
            2, 2, True, f"{run_dir}/z{zero}", f"parallel.zero={zero}", f"parallel.recompute={recompute}", steps=steps
        )
        out[f"curve{zero}"], _ = pretrain_in(rank, topology, cfg)
    return out


def test_zero2_and_zero3_with_tensor_sequence_and_pipeline_parallelism(tmp_path, reference):
    results = run_world(8, tp2_pp2_dp2_world, str(tmp_path))
    stage_grads = {}
    for rank, out in enumerate(results):
        assert out["loss"] == pytest.approx(reference["loss"], rel=1e-6), rank
        assert out["norm"] == pytest.approx(reference["norm"], rel=1e-5), rank
        stage_grads.update(out["grads"])  # each pipeline stage's layers, once
        assert_same_curve(out["curve2"], reference["curve"][:4], f"rank {rank} zero=2 recompute selective")
        assert_same_curve(out["curve3"], reference["curve"][:6], f"rank {rank} zero=3 recompute full")
    assert_same_gradients(stage_grads, reference["grads"], "tp2 x pp2 x dp2 zero=3")
