"""What one transformer layer keeps for backward, measured, against the planner (megagpt/estimate.py).

This test calibrates tools/estimate.py's activation memory: at tp = 1, 2, 4, with and without sequence
parallelism, for recompute none / selective / full, dense and local layers, with and without dropout, the bytes
one layer keeps alive between its forward and its backward (counted by the allocation tracker: every storage
created in the forward that is still alive when it returns, the layer's input included, its output excluded)
agree with estimate.layer_activation_bytes within 5%.

5% is the issue's bar; what the planner leaves out is smaller than that at these sizes: a few small tensors
(softmax statistics, about a / h of s b h; recomputation's saved RNG states, about 5 KB) that do not grow with
the layer. The sizes (h = 256, 8 heads, s = 256, b = 4) keep them under 2% of the smallest case (full
recomputation at tp = 4 with sequence parallelism: s b h / 4 elements).
"""

from __future__ import annotations

import gc
import time

import torch

from tests.distributed.harness import run_world

# 8 heads: two per rank at tp = 4, as every GPT-3 layout has several (96 / 8). With a single head per rank the CPU
# math path keeps the q, k, v views' storage besides its own copies, half an s b h / t more than planned.
HIDDEN, HEADS, SEQ, MICRO, WINDOW = 256, 8, 256, 4, 64
TOLERANCE = 0.05  # the bar on measured / planned - 1


def layer_config(recompute: str, dropout: float, pattern: str):
    from megagpt.config import config_from_dict

    return config_from_dict(
        {"preset": "tiny-cpu"},
        [f"model.hidden_size={HIDDEN}", f"model.num_heads={HEADS}", f"model.seq_length={SEQ}",
         f"model.dropout={dropout}", f"model.attention_pattern=[{pattern}]", f"model.local_window={WINDOW}",
         f"parallel.recompute={recompute}", "train.device=cpu"],
    )  # fmt: skip


def settled_bytes(tracker, y: torch.Tensor, planned: float) -> int:
    """What the forward left alive besides its output, once nothing outside the graph holds a tensor.

    gloo's worker thread marks an all-reduce complete (which wakes the caller) before it drops its own
    reference to the work, and with it the work's tensor. On a loaded machine that thread can be descheduled in
    between, and the layer's last all-reduced tensor, already dead to Python, is counted as kept (CI saw one
    extra s b h so). A reading that disagrees with the plan is taken again for up to a second: a real excess
    stays, a transient one goes."""
    deadline = time.monotonic() + 1.0
    while True:
        gc.collect()  # what only an unreachable cycle holds is not kept for backward
        kept = tracker.live - y.untyped_storage().nbytes()
        if abs(kept / planned - 1) <= TOLERANCE or time.monotonic() > deadline:
            return kept
        time.sleep(0.01)


def measure_layers(rank: int, world_size: int) -> list[tuple]:
    """(tp, sp, recompute, dropout, pattern, measured bytes, planned bytes) for every case, on this rank."""
    from megagpt.estimate import layer_activation_bytes
    from megagpt.model.gpt import GPT
    from megagpt.parallel.context import ParallelContext
    from megagpt.parallel.random import TensorParallelRNG
    from megagpt.parallel.topology import Topology
    from megagpt.train.memory import AllocationTracker

    rows = []
    for tp in (1, 2, 4):
        ctx = ParallelContext.initialize(Topology(tp, world_size // tp, 1), rank, torch.device("cpu"))
        if rank >= tp:  # only rank 0's tensor-parallel group is read: the other groups would measure the same
            continue
        for sp in (False, True) if tp > 1 else (False,):
            for recompute in ("none", "selective", "full"):
                for dropout in (0.0, 0.1):
                    for pattern in ("dense", "local"):
                        cfg = layer_config(recompute, dropout, pattern)
                        rng = TensorParallelRNG(1, ctx.tp_group.index, ctx.device)
                        layer = GPT(cfg.model, ctx.tp_group, layers=range(1), pre_process=False,
                                    post_process=False, sequence_parallel=sp, rng=rng, init_seed=1,
                                    recompute=cfg.parallel.recompute)  # fmt: skip
                        window = WINDOW if pattern == "local" else None
                        planned = layer_activation_bytes(cfg, tp, sp, window, MICRO)
                        x0 = torch.randn(MICRO, SEQ // tp if sp else SEQ, HIDDEN)
                        tracker = AllocationTracker()
                        with tracker:
                            x = x0.clone().requires_grad_()  # made inside: the layer's input counts
                            y = layer(x)
                            kept = settled_bytes(tracker, y, planned)
                        y.sum().backward()  # the graph was complete: backward runs
                        rows.append((tp, sp, recompute, dropout, pattern, kept, planned))
    return rows


def test_one_layer_keeps_what_the_planner_says():
    rows = run_world(4, measure_layers)[0]
    assert len(rows) == 5 * 3 * 2 * 2
    off = [row for row in rows if abs(row[5] / row[6] - 1) > TOLERANCE]
    assert not off, "measured vs planned bytes off by more than 5%: " + "; ".join(
        f"tp {tp} sp {sp} {recompute} dropout {dropout} {pattern}: {kept} vs {planned:.0f}"
        for tp, sp, recompute, dropout, pattern, kept, planned in off
    )
    sbh = SEQ * MICRO * HIDDEN * 4  # one s b h tensor in fp32
    kept = {row[:5]: row[5] / sbh for row in rows}
    # Sequence parallelism divides everything a layer keeps by tp: no full-sequence copy stays alive (the
    # column-parallel layers keep their input shard). Without it the LayerNorm and column-parallel inputs stay
    # whole on every rank: 4 + 12 / tp.
    for tp in (2, 4):
        assert abs(kept[(tp, True, "selective", 0.0, "dense")] - 16 / tp) < 0.05
        assert abs(kept[(tp, False, "selective", 0.0, "dense")] - (4 + 12 / tp)) < 0.05
        assert abs(kept[(tp, True, "full", 0.0, "dense")] - 1 / tp) < 0.02
