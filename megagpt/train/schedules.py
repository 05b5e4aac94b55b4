"""Learning-rate and batch-size schedules, as pure functions of the step (or of samples consumed)."""

from __future__ import annotations

import math

from megagpt.config import OptimConfig, TrainConfig


def learning_rate(step: int, optim: OptimConfig, train_iters: int) -> float:
    """LR for optimizer step `step` (0-based): linear warm-up to lr, then cosine decay to min_lr, then flat.

    Megatron's convention: during warm-up lr * (step + 1) / warmup_iters, so the first step already moves.
    """
    decay_iters = optim.decay_iters if optim.decay_iters is not None else train_iters
    if step < optim.warmup_iters:
        return optim.lr * (step + 1) / optim.warmup_iters
    if step >= decay_iters:
        return optim.min_lr
    progress = (step - optim.warmup_iters) / max(1, decay_iters - optim.warmup_iters)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return optim.min_lr + cosine * (optim.lr - optim.min_lr)


def global_batch_size(consumed_samples: int, train: TrainConfig) -> int:
    """GPT-3's batch-size ramp-up (Megatron's --rampup-batch-size start increment samples).

    The batch grows from `start` by `increment` each time another samples / num_increments samples have been
    consumed, until it reaches train.global_batch_size.
    """
    if train.batch_rampup is None:
        return train.global_batch_size
    start, increment, ramp_samples = train.batch_rampup
    num_increments = (train.global_batch_size - start) // increment
    if num_increments == 0 or ramp_samples == 0:
        return train.global_batch_size
    samples_per_increment = ramp_samples / num_increments
    steps = int(consumed_samples / samples_per_increment)
    return min(train.global_batch_size, start + steps * increment)


def total_train_samples(train: TrainConfig) -> int:
    """Samples consumed by train.iters steps, ramp-up included."""
    consumed = 0
    if train.batch_rampup is None:
        return train.iters * train.global_batch_size
    for _ in range(train.iters):
        consumed += global_batch_size(consumed, train)
    return consumed
