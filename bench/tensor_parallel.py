"""Tensor parallelism on CPU: step time at tp=1 and tp=2, and the collectives each step issues.

    python bench/tensor_parallel.py [--steps 5] [--hidden 256] [--layers 4] [--seq 256]

Runs the same tiny GPT (synthetic data, fp32, AdamW) three ways in one go: one process with 1 thread, one
process with 2 threads, and tp=2 as two processes with 1 thread each (the same cores as the second), and prints
the mean step time of each, the ratios, and per step the number and bytes of every collective. On a CPU
tensor parallelism is about correctness, not speed: the numbers show what it costs in communication.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

# The multi-process harness is a test helper (tests/local_world.py): import it from the checkout's root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def bench_config(args, tp: int, sp: bool):
    from megagpt.config import config_from_dict

    return config_from_dict(
        {"preset": "tiny-cpu"},
        [
            f"model.hidden_size={args.hidden}",
            f"model.num_layers={args.layers}",
            f"model.seq_length={args.seq}",
            "model.num_heads=8",
            "model.local_window=64",
            "train.global_batch_size=8",
            "train.micro_batch_size=4",
            f"train.iters={args.steps + 1}",
            f"parallel.tp={tp}",
            f"parallel.sequence_parallel={str(sp).lower()}",
            "logging.tensorboard=false",
            "logging.log_interval=1000",
        ],
    )


def measure(cfg, ctx, steps: int) -> dict:
    from megagpt.data.gpt_dataset import SyntheticDataset
    from megagpt.parallel.comm import comm_stats, reset_comm_stats
    from megagpt.train.run import build_trainer

    data = SyntheticDataset(cfg.train.global_batch_size * (steps + 1), cfg.model.seq_length, cfg.model.vocab_size, 0)
    trainer = build_trainer(cfg, ctx, data, None, None)
    trainer.train_step()  # warm-up
    reset_comm_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - t0)
    return {
        "step_s": statistics.mean(times),
        "calls": {k: v / steps for k, v in comm_stats["calls"].items()},
        "bytes": {k: v / steps for k, v in comm_stats["bytes"].items()},
    }


def _tp_worker(rank: int, world_size: int, args, sp: bool) -> dict:
    from megagpt.parallel.context import ParallelContext
    from megagpt.parallel.topology import Topology

    ctx = ParallelContext.initialize(Topology(2, 1, 1), rank, torch.device("cpu"))
    return measure(bench_config(args, 2, sp), ctx, args.steps)


def run_tp2(args, sp: bool) -> dict:
    from tests.local_world import run_world

    return run_world(2, _tp_worker, args, sp, timeout=1200)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()

    from megagpt.parallel.context import ParallelContext

    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        rows.append(
            (
                f"tp=1, 1 process x {threads} thread(s)",
                measure(bench_config(args, 1, False), ParallelContext.single_process(), args.steps),
            )
        )
    rows.append(("tp=2, 2 processes x 1 thread", run_tp2(args, sp=False)))
    rows.append(("tp=2 + sequence parallel, 2 x 1 thread", run_tp2(args, sp=True)))

    tokens = 8 * args.seq
    print(
        f"GPT {args.layers} layers, hidden {args.hidden}, seq {args.seq}, global batch 8 (micro 4), fp32, "
        f"vocab 50257; mean of {args.steps} steps; torch {torch.__version__}, {os.cpu_count()} cores"
    )
    base = rows[1][1]["step_s"]
    print("| layout | step time (s) | tokens/s | vs tp=1 (2 threads) | collectives per step (calls, MB) |")
    print("|---|---|---|---|---|")
    for name, r in rows:
        comms = ", ".join(f"{op} {r['calls'][op]:.0f} ({r['bytes'][op] / 2**20:.1f} MB)" for op in sorted(r["calls"]))
        print(
            f"| {name} | {r['step_s']:.3f} | {tokens / r['step_s']:,.0f} | {base / r['step_s']:.2f}x | "
            f"{comms or 'none'} |"
        )


if __name__ == "__main__":
    main()
