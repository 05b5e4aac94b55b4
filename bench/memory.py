"""Memory on CPU: optimizer state per rank under ZeRO-1, and what activation recomputation saves and costs.

    python bench/memory.py [--steps 3] [--skip-zero] [--skip-recompute]

1. Optimizer-state bytes per rank (Adam's moments, plus fp32 main weights when the model computes in bf16) for
   dp = 1, 2, 4 with zero = 0 and 1, measured on the optimizer each rank builds for the GPT-3 125M shape
   (bf16), next to the 12 bytes per parameter / dp that ZeRO-1 promises.
2. Recompute none, selective and full on one process, with dropout 0.1 and 0: the peak bytes a training step
   allocates (activations and temporaries, counted by the allocation tracker in one extra step) and the step
   time (mean over the timed steps, without the tracker), each as a ratio to recompute none in the same run.
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


def _state_bytes_worker(rank: int, world_size: int, zero: int):
    from megagpt.config import config_from_dict
    from megagpt.data.gpt_dataset import SyntheticDataset
    from megagpt.parallel.context import ParallelContext
    from megagpt.parallel.topology import Topology
    from megagpt.train.run import build_trainer

    torch.set_num_threads(1)
    cfg = config_from_dict(
        {"preset": "gpt3-125m"},
        [f"parallel.zero={zero}", "train.precision=bf16", "train.device=cpu", "model.seq_length=128",
         "train.micro_batch_size=1", f"train.global_batch_size={world_size}", "logging.tensorboard=false"],
    )  # fmt: skip
    ctx = ParallelContext.initialize(Topology(1, world_size, 1), rank, torch.device("cpu"))
    data = SyntheticDataset(8, cfg.model.seq_length, cfg.model.vocab_size, seed=1)
    trainer = build_trainer(cfg, ctx, data, None, None)
    params = sum(p.numel() for p in trainer.chunks.parameters())
    return params, trainer.optimizer.state_bytes()


def zero_table() -> None:
    from tests.local_world import run_world

    print("optimizer state per rank, GPT-3 125M shape, bf16 model (fp32 main weights + Adam moments)")
    print("| dp | zero | parameters | optimizer state per rank (MiB) | 12 B x params / dp (MiB) | vs zero=0 |")
    print("|---|---|---|---|---|---|")
    unsharded = None
    for dp in (1, 2, 4):
        for zero in (0, 1):
            results = run_world(dp, _state_bytes_worker, zero, timeout=600)
            params = results[0][0]
            per_rank = max(state for _, state in results)
            if unsharded is None:
                unsharded = per_rank
            promise = 12 * params / (dp if zero else 1)
            print(
                f"| {dp} | {zero} | {params / 1e6:.1f}M | {per_rank / MIB:.1f} | {promise / MIB:.1f} | "
                f"{per_rank / unsharded:.3f} |",
                flush=True,
            )


def recompute_table(steps: int, dropout: float) -> None:
    from megagpt.config import config_from_dict
    from megagpt.data.gpt_dataset import SyntheticDataset
    from megagpt.parallel.context import ParallelContext
    from megagpt.train.memory import step_peak
    from megagpt.train.run import build_trainer

    overrides = [
        "model.num_layers=4", "model.hidden_size=256", "model.num_heads=8", "model.seq_length=512",
        "model.vocab_size=1024", "model.make_vocab_size_divisible_by=1", "model.local_window=128",
        f"model.dropout={dropout}", "train.micro_batch_size=4", "train.global_batch_size=4",
        "logging.tensorboard=false",
    ]  # fmt: skip
    print(f"recompute on CPU: {' '.join(overrides[:7])}, dropout {dropout}, micro-batch 4, fp32, "
          f"{torch.get_num_threads()} threads; {steps} timed steps")  # fmt: skip
    print("| recompute | peak step allocation (MiB) | vs none | step time (s) | vs none |")
    print("|---|---|---|---|---|")
    baseline = None
    for mode in ("none", "selective", "full"):
        cfg = config_from_dict({"preset": "tiny-cpu"}, [*overrides, f"parallel.recompute={mode}"])
        ctx = ParallelContext.single_process()
        data = SyntheticDataset(64, cfg.model.seq_length, cfg.model.vocab_size, seed=1)
        trainer = build_trainer(cfg, ctx, data, None, None)
        trainer.train_step()  # warm-up
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            trainer.train_step()
            times.append(time.perf_counter() - start)
        with step_peak(ctx.device) as peak:
            trainer.train_step()
        result = (peak["peak_bytes"], statistics.mean(times))
        baseline = baseline or result
        print(
            f"| {mode} | {result[0] / MIB:.1f} | {result[0] / baseline[0]:.2f} | {result[1]:.3f} | "
            f"{result[1] / baseline[1]:.2f} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--skip-zero", action="store_true")
    parser.add_argument("--skip-recompute", action="store_true")
    args = parser.parse_args()
    if not args.skip_zero:
        zero_table()
    if not args.skip_recompute:
        for dropout in (0.1, 0.0):
            recompute_table(args.steps, dropout)


if __name__ == "__main__":
    main()
