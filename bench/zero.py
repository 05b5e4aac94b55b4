"""ZeRO-2 and ZeRO-3 on CPU: bytes per rank against ZeRO-1 and the estimate, step time as a ratio to ZeRO-1.

    python bench/zero.py [--seq 64] [--skip-memory] [--skip-accumulate]

1. The GPT-3 125M shape in bf16 (fp32 main weights), dp = 1, 2, 4, zero = 1, 2, 3, one micro-batch of `--seq`
   tokens per rank: each rank's memory report after one step (the allocation tracker's step, train/memory.py:
   parameters, fp32 gradients, optimizer state, peak), the ratio of zero 2's gradient bytes and zero 3's
   parameter bytes to zero 1's at the same dp, tools/estimate.py's numbers for the same layout, and the time of a
   second step (without the tracker) as a ratio to zero 1's in the same run.
2. Gradient accumulation (a 4-layer, hidden-256 model, dp 2, 8 micro-batches per step): zero 2 with
   parallel.zero_accumulate = slice and = bucket, and zero 3 at pp 2 (its layers gathered again for each
   micro-batch's forward and backward), step time as a ratio to zero 1 on the same layout, and the peak of the
   transient full buffers (gradient buckets, gathered layers).
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

MIB = 2**20


def _build(rank: int, topology, overrides: list[str], preset: str | None):
    from megagpt.config import config_from_dict
    from megagpt.data.gpt_dataset import SyntheticDataset
    from megagpt.parallel.context import ParallelContext
    from megagpt.train.run import build_trainer

    torch.set_num_threads(1)
    base = {"preset": preset} if preset else {}
    cfg = config_from_dict(base, ["train.device=cpu", "logging.tensorboard=false", *overrides])
    ctx = ParallelContext.initialize(topology, rank, torch.device("cpu"))
    data = SyntheticDataset(4 * cfg.train.global_batch_size, cfg.model.seq_length, cfg.model.vocab_size, seed=1)
    return cfg, build_trainer(cfg, ctx, data, None, None)


def _timed_steps(trainer, steps: int) -> float:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _memory_worker(rank: int, world_size: int, zero: int, seq: int):
    from megagpt.parallel.topology import Topology

    overrides = [f"parallel.zero={zero}", "train.precision=bf16", f"model.seq_length={seq}",
                 "train.micro_batch_size=1", f"train.global_batch_size={world_size}"]  # fmt: skip
    _, trainer = _build(rank, Topology(1, world_size, 1), overrides, "gpt3-125m")
    trainer.measured_step()
    seconds = _timed_steps(trainer, 1)
    return trainer.state.memory[rank], seconds


def memory_table(seq: int) -> None:
    from megagpt.config import config_from_dict
    from megagpt.estimate import stage_estimate
    from tests.local_world import run_world

    print(f"GPT-3 125M shape, bf16 (fp32 main weights), one micro-batch of {seq} tokens per rank; per rank, MiB")
    print("| dp | zero | parameters | vs zero 1 | estimate | gradients | vs zero 1 | estimate | optimizer | "
          "step time vs zero 1 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for dp in (1, 2, 4):
        rows = {}
        for zero in (1, 2, 3):
            results = run_world(dp, _memory_worker, zero, seq, timeout=1800)
            memory = results[0][0]
            rows[zero] = (memory, max(seconds for _, seconds in results))
        for zero, (memory, seconds) in rows.items():
            cfg = config_from_dict(
                {"preset": "gpt3-125m"}, [f"parallel.zero={zero}", "train.precision=bf16", f"model.seq_length={seq}",
                                          "train.micro_batch_size=1", f"train.global_batch_size={dp}"],
            )  # fmt: skip
            est = stage_estimate(cfg, dp, 0)
            base = rows[1][0]
            print(
                f"| {dp} | {zero} | {memory['params_bytes'] / MIB:.1f} | "
                f"{memory['params_bytes'] / base['params_bytes']:.4f} | {est.weights_bytes / MIB:.1f} | "
                f"{memory['grads_bytes'] / MIB:.1f} | {memory['grads_bytes'] / base['grads_bytes']:.4f} | "
                f"{est.grads_bytes / MIB:.1f} | {memory['optimizer_bytes'] / MIB:.1f} | {seconds / rows[1][1]:.2f} |"
            )


def _accumulate_worker(rank: int, world_size: int, pp: int, zero: int, accumulate: str, steps: int):
    from megagpt.parallel.topology import Topology

    overrides = [f"parallel.zero={zero}", f"parallel.zero_accumulate={accumulate}", f"parallel.pp={pp}",
                 "model.num_layers=4", "model.hidden_size=256", "model.num_heads=4", "model.seq_length=64",
                 "model.vocab_size=4096", "train.micro_batch_size=1", "train.global_batch_size=16",
                 "parallel.grad_bucket_mb=1"]  # fmt: skip
    _, trainer = _build(rank, Topology(1, world_size // pp, pp), overrides, None)
    trainer.train_step()  # warm-up
    trainer.buckets.transient.reset_peak()
    seconds = _timed_steps(trainer, steps)
    return seconds, trainer.buckets.transient.peak


def accumulate_table(steps: int) -> None:
    from tests.local_world import run_world

    print("gradient accumulation: 4 layers, hidden 256, dp 2, 8 micro-batches per step (median of timed steps)")
    print("| pp | zero | zero_accumulate | step time vs zero 1 | transient peak (MiB) |")
    print("|---|---|---|---|---|")
    for pp, runs in ((1, ((2, "slice"), (2, "bucket"), (3, "slice"))), (2, ((3, "slice"), (3, "bucket")))):
        base = max(s for s, _ in run_world(2 * pp, _accumulate_worker, pp, 1, "slice", steps, timeout=1800))
        print(f"| {pp} | 1 | - | 1.00 | 0.0 |")
        for zero, accumulate in runs:
            results = run_world(2 * pp, _accumulate_worker, pp, zero, accumulate, steps, timeout=1800)
            seconds = max(s for s, _ in results)
            peak = max(p for _, p in results)
            print(f"| {pp} | {zero} | {accumulate} | {seconds / base:.2f} | {peak / MIB:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=64, help="tokens per micro-batch in the 125M table")
    parser.add_argument("--steps", type=int, default=3, help="timed steps in the accumulation table")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-accumulate", action="store_true")
    args = parser.parse_args()
    if not args.skip_accumulate:
        accumulate_table(args.steps)
    if not args.skip_memory:
        memory_table(args.seq)


if __name__ == "__main__":
    main()
