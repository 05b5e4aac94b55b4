"""Every tensor / sequence / data-parallel layout computes what one process computes (fp32, CPU, gloo).

One world per layout runs several checks: forward logits, every parameter's gradient gathered back to full
shape, the global gradient norm, the bucketed dp reduction, and the loss over 10 AdamW steps of the real
trainer. The vocabulary (1001) is one that tp does not divide, and num_heads = 2 * tp.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_config
from tests.distributed.harness import run_world

LAYOUTS = [  # (tp, dp, sequence_parallel)
    (2, 1, False),
    (4, 1, False),
    (1, 2, False),
    (2, 2, True),
    (4, 2, True),
]
STEPS = 10


def parity_config(tp: int, dp: int, sp: bool, run_dir: str, heads: int | None = None, dropout: float = 0.0):
    return tiny_config(
        "model.vocab_size=1001",
        f"model.num_heads={heads or 2 * tp}",
        "model.hidden_size=64",
        "model.num_layers=4",
        "model.seq_length=32",
        "model.local_window=8",
        f"model.dropout={dropout}",
        "train.global_batch_size=8",
        "train.micro_batch_size=2",
        f"train.iters={STEPS}",
        "train.eval_interval=5",
        "train.eval_iters=1",
        "optim.lr=3e-3",
        "optim.warmup_iters=2",
        "optim.clip_grad=0.5",  # low enough to clip: the norm must be right for the steps to match
        f"parallel.tp={tp}",
        f"parallel.sequence_parallel={str(sp).lower()}",
        "parallel.grad_bucket_mb=0.05",  # several buckets even for this tiny model
        f"logging.dir={run_dir}",
        "logging.log_interval=1",
        "logging.tensorboard=false",
    )


def full_tensor(param: torch.Tensor, like: torch.nn.Parameter, tp_group) -> torch.Tensor:
    """Gather a tensor-parallel parameter's (or its gradient's) slices back into the full tensor."""
    from megagpt.parallel.comm import all_gather
    from megagpt.parallel.params import spec_of

    spec = spec_of(like)
    if not spec.tp_split:
        return param
    return all_gather(param, spec.tp_split_dim, tp_group)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm().clamp_min(1e-12)).item()


def check_layout(rank: int, world_size: int, tp: int, dp: int, sp: bool, run_dir: str):
    from megagpt.model.build import build_model
    from megagpt.parallel.context import ParallelContext
    from megagpt.parallel.data_parallel import GradBuckets
    from megagpt.parallel.topology import Topology
    from megagpt.train.optimizer import MainParamOptimizer
    from megagpt.train.run import pretrain

    cfg = parity_config(tp, dp, sp, run_dir)
    ctx = ParallelContext.initialize(Topology(tp, dp, 1), rank, torch.device("cpu"))
    (reference,) = build_model(cfg, ParallelContext.single_process())
    (model,) = build_model(cfg, ctx)
    # A batch of 2 * dp samples: dp rank d takes samples [2d, 2d + 2), the reference all of them, so the
    # gradient check sees the dp reduction average different data.
    batch = torch.randint(0, 1001, (2 * dp, cfg.model.seq_length + 1), generator=torch.Generator().manual_seed(7))
    tokens = batch[2 * ctx.dp_group.index : 2 * ctx.dp_group.index + 2]

    # 1. The parameters are the reference's, sliced.
    ref_params = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        torch.testing.assert_close(
            full_tensor(param.detach(), param, ctx.tp_group), ref_params[name].detach(), rtol=0, atol=0
        )

    # 2. Forward logits over the real vocabulary.
    with torch.no_grad():
        logits, ref_logits = model(tokens[:, :-1]), reference(tokens[:, :-1])
    assert logits.shape == ref_logits.shape == (2, cfg.model.seq_length, 1001)
    assert relative_error(logits, ref_logits) < 1e-5, relative_error(logits, ref_logits)

    # 3. Gradients of the loss, through the real gradient path: buckets, then the sequence-parallel all-reduce.
    buckets = GradBuckets(model.parameters(), ctx.dp_group, bucket_bytes=0.05 * 2**20)
    optimizer = MainParamOptimizer(buckets, cfg.optim, ctx)
    ref_buckets = GradBuckets(reference.parameters(), ParallelContext.single_process().dp_group, 1e9)
    assert len(buckets.buckets) > 1
    buckets.start_step(1)
    loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    if dp > 1:
        # Every bucket's reduction started inside backward, the first while most gradients were still to come.
        assert all(b.launched for b in buckets.buckets)
        assert buckets.buckets[0].launched_after < len(buckets.params) // 2
        assert [b.launched_after for b in buckets.buckets] == sorted(b.launched_after for b in buckets.buckets)
    optimizer.finish_gradients()
    ref_loss = reference(batch[:, :-1], batch[:, 1:])
    ref_loss.backward()
    ref_buckets.finish()
    ref_local = reference(tokens[:, :-1], tokens[:, 1:])  # this dp rank's share of the batch
    assert abs(loss.item() - ref_local.item()) / ref_local.item() < 1e-6
    worst = {}
    for name, param in model.named_parameters():
        grad = full_tensor(param.main_grad, param, ctx.tp_group)
        ref_grad = ref_params[name].main_grad
        if name == "wte.weight":  # padding rows: zero in both, compare the real vocabulary
            assert grad[1001:].abs().max() == 0
            grad, ref_grad = grad[:1001], ref_grad[:1001]
        worst[name] = relative_error(grad, ref_grad)
    bad = {n: e for n, e in worst.items() if e > 1e-5}
    assert not bad, f"gradients differ from the single-process model: {bad}"

    # 4. The global norm counts each parameter once, whatever is split or replicated.
    norm = optimizer.grad_norm().item()
    ref_norm = torch.sqrt(sum(p.main_grad.pow(2).sum() for p in reference.parameters())).item()
    assert abs(norm - ref_norm) / ref_norm < 1e-5, (norm, ref_norm)

    # 5. Ten steps of the real trainer.
    state = pretrain(cfg, ctx)
    return [(row["loss"], row["grad_norm"], row.get("val_loss")) for row in state.history]


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory):
    """Single-process training curves, one per head count the layouts use."""
    from megagpt.parallel.context import ParallelContext
    from megagpt.train.run import pretrain

    runs = {}
    for tp in sorted({tp for tp, _, _ in LAYOUTS}):
        cfg = parity_config(1, 1, False, str(tmp_path_factory.mktemp(f"ref{tp}")), heads=2 * tp)
        state = pretrain(cfg, ParallelContext.single_process())
        runs[tp] = [(row["loss"], row["grad_norm"], row.get("val_loss")) for row in state.history]
    return runs


@pytest.mark.parametrize("tp, dp, sp", LAYOUTS, ids=[f"tp{t}-dp{d}-sp{int(s)}" for t, d, s in LAYOUTS])
def test_layout_matches_single_process(tp, dp, sp, tmp_path, reference_runs):
    results = run_world(tp * dp, check_layout, tp, dp, sp, str(tmp_path / "run"))
    reference = reference_runs[tp]
    assert len(reference) == STEPS
    for rank, history in enumerate(results):
        assert len(history) == STEPS
        for step, ((loss, norm, val), (ref_loss, ref_norm, ref_val)) in enumerate(zip(history, reference), 1):
            assert loss == pytest.approx(ref_loss, rel=1e-5), f"rank {rank} step {step}"
            assert norm == pytest.approx(ref_norm, rel=1e-4), f"rank {rank} step {step}"
            assert (val is None) == (ref_val is None)
            if val is not None:
                assert val == pytest.approx(ref_val, rel=1e-5), f"rank {rank} step {step}"
    # Random tokens cannot be learned, but the weights move: the losses spread by far more than the tolerance,
    # so the agreement is not between two flat lines.
    losses = [loss for loss, _, _ in reference]
    assert max(losses) - min(losses) > 1e-2
