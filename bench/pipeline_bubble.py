"""The pipeline bubble on CPU: how long each stage waits, measured, next to what the schedules predict.

    python bench/pipeline_bubble.py [--steps 5] [--hidden 1024] [--seq 128] [--dropout 0.1]

For pp = 2 and 4 and m = 4 and 8 micro-batches per step, one world per (pp, m) runs every schedule on the same
processes, one step of each in turn: 1F1B, interleaved 1F1B (vpp = 2), and the zero-bubble ZB-H1 and ZB-H2.
Every rank times its compute (forwards, backwards, and the zero-bubble weight passes: "busy") and the whole step
("wall"). The bubble is how much longer the step took than its busiest stage's compute, (wall - most busy) / most
busy, the median over steps (step_bubble says why not each stage's own waiting, which is printed next to it).
Two predictions (pipeline.predicted_bubble): at equal pass times, (p - 1) / m, (p - 1) / (v m) and
(p - 1) / (3 m) for ZB-H1; and at the measured median F, B and W of ZB-H1's passes, where
ZB-H1's is (p - 1)(F + B - W) / (m (F + B + W)), a third of 1F1B's only where the three passes take equal times,
and ZB-H2's the executor's exchanges simulated (pipeline.simulated_bubble: its warm-up forwards wait for their
receives, and it waits longer than 1F1B from m = 2 p on).
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
    """Every schedule on this rank, their steps taken in turn (1F1B, interleaved, ZB-H1, ZB-H2, 1F1B, ...) so that
    each sees the same machine: {schedule: ([(busy s, wall s) per step], peak bytes, {F/B/W: [seconds]})}."""
    from megagpt.data.gpt_dataset import SyntheticDataset
    from megagpt.parallel.context import ParallelContext
    from megagpt.parallel.topology import Topology
    from megagpt.train.memory import step_peak
    from megagpt.train.run import build_trainer

    ctx = ParallelContext.initialize(Topology(1, 1, world_size), rank, torch.device("cpu"))
    trainers, results = {}, {}
    for schedule in SCHEDULES:
        cfg = bubble_config(world_size, schedule, m, steps, hidden, seq, dropout)
        data = SyntheticDataset(m * (steps + 2), cfg.model.seq_length, cfg.model.vocab_size, 0)
        trainers[schedule] = build_trainer(cfg, ctx, data, None, None)
        trainers[schedule].compute_gradients(m)  # warm-up
        trainers[schedule].buckets.zero()
        results[schedule] = ([], 0, {"F": [], "B": [], "W": []})
    for _ in range(steps):
        for schedule, trainer in trainers.items():
            start = time.perf_counter()
            _, record = trainer.compute_gradients(m)
            results[schedule][0].append((record.busy_s, time.perf_counter() - start))
            for action, begin, end in record.events:
                results[schedule][2][action.kind].append(end - begin)
            trainer.buckets.zero()
    for schedule, trainer in trainers.items():
        with step_peak(ctx.device) as peak:
            trainer.compute_gradients(m)
        trainer.buckets.zero()
        results[schedule] = (results[schedule][0], peak["peak_bytes"], results[schedule][2])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    # s / h = 1/8, where pipelines are used (GPT-3 13B has s / h = 0.4, 175B 0.17) and where a layer's matmuls
    # outweigh its elementwise work, so F, B and W come near equal as on GPUs (at hidden 512 this CPU's forward
    # was 1.5 W, at 1024 1.2 W).
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--seq", type=int, default=128)
    # GPT-3 trains with dropout 0.1: its masks are part of what a micro-batch keeps, which a pending W does not.
    parser.add_argument("--dropout", type=float, default=0.1)
    args = parser.parse_args()
    from megagpt.parallel.pipeline import predicted_bubble
    from tests.local_world import run_world

    print(
        f"GPT 8 layers, hidden {args.hidden}, seq {args.seq}, dropout {args.dropout}, vocab 1024, micro-batch 1, fp32; "
        f"median of {args.steps} steps per schedule, the schedules' steps in turn; torch {torch.__version__}"
    )
    print(
        "| pp | m | schedule | measured bubble (wall - busiest stage) / busiest | stages' mean (wall - busy) / busy | "
        "predicted, equal F B W | F / B / W (ms) | predicted at these times | bubble / 1F1B's | "
        "peak step memory (MiB, fullest stage) | memory / 1F1B's | step wall time (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for pp, m in [(2, 4), (2, 8), (4, 4), (4, 8)]:
        stages = run_world(pp, _stage_worker, m, args.steps, args.hidden, args.seq, args.dropout, timeout=3000)
        rows = {}
        for schedule in SCHEDULES:
            # Per step, then the median over steps (a load spike spoils one step, not all).
            steps = [[s[schedule][0][i] for s in stages] for i in range(args.steps)]
            bubble = [step_bubble(step) for step in steps]
            stage_mean = [statistics.mean((wall - busy) / busy for busy, wall in step) for step in steps]
            wall = statistics.median(max(wall for _, wall in step) for step in steps)
            peak = max(s[schedule][1] for s in stages)
            times = {kind: [t for s in stages for t in s[schedule][2][kind]] for kind in "FBW"}
            rows[schedule] = (statistics.median(bubble), statistics.median(stage_mean), peak, wall, times)
        zb_times = tuple(statistics.median(rows["zb-h1"][4][kind]) for kind in "FBW")  # B and W apart
        for schedule, (measured, stage_mean, peak, wall, times) in rows.items():
            vpp = 2 if schedule == "interleaved" else 1
            passes = " / ".join(f"{1e3 * statistics.median(t):.0f}" if t else "-" for t in times.values())
            print(
                f"| {pp} | {m} | {schedule} | {measured:.3f} | {stage_mean:.3f} | "
                f"{predicted_bubble(schedule, pp, vpp, m):.3f} | {passes} | "
                f"{predicted_bubble(schedule, pp, vpp, m, zb_times):.3f} | {measured / rows['1f1b'][0]:.2f} | "
                f"{peak / 2**20:.1f} | {peak / rows['1f1b'][2]:.2f} | {wall:.3f} |"
            )


def step_bubble(stages: list[tuple[float, float]]) -> float:
    """How much longer a step took than its busiest stage's compute, per unit of that compute: (step wall time -
    the most any stage was busy) / that most. With balanced stages it is each stage's waiting per unit of work,
    the schedules' predicted bubble; where stages are unequal (the last one also computes the output layer and the
    loss) the lighter stages' extra waiting is the layer split's, which no schedule removes, and is left out, as
    is a schedule's speed-up of a stage that is not the slowest (ZB's fused weight-gradient accumulation)."""
    busiest = max(busy for busy, _ in stages)
    return (max(wall for _, wall in stages) - busiest) / busiest


if __name__ == "__main__":
    main()
