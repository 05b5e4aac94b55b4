"""What data.path and data.split mean, parsed without touching any file (config validation uses these too)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from megagpt.errors import DataError


def parse_split(split: str) -> list[float]:
    """'969,30,1' -> normalized [train, valid, test] weights; missing trailing parts are 0."""
    parts = [p.strip() for p in str(split).replace("/", ",").split(",")]
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        weights = []
    if not 1 <= len(weights) <= 3 or any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise DataError(
            f"data.split {split!r} is not valid; give up to three non-negative train,valid,test weights "
            "with a positive sum, like '969,30,1'."
        )
    weights += [0.0] * (3 - len(weights))
    total = sum(weights)
    return [w / total for w in weights]


def parse_blend(path: str | Sequence) -> list[tuple[float, str]]:
    """data.path -> [(weight, prefix), ...]: a prefix string, or a list [w1, prefix1, w2, prefix2, ...]."""
    if isinstance(path, (str, os.PathLike)):
        return [(1.0, os.fspath(path))]
    items = list(path)
    if len(items) == 1 and isinstance(items[0], (str, os.PathLike)):
        return [(1.0, os.fspath(items[0]))]
    if not items or len(items) % 2:
        raise DataError(
            f"data.path {items!r} is neither a prefix nor a blend; "
            "write a blend as [weight1, prefix1, weight2, prefix2, ...]."
        )
    blend = []
    for raw_weight, prefix in zip(items[0::2], items[1::2]):
        try:
            weight = float(raw_weight)
        except (TypeError, ValueError):
            weight = -1.0
        if not math.isfinite(weight) or weight < 0 or not isinstance(prefix, (str, os.PathLike)):
            raise DataError(
                f"data.path entry ({raw_weight!r}, {prefix!r}) is not (weight, prefix); write a blend as "
                "[weight1, prefix1, weight2, prefix2, ...] with non-negative weights."
            )
        blend.append((weight, os.fspath(prefix)))
    if sum(w for w, _ in blend) <= 0:
        raise DataError(
            f"data.path blend weights {[w for w, _ in blend]} sum to zero; give some dataset a positive weight."
        )
    return blend
