"""Learning-rate and batch-size schedules, as pure functions of the step or of the samples consumed."""

from __future__ import annotations

import math

from megagpt.batch_rampup import batch_size_at, samples_after
from megagpt.config import OptimConfig, TrainConfig


def learning_rate(step: int, optim: OptimConfig, train_iters: int) -> float:
    """LR of optimizer step `step` (0-based), Megatron's schedule counted in steps done, n = step + 1:

    warm-up  n <= W:      lr * n / W            (the first step already moves; step W - 1 is at the peak)
    decay    W < n < D:   min_lr + (lr - min_lr) * (1 + cos(pi * (n - W) / (D - W))) / 2
    floor    n >= D:      min_lr                (step D - 1 is the last of the decay)

    with W = optim.warmup_iters and D = optim.decay_iters (default train.iters).
    """
    n = step + 1
    warmup = optim.warmup_iters
    decay = optim.decay_iters if optim.decay_iters is not None else train_iters
    if n <= warmup:
        return optim.lr * n / warmup
    if n >= decay:
        return optim.min_lr
    progress = (n - warmup) / (decay - warmup)
    return optim.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (optim.lr - optim.min_lr)


# ----------------------------------------------------------------------------------------------------------------
# The batch-size ramp-up (its arithmetic lives in megagpt/batch_rampup.py, which presets use too).


def global_batch_size(consumed_samples: int, train: TrainConfig) -> int:
    return batch_size_at(consumed_samples, train.global_batch_size, train.batch_rampup)


def micro_batches_per_replica(train: TrainConfig, dp: int) -> int:
    """Micro-batches one data-parallel replica runs in a step of the full global batch (after any ramp-up):
    the m of the pipeline schedules, their bubble and the activations they hold."""
    return train.global_batch_size // (train.micro_batch_size * dp)


def total_train_samples(train: TrainConfig) -> int:
    """Samples consumed by train.iters steps, ramp-up included."""
    return samples_after(train.iters, train.global_batch_size, train.batch_rampup)
