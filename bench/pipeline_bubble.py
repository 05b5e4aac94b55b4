"""The pipeline bubble on CPU: how long each stage waits, measured, next to what the schedules predict.

    python bench/pipeline_bubble.py [--steps 3] [--hidden 256] [--seq 256] [--dropout 0.0]

For pp = 2 and 4 and m = 4 and 8 micro-batches per step, one world per (pp, m) runs every schedule in turn on the
same processes: 1F1B, interleaved 1F1B (vpp = 2), and the zero-bubble ZB-H1 and ZB-H2. Every rank times its
compute (forwards, backwards, and the zero-bubble weight passes: "busy") and the whole step ("wall"). The bubble
is the waiting per unit of work, (wall - busy) / busy, averaged over the stages; the prediction is
pipeline.predicted_bubble: (p - 1) / m, (p - 1) / (v m), and (p - 1) / (3 m) for the zero-bubble schedules.
Peak memory is the most any stage's step allocated beyond what it held before the step (the allocation tracker,
train/memory.py), measured in one extra step. One thread per process; with pp = 4 four processes share this
machine's cores, which the busy time absorbs as long as waiting ranks sleep.
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


SCHEDULES = ("1f1b", "interleaved", "zb-h1", "zb-h2")


def bubble_config(pp: int, schedule: str, m: int, steps: int, hidden: int, seq: int, dropout: float = 0.0):
    from megagpt.config import config_from_dict

    return config_from_dict(
        {"preset": "tiny-cpu"},
        [
            "model.num_layers=8",
            f"model.hidden_size={hidden}",
            "model.num_heads=4",
            f"model.seq_length={seq}",
            f"model.dropout={dropout}",
            "model.vocab_size=1024",
            "model.make_vocab_size_divisible_by=1",
            "train.micro_batch_size=1",
            f"train.global_batch_size={m}",
            f"train.iters={steps + 2}",
            f"parallel.pp={pp}",
            f"parallel.vpp={2 if schedule == 'interleaved' else 1}",
            f"parallel.pp_schedule={schedule}",
            "logging.tensorboard=false",
        ],
    )


def _stage_worker(rank: int, world_size: int, m: int, steps: int, hidden: int, seq: int, dropout: float):
    """Every schedule on this rank, one after the other: {schedule: (busy s, wall s, peak bytes)}."""
    from megagpt.data.gpt_dataset import SyntheticDataset
    from megagpt.parallel.context import ParallelContext
    from megagpt.parallel.topology import Topology
    from megagpt.train.memory import step_peak
    from megagpt.train.run import build_trainer

    ctx = ParallelContext.initialize(Topology(1, 1, world_size), rank, torch.device("cpu"))
    results = {}
    for schedule in SCHEDULES:
        cfg = bubble_config(world_size, schedule, m, steps, hidden, seq, dropout)
        data = SyntheticDataset(m * (steps + 2), cfg.model.seq_length, cfg.model.vocab_size, 0)
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
        with step_peak(ctx.device) as peak:
            trainer.compute_gradients(m)
        trainer.buckets.zero()
        results[schedule] = (busy, wall, peak["peak_bytes"])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq", type=int, default=256)
    # GPT-3 trains with dropout 0.1: its masks are part of what a micro-batch keeps, which a pending W does not.
    parser.add_argument("--dropout", type=float, default=0.0)
    args = parser.parse_args()
    from megagpt.parallel.pipeline import predicted_bubble
    from tests.local_world import run_world

    print(
        f"GPT 8 layers, hidden {args.hidden}, seq {args.seq}, dropout {args.dropout}, vocab 1024, micro-batch 1, fp32; "
        f"mean of {args.steps} steps; "
        f"torch {torch.__version__}"
    )
    print(
        "| pp | m | schedule | measured bubble (wall - busy) / busy | predicted | bubble / 1F1B's | "
        "peak step memory (MiB, fullest stage) | memory / 1F1B's | step wall time (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for pp, m in [(2, 4), (2, 8), (4, 4), (4, 8)]:
        stages = run_world(pp, _stage_worker, m, args.steps, args.hidden, args.seq, args.dropout, timeout=3000)
        rows = {}
        for schedule in SCHEDULES:
            measured = statistics.mean((wall - busy) / busy for busy, wall, _ in (s[schedule] for s in stages))
            wall = statistics.mean(s[schedule][1] for s in stages) / args.steps
            peak = max(s[schedule][2] for s in stages)
            rows[schedule] = (measured, peak, wall)
        for schedule, (measured, peak, wall) in rows.items():
            vpp = 2 if schedule == "interleaved" else 1
            print(
                f"| {pp} | {m} | {schedule} | {measured:.2f} | {predicted_bubble(schedule, pp, vpp, m):.2f} | "
                f"{measured / rows['1f1b'][0]:.2f} | {peak / 2**20:.1f} | {peak / rows['1f1b'][1]:.2f} | {wall:.3f} |"
            )


if __name__ == "__main__":
    main()
