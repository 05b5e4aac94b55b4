"""Learning-rate and batch-size schedules, as pure functions of the step or of the samples consumed."""

from __future__ import annotations

import math

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
# GPT-3's batch-size ramp-up (Megatron's --rampup-batch-size start increment samples): the batch grows from
# `start` by `increment` each time another samples / num_increments samples have been consumed, until it is
# the full global batch. The functions take (global_batch, rampup) so presets can plan with them too.


def _ramp(global_batch: int, rampup: list[int] | None) -> tuple[int, int, int, float]:
    """(start, increment, number of increments, samples per increment); no increments without a ramp."""
    if rampup is None:
        return global_batch, 0, 0, 0.0
    start, increment, ramp_samples = rampup
    increments = (global_batch - start) // increment
    if increments == 0 or ramp_samples == 0:
        return global_batch, 0, 0, 0.0
    return start, increment, increments, ramp_samples / increments


def batch_size_at(consumed_samples: int, global_batch: int, rampup: list[int] | None) -> int:
    start, increment, increments, per_increment = _ramp(global_batch, rampup)
    if increments == 0:
        return global_batch
    return min(global_batch, start + int(consumed_samples / per_increment) * increment)


def _ramp_stages(global_batch: int, rampup: list[int] | None):
    """(batch size, steps at that size) for each ramp stage, as the trainer will live them."""
    start, increment, increments, per_increment = _ramp(global_batch, rampup)
    consumed = 0
    for k in range(increments):
        batch = start + k * increment
        stage_end = (k + 1) * per_increment  # the batch grows once consumed reaches this
        steps = max(0, math.ceil((stage_end - consumed) / batch))
        yield batch, steps
        consumed += steps * batch


def samples_after(steps: int, global_batch: int, rampup: list[int] | None) -> int:
    """Samples consumed by the first `steps` optimizer steps."""
    consumed = 0
    for batch, stage_steps in _ramp_stages(global_batch, rampup):
        taken = min(steps, stage_steps)
        consumed += taken * batch
        steps -= taken
    return consumed + steps * global_batch


def steps_to_consume(samples: float, global_batch: int, rampup: list[int] | None) -> int:
    """The number of optimizer steps after which at least `samples` samples have been consumed."""
    consumed, steps = 0, 0
    for batch, stage_steps in _ramp_stages(global_batch, rampup):
        if consumed + stage_steps * batch >= samples:
            return steps + max(0, math.ceil((samples - consumed) / batch))
        consumed += stage_steps * batch
        steps += stage_steps
    return steps + max(0, math.ceil((samples - consumed) / global_batch))


def global_batch_size(consumed_samples: int, train: TrainConfig) -> int:
    return batch_size_at(consumed_samples, train.global_batch_size, train.batch_rampup)


def total_train_samples(train: TrainConfig) -> int:
    """Samples consumed by train.iters steps, ramp-up included."""
    return samples_after(train.iters, train.global_batch_size, train.batch_rampup)
