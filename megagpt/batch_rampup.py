"""GPT-3's batch-size ramp-up as plain arithmetic (Megatron's --rampup-batch-size start increment samples).

The batch grows from `start` by `increment` each time another samples / num_increments samples have been
consumed, until it is the full global batch. The functions take (global_batch, rampup) and nothing of the config,
so that both presets.py (which plans iteration counts through the ramp, below config.py) and the trainer
(train/schedules.py, above it) use the same rule. This module imports nothing of megagpt.
"""

from __future__ import annotations

import math


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
