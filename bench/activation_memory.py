"""Activation memory on CPU, measured with the allocation tracker, next to the planner (megagpt/estimate.py).

    python bench/activation_memory.py [--hidden 256] [--heads 8] [--seq 256] [--micro 4]

1. Per layer: the bytes one transformer layer keeps between forward and backward, in units of s b h elements
   (fp32, no dropout, dense), at tp = 1, 2, 4, with and without sequence parallelism, for recompute none /
   selective / full, with the planner's figure beside each.
2. A 4-layer model at tp = 2 with sequence parallelism (embeddings, 4 layers, output layer and loss): what the
   forward leaves alive for backward, and the peak of forward + backward, in MiB.

Runs in one gloo world of 4 CPU processes (tp = 1 and 2 on sub-groups of it).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository, for tests/

MIB = 2**20


def layer_config(args, recompute: str, layers: int = 1):
    from megagpt.config import config_from_dict

    return config_from_dict(
        {"preset": "tiny-cpu"},
        [f"model.hidden_size={args.hidden}", f"model.num_heads={args.heads}", f"model.seq_length={args.seq}",
         f"model.num_layers={layers}", "model.dropout=0.0", "model.attention_pattern=[dense]",
         "model.vocab_size=2048", f"parallel.recompute={recompute}", "train.device=cpu"],
    )  # fmt: skip


def kept_after_forward(fn, *args) -> tuple[int, int]:
    """(bytes alive after fn(*args) that were created inside it, less its output; the peak) under the tracker."""
    from megagpt.train.memory import AllocationTracker

    tracker = AllocationTracker()
    with tracker:
        out = fn(*args)
        gc.collect()
        kept = tracker.live - out.untyped_storage().nbytes()
        out.sum().backward()
    return kept, tracker.peak


def measure(rank: int, world_size: int, args) -> dict:
    from megagpt.estimate import layer_activation_bytes
    from megagpt.model.gpt import GPT
    from megagpt.parallel.context import ParallelContext
    from megagpt.parallel.random import TensorParallelRNG
    from megagpt.parallel.topology import Topology

    torch.manual_seed(0)
    rows, model_rows = [], []
    sbh = args.seq * args.micro * args.hidden * 4
    for tp in (1, 2, 4):
        ctx = ParallelContext.initialize(Topology(tp, world_size // tp, 1), rank, torch.device("cpu"))
        for sp in (False, True) if tp > 1 else (False,):
            seq = args.seq // tp if sp else args.seq
            for recompute in ("none", "selective", "full"):
                cfg = layer_config(args, recompute)
                rng = TensorParallelRNG(1, ctx.tp_group.index, ctx.device)
                layer = GPT(cfg.model, ctx.tp_group, layers=range(1), pre_process=False, post_process=False,
                            sequence_parallel=sp, rng=rng, init_seed=1, recompute=recompute)  # fmt: skip
                x0 = torch.randn(args.micro, seq, args.hidden)
                kept, _ = kept_after_forward(lambda net, x: net(x.clone().requires_grad_()), layer, x0)
                planned = layer_activation_bytes(cfg, tp, sp, None, args.micro)
                rows.append((tp, sp, recompute, kept / sbh, planned / sbh))
        if tp == 2:
            for recompute in ("none", "selective"):
                cfg = layer_config(args, recompute, layers=4)
                rng = TensorParallelRNG(1, ctx.tp_group.index, ctx.device)
                model = GPT(cfg.model, ctx.tp_group, sequence_parallel=True, rng=rng, init_seed=1,
                            recompute=recompute)  # fmt: skip
                tokens = torch.randint(0, 2048, (args.micro, args.seq))
                kept, peak = kept_after_forward(lambda net, ids: net(ids, ids).reshape(1), model, tokens)
                model_rows.append((recompute, kept / MIB, peak / MIB))
    return {"layers": rows, "model": model_rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--micro", type=int, default=4)
    args = parser.parse_args()
    from tests.distributed.harness import run_world

    result = run_world(4, measure, args)[0]
    print(f"one layer, kept for backward, in s b h fp32 elements (h={args.hidden}, s={args.seq}, b={args.micro})")
    print("| tp | sequence parallel | recompute | measured | planner | measured / planner |")
    print("|---|---|---|---|---|---|")
    for tp, sp, recompute, kept, planned in result["layers"]:
        print(f"| {tp} | {sp} | {recompute} | {kept:.2f} | {planned:.2f} | {kept / planned:.3f} |")
    print("\n4 layers + embeddings + output layer and loss, tp=2 with sequence parallelism (MiB, per rank)")
    print("| recompute | kept after forward | peak of forward + backward |")
    print("|---|---|---|")
    for recompute, kept, peak in result["model"]:
        print(f"| {recompute} | {kept:.1f} | {peak:.1f} |")


if __name__ == "__main__":
    main()
