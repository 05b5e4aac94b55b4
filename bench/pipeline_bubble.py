"""The pipeline bubble on CPU: how long each stage waits, measured, next to what the schedules predict.

    python bench/pipeline_bubble.py [--steps 3] [--hidden 256] [--seq 256]

For pp = 2 and 4 (and the interleaved schedule with vpp = 2) and m micro-batches per step, every rank times its
forward and backward compute ("busy") and the whole step ("wall"). The bubble is the waiting per unit of work,
(wall - busy) / busy, averaged over the stages: 1F1B predicts (p - 1) / m, interleaved 1F1B (p - 1) / (v m).
One thread per process; with pp = 4 four processes share this machine's cores, which the busy time absorbs
as long as waiting ranks sleep.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

# The multi-process harness is a test helper (tests/local_world.py): import it from the checkout's root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def bubble_config(pp: int, vpp: int, m: int, steps: int, hidden: int, seq: int):
    from megagpt.config import config_from_dict

    return config_from_dict(
        {"preset": "tiny-cpu"},
        [
            "model.num_layers=8",
            f"model.hidden_size={hidden}",
            "model.num_heads=4",
            f"model.seq_length={seq}",
            "model.vocab_size=1024",
            "model.make_vocab_size_divisible_by=1",
            "train.micro_batch_size=1",
            f"train.global_batch_size={m}",
            f"train.iters={steps + 1}",
            f"parallel.pp={pp}",
            f"parallel.vpp={vpp}",
            "logging.tensorboard=false",
        ],
    )


def _stage_worker(rank: int, world_size: int, vpp: int, m: int, steps: int, hidden: int, seq: int):
    from megagpt.data.gpt_dataset import SyntheticDataset
    from megagpt.parallel.context import ParallelContext
    from megagpt.parallel.topology import Topology
    from megagpt.train.run import build_trainer

    cfg = bubble_config(world_size, vpp, m, steps, hidden, seq)
    ctx = ParallelContext.initialize(Topology(1, 1, world_size), rank, torch.device("cpu"))
    data = SyntheticDataset(m * (steps + 1), cfg.model.seq_length, cfg.model.vocab_size, 0)
    trainer = build_trainer(cfg, ctx, data, None, None)
    trainer.compute_gradients(m)  # warm-up
    trainer.buckets.zero()
    busy, wall = 0.0, 0.0
    for _ in range(steps):
        start = time.perf_counter()
        _, record = trainer.compute_gradients(m)
        wall += time.perf_counter() - start
        busy += record.busy_s
        trainer.buckets.zero()
    return busy, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()
    from tests.local_world import run_world

    print(
        f"GPT 8 layers, hidden {args.hidden}, seq {args.seq}, vocab 1024, micro-batch 1, fp32; "
        f"mean of {args.steps} steps; "
        f"torch {torch.__version__}"
    )
    print("| pp | vpp | m | measured bubble (wall - busy) / busy | predicted (p-1)/(v m) | step wall time (s) |")
    print("|---|---|---|---|---|---|")
    for pp, vpp, m in [(2, 1, 4), (2, 1, 8), (2, 2, 4), (2, 2, 8), (4, 1, 4), (4, 1, 8), (4, 2, 8)]:
        stages = run_world(pp, _stage_worker, vpp, m, args.steps, args.hidden, args.seq, timeout=1200)
        measured = statistics.mean((wall - busy) / busy for busy, wall in stages)
        wall = statistics.mean(wall for _, wall in stages) / args.steps
        print(f"| {pp} | {vpp} | {m} | {measured:.2f} | {(pp - 1) / (vpp * m):.2f} | {wall:.3f} |")


if __name__ == "__main__":
    main()
