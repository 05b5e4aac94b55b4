"""fp16 loss scaling: multiply the loss before backward so small gradients survive fp16, and adapt the factor.

fp16 has 5 exponent bits: gradients below ~6e-8 underflow to zero, above 65504 overflow to inf. The loss is
multiplied by `scale` before backward and the fp32 main gradients are divided by it afterwards. A step whose
gradients came out inf or NaN is skipped (no update), and the dynamic scaler reacts (Megatron's rule):

    overflow:  the growth count restarts; the hysteresis count drops by one, and once it is used up every
               overflow halves the scale (times `backoff`), never below `min_scale`.
    no overflow for `growth_interval` steps in a row: double the scale and refill the hysteresis count.

So with hysteresis 2 a lone overflow only skips its step; two in a row also lower the scale. A model that keeps
overflowing at the minimum scale is not trained by skipping forever: after `max_consecutive_skips` skipped
steps in a row, `update` raises a TrainingDiverged error that says so.
"""

from __future__ import annotations

from megagpt.errors import UserError


class TrainingDiverged(UserError):
    """fp16 gradients overflowed for too many steps in a row."""


class LossScaler:
    def __init__(
        self,
        initial_scale: float,
        *,
        dynamic: bool = True,
        min_scale: float = 1.0,
        growth_interval: int = 1000,
        backoff: float = 0.5,
        hysteresis: int = 2,
        max_consecutive_skips: int = 50,
        growth_factor: float = 2.0,
    ):
        self.scale = float(initial_scale)
        self.dynamic = dynamic
        self.min_scale = min_scale
        self.growth_interval = growth_interval
        self.backoff = backoff
        self.hysteresis = hysteresis
        self.max_consecutive_skips = max_consecutive_skips
        self.growth_factor = growth_factor
        self.growth_count = 0  # steps without overflow since the last overflow or growth
        self.hysteresis_left = hysteresis
        self.consecutive_skips = 0
        self.total_skips = 0

    def update(self, found_inf: bool, step: int | None = None) -> None:
        """Record whether this step's gradients overflowed (then the step was skipped) and adapt the scale."""
        if found_inf:
            self.total_skips += 1
            self.consecutive_skips += 1
            if self.dynamic:
                self.growth_count = 0
                self.hysteresis_left -= 1
                if self.hysteresis_left <= 0:
                    self.scale = max(self.scale * self.backoff, self.min_scale)
            if self.consecutive_skips >= self.max_consecutive_skips:
                where = f" (the last at step {step})" if step is not None else ""
                raise TrainingDiverged(
                    f"fp16 gradients overflowed in {self.consecutive_skips} steps in a row{where}, now at loss scale "
                    f"{self.scale:g}, so every one of those steps was skipped; the model does not fit fp16 here: "
                    f"use train.precision=bf16 or fp32, or lower optim.lr (train.max_consecutive_skips sets this limit)"
                )
            return
        self.consecutive_skips = 0
        if not self.dynamic:
            return
        self.growth_count += 1
        if self.growth_count == self.growth_interval:
            self.growth_count = 0
            self.hysteresis_left = self.hysteresis
            self.scale *= self.growth_factor

    def state_dict(self) -> dict:
        keys = ("scale", "growth_count", "hysteresis_left", "consecutive_skips", "total_skips")
        return {key: getattr(self, key) for key in keys}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
