"""Pipeline layouts compute what one process computes; the schedule keeps its order and memory bound; a dead
peer ends the step with an error instead of a hang (fp32, CPU, gloo)."""

from __future__ import annotations

import os
import time

import pytest
import torch

from tests.conftest import tiny_config
from tests.distributed.harness import DIED, run_world

LAYOUTS = [  # (tp, pp, dp, vpp, sequence_parallel, layers)
    (1, 2, 1, 1, False, 4),
    (1, 4, 1, 1, False, 4),
    (1, 2, 1, 2, False, 4),
    (1, 3, 1, 1, False, 6),
    (2, 2, 1, 1, False, 4),
    (2, 2, 2, 1, True, 4),
    (1, 2, 2, 2, False, 4),
]
STEPS = 10
# Layouts also run under logging.profile: (steps, ranks). Their traces must hold the named ranges.
PROFILED = {(1, 2, 1, 2, False, 4): ("4", "all"), (2, 2, 2, 1, True, 4): ("4", "[0,5]")}


def pipeline_config(tp, pp, vpp, sp, layers, run_dir, *extra):
    return tiny_config(
        "model.vocab_size=1001",
        "model.num_heads=4",
        "model.hidden_size=64",
        f"model.num_layers={layers}",
        "model.seq_length=32",
        "model.local_window=8",
        "train.global_batch_size=8",
        "train.micro_batch_size=1",
        f"train.iters={STEPS}",
        "train.eval_interval=5",
        "train.eval_iters=1",
        "optim.lr=3e-3",
        "optim.warmup_iters=2",
        "optim.clip_grad=0.5",
        f"parallel.tp={tp}",
        f"parallel.pp={pp}",
        f"parallel.vpp={vpp}",
        f"parallel.sequence_parallel={str(sp).lower()}",
        "parallel.grad_bucket_mb=0.05",
        f"logging.dir={run_dir}",
        "logging.log_interval=1",
        "logging.tensorboard=false",
        "parallel.timeout_s=120",  # a deadlock fails the test in minutes, not the default ten
        *extra,
    )


def one_step_gradients(cfg, ctx):
    """Run the first step's forward and backward; return its loss, record, and {name: full gradient}."""
    from megagpt.data.gpt_dataset import SyntheticDataset
    from megagpt.parallel.comm import all_gather
    from megagpt.parallel.params import spec_of
    from megagpt.train.run import build_trainer

    data = SyntheticDataset(64, cfg.model.seq_length, cfg.model.vocab_size, seed=5)
    trainer = build_trainer(cfg, ctx, data, None, None)
    loss, record = trainer.compute_gradients(cfg.train.global_batch_size)
    grads = {}
    for chunk in trainer.chunks:
        for name, param in chunk.named_parameters():
            grad = param.main_grad
            if spec_of(param).tp_split:
                grad = all_gather(grad, spec_of(param).tp_split_dim, ctx.tp_group)
            grads[name] = grad
    return loss, record, grads


def check_pipeline_layout(rank, world_size, tp, pp, dp, vpp, sp, layers, run_dir):
    from megagpt.parallel.context import ParallelContext
    from megagpt.parallel.pipeline import max_alive_promised, schedule, schedule_steps, virtual_stage
    from megagpt.parallel.topology import Topology
    from megagpt.train.run import pretrain

    steps, ranks = PROFILED.get((tp, pp, dp, vpp, sp, layers), (None, "all"))
    profile = [f"logging.profile={steps}", f"logging.profile_ranks={ranks}"] if steps else []
    cfg = pipeline_config(tp, pp, vpp, sp, layers, run_dir, *profile)
    ctx = ParallelContext.initialize(Topology(tp, dp, pp), rank, torch.device("cpu"))
    reference_cfg = pipeline_config(1, 1, 1, False, layers, run_dir)

    loss, record, grads = one_step_gradients(cfg, ctx)
    ref_loss, _, ref_grads = one_step_gradients(reference_cfg, ParallelContext.single_process())
    assert abs(loss - ref_loss) / ref_loss < 1e-6, (loss, ref_loss)
    bad = {}
    for name, grad in grads.items():
        ref = ref_grads[name]
        if name == "wte.weight":
            assert grad[1001:].abs().max() == 0
            grad, ref = grad[:1001], ref[:1001]
        error = ((grad - ref).norm() / ref.norm()).item()
        if error > 1e-5:
            bad[name] = error
    assert not bad, f"gradients differ from the single-process model: {bad}"
    # The rank holds exactly its layers, and the stages together hold every layer once.
    assert len(grads) < len(ref_grads) or pp == 1

    # The schedule ran as written and kept its memory promise, sent tensors included.
    num_micro = cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)
    pp_rank = ctx.pp_group.index
    assert record.order == schedule(pp, vpp, pp_rank, num_micro)
    promised = max_alive_promised(pp, vpp, pp_rank, num_micro)
    assert record.max_alive <= promised, (record.max_alive, promised)
    # One batched exchange after each step (and one before the first), none where a rank has nothing to move.
    steps = schedule_steps(pp, vpp, pp_rank, num_micro)
    assert record.exchanges <= len(steps) + 1 and (record.exchanges > 0) == (pp > 1)
    if vpp == 1 and num_micro >= pp:
        assert record.max_alive == pp - pp_rank
    events = [
        (a.kind, virtual_stage(pp, pp_rank, a.chunk), a.micro_batch, start, end) for a, start, end in record.events
    ]

    state = pretrain(cfg, ctx)
    history = [(row["loss"], row["grad_norm"], row.get("val_loss")) for row in state.history]
    return history, events, ctx.dp_group.index, ctx.tp_group.index


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory):
    from megagpt.parallel.context import ParallelContext
    from megagpt.train.run import pretrain

    runs = {}
    for layers in sorted({layout[-1] for layout in LAYOUTS}):
        cfg = pipeline_config(1, 1, 1, False, layers, str(tmp_path_factory.mktemp(f"ref{layers}")))
        runs[layers] = [
            (r["loss"], r["grad_norm"], r.get("val_loss"))
            for r in pretrain(cfg, ParallelContext.single_process()).history
        ]
    return runs


@pytest.mark.parametrize(
    "tp, pp, dp, vpp, sp, layers",
    LAYOUTS,
    ids=[f"tp{t}-pp{p}-dp{d}-vpp{v}-sp{int(s)}-L{n}" for t, p, d, v, s, n in LAYOUTS],
)
def test_pipeline_layout_matches_single_process(tp, pp, dp, vpp, sp, layers, tmp_path, reference_runs):
    results = run_world(tp * pp * dp, check_pipeline_layout, tp, pp, dp, vpp, sp, layers, str(tmp_path / "run"))
    reference = reference_runs[layers]
    # Across the ranks of one pipeline, each micro-batch's forward on a stage began only after the previous
    # stage's forward of it ended, and its backward only after the next stage's backward: data really flowed
    # stage to stage in the schedule's order.
    timeline = {}
    for _, events, dp_index, tp_index in results:
        if (dp_index, tp_index) == (0, 0):
            for kind, stage, m, start, end in events:
                timeline[(kind, stage, m)] = (start, end)
    last = pp * vpp - 1
    assert len(timeline) == 2 * (last + 1) * (8 // dp)
    for (kind, stage, m), (start, _) in timeline.items():
        if kind == "F" and stage > 0:
            assert start >= timeline[("F", stage - 1, m)][1]
        if kind == "B" and stage < last:
            assert start >= timeline[("B", stage + 1, m)][1]
    if (tp, pp, dp, vpp, sp, layers) in PROFILED:
        check_traces((tp, pp, dp, vpp, sp, layers), tmp_path / "run")
    for rank, (history, _, _, _) in enumerate(results):
        assert len(history) == STEPS
        for step, ((loss, norm, val), (ref_loss, ref_norm, ref_val)) in enumerate(zip(history, reference), 1):
            assert loss == pytest.approx(ref_loss, rel=1e-5), f"rank {rank} step {step}"
            assert norm == pytest.approx(ref_norm, rel=1e-4), f"rank {rank} step {step}"
            if val is not None or ref_val is not None:
                assert val == pytest.approx(ref_val, rel=1e-5), f"rank {rank} step {step}"


def check_traces(layout, run_dir):
    """The profiled ranks wrote Chrome traces of their window holding the schedule's named ranges, and the timeline
    read back from them is each rank's schedule in order."""
    import json

    from megagpt.config import profile_steps
    from megagpt.parallel.pipeline import schedule
    from megagpt.parallel.topology import Topology
    from megagpt.timeline import read_timeline

    tp, pp, dp, vpp, _, _ = layout
    steps, ranks = PROFILED[layout]
    first, last = profile_steps(tiny_config(f"logging.profile={steps}").logging)
    topology = Topology(tp, dp, pp)
    profiled = range(topology.world_size) if ranks == "all" else json.loads(ranks)
    names = sorted(path.name for path in (run_dir / "traces").iterdir())
    assert names == sorted(f"rank{rank}_steps{first}-{last}.json" for rank in profiled)
    num_micro = 8 // dp
    for rank in profiled:
        trace = json.loads((run_dir / "traces" / f"rank{rank}_steps{first}-{last}.json").read_text())
        ranges = [e["name"] for e in trace["traceEvents"] if e.get("cat") == "user_annotation"]
        pp_rank = topology.coords(rank)[2]
        actions = [a.label for a in schedule(pp, vpp, pp_rank, num_micro)]
        assert [r for r in ranges if r in set(actions)] == actions * (last - first + 1), f"rank {rank}"
        assert [f"step {s}" for s in range(first, last + 1)] == [r for r in ranges if r.startswith("step ")]
        assert any(r.startswith("p2p send") for r in ranges) and any(" recv " in r for r in ranges)
        if tp > 1:
            assert {
                "tp reduce-scatter (ReduceScatterToSequence forward)",
                "tp all-gather (sequence-parallel linear forward)",
            } <= set(ranges)
        if dp > 1:
            assert {"dp all-reduce bucket 0", "dp wait bucket 0"} <= set(ranges)
    timeline = read_timeline(run_dir)
    assert timeline.step == last and [row.rank for row in timeline.rows] == list(profiled)
    for row in timeline.rows:
        expected = [
            (a.kind, a.micro_batch, a.chunk) for a in schedule(pp, vpp, topology.coords(row.rank)[2], num_micro)
        ]
        assert [(b.kind, b.micro_batch, b.chunk) for b in row.blocks] == expected
        assert all(b.start_ms < b.end_ms <= next_.start_ms for b, next_ in zip(row.blocks, row.blocks[1:]))
        assert 0 < row.idle_fraction < 1


def die_mid_step(rank, world_size, run_dir):
    """Rank 1 dies in the middle of its third forward; rank 0 must fail with a named error, not hang."""
    from megagpt.data.gpt_dataset import SyntheticDataset
    from megagpt.parallel.context import ParallelContext
    from megagpt.parallel.pipeline import PipelineError
    from megagpt.parallel.topology import Topology
    from megagpt.train.run import build_trainer

    cfg = pipeline_config(1, 2, 1, False, 4, run_dir, "parallel.timeout_s=30")
    ctx = ParallelContext.initialize(Topology(1, 1, 2), rank, torch.device("cpu"))
    data = SyntheticDataset(64, cfg.model.seq_length, cfg.model.vocab_size, seed=5)
    trainer = build_trainer(cfg, ctx, data, None, None)
    calls = []
    original = trainer.forward

    def forward(chunk, x, labels):
        calls.append(1)
        if rank == 1 and len(calls) == 3:
            os._exit(1)  # the process vanishes mid-step, as after a crash or an OOM kill
        return original(chunk, x, labels)

    trainer.forward = forward
    start = time.monotonic()
    try:
        trainer.train_step()
    except PipelineError as e:
        return str(e), time.monotonic() - start
    return "no error", time.monotonic() - start


def test_a_dead_peer_ends_the_step_with_a_named_error(tmp_path):
    results = run_world(2, die_mid_step, str(tmp_path), allow_deaths=True, timeout=120)
    assert results[1] == DIED
    message, seconds = results[0]
    assert message.startswith("pipeline stage 0 (rank 0) "), message
    assert "rank 1" in message and ("receiving" in message or "sending" in message), message
    assert seconds < 30 + 10  # within the configured timeout


def mismatched_configs(rank, world_size, run_dir):
    """Rank 1 is launched with another sequence length: both ranks must refuse before any transfer."""
    from megagpt.errors import UserError
    from megagpt.parallel.context import ParallelContext
    from megagpt.parallel.topology import Topology
    from megagpt.train.run import pretrain

    seq = 32 if rank == 0 else 16
    cfg = pipeline_config(1, 2, 1, False, 4, run_dir, f"model.seq_length={seq}")
    ctx = ParallelContext.initialize(Topology(1, 1, 2), rank, torch.device("cpu"))
    try:
        pretrain(cfg, ctx)
    except UserError as e:
        return str(e)
    return "no error"


def test_ranks_with_different_configs_refuse_to_start(tmp_path):
    messages = run_world(2, mismatched_configs, str(tmp_path), timeout=120)
    for message in messages:
        assert message.startswith("ranks [1] run a different config than rank 0"), message
    assert not (tmp_path / "metrics.jsonl").exists()


def hang_mid_step(rank, world_size, run_dir):
    """Rank 1 stays alive but stops answering for longer than parallel.timeout_s; rank 0 must time out by name."""
    from megagpt.data.gpt_dataset import SyntheticDataset
    from megagpt.parallel.context import ParallelContext
    from megagpt.parallel.topology import Topology
    from megagpt.train.run import build_trainer

    cfg = pipeline_config(1, 2, 1, False, 4, run_dir, "parallel.timeout_s=3")
    ctx = ParallelContext.initialize(Topology(1, 1, 2), rank, torch.device("cpu"))
    trainer = build_trainer(cfg, ctx, SyntheticDataset(64, 32, 1001, seed=5), None, None)
    original, calls = trainer.forward, []

    def forward(chunk, x, labels):
        calls.append(1)
        if rank == 1 and len(calls) == 2:
            time.sleep(8)  # alive, but stuck
        return original(chunk, x, labels)

    trainer.forward = forward
    start = time.monotonic()
    try:
        trainer.train_step()
    except Exception as e:  # rank 1 finds rank 0 gone once it wakes up
        return f"{type(e).__name__}: {e}", time.monotonic() - start
    return "no error", time.monotonic() - start


def test_a_hung_peer_ends_the_step_after_the_timeout(tmp_path):
    results = run_world(2, hang_mid_step, str(tmp_path), timeout=120)
    message, seconds = results[0]
    assert message.startswith("PipelineError: pipeline stage 0 (rank 0) timed out after 3s"), message
    assert 3 <= seconds < 3 + 4


def dropout_streams_per_stage(rank, world_size):
    from megagpt.model.build import build_model
    from megagpt.parallel.comm import all_gather
    from megagpt.parallel.context import ParallelContext
    from megagpt.parallel.topology import Topology

    ctx = ParallelContext.initialize(Topology(1, 1, 2), rank, torch.device("cpu"))
    (chunk,) = build_model(pipeline_config(1, 2, 1, False, 4, "unused", "model.dropout=0.5"), ctx)
    default = torch.rand(8)
    with next(iter(chunk.blocks.values())).attn.split_rng():
        split = torch.rand(8)
    draws = all_gather(torch.stack([default, split]).unsqueeze(0), 0, ctx.pp_group)
    assert not torch.equal(draws[0][0], draws[1][0]), "the two pipeline stages drew the same default-stream numbers"
    assert not torch.equal(draws[0][1], draws[1][1]), "the two pipeline stages drew the same split-stream numbers"


def test_pipeline_stages_draw_different_dropout_masks():
    run_world(2, dropout_streams_per_stage)  # each rank asserts; a failure names the rank and the check
