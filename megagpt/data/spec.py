"""What data.path and data.split mean, parsed without touching any file (config validation uses these too).

With ``data.megatron_compat`` (the default) both follow Megatron Core's rules (``get_blend_from_list``,
``parse_and_normalize_split``, ``convert_split_vector_to_split_matrix`` in megatron/core/datasets):

- data.path is a prefix, a list ``[w1, prefix1, w2, prefix2, ...]``, a weightless list ``[prefix1, prefix2]``
  (weighted by the datasets' sizes), or Megatron's ``--data-path`` written as one string: ``"0.3 a 0.7 b"``;
- data.split ``"969,30,1"`` is normalized and turned into cumulative bookends (0, .969, .999, 1), each rounded
  on its own (Python's round, half to even) against the number of sequences: the cumulative boundaries are
  rounded, not each part's size.

With ``megatron_compat: false``, megagpt's earlier rules: a string is always one prefix (so a path may hold
spaces), and each split's size is rounded on its own, the rounding error moving every later boundary.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

from megagpt.errors import DataError


@dataclass(frozen=True)
class Blend:
    """Dataset prefixes and their normalized weights; ``weights is None`` means "weight by dataset size"
    (Megatron's weightless list)."""

    prefixes: tuple[str, ...]
    weights: tuple[float, ...] | None


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


def split_ranges(num_elements: int, split: str, megatron_compat: bool = True) -> list[tuple[int, int]]:
    """Three contiguous (start, end) ranges of [0, num_elements) for train, valid, test. A range may be empty.

    Megatron's rule (megatron_compat): the split vector's cumulative bookends [0, a, a+b, 1], each multiplied by
    num_elements and rounded (half to even). 30 elements at '45,10,45' -> (0,14), (14,16), (16,30).

    megagpt's earlier rule: each part gets round(weight * num_elements); the rounding excess or shortfall shifts
    every boundary after the first. 30 elements at '45,10,45' -> (0,13), (13,16), (16,30).
    """
    weights = parse_split(split)
    if megatron_compat:
        bookends = [0.0]
        for weight in weights:
            bookends.append(bookends[-1] + weight)
        bounds = [int(round(b * float(num_elements))) for b in bookends]
        bounds = [min(max(b, 0), num_elements) for b in bounds]
        bounds[-1] = num_elements  # the bookend sums to 1 up to rounding; the last range always ends at the end
    else:
        bounds = [0]
        for weight in weights:
            bounds.append(bounds[-1] + int(round(weight * float(num_elements))))
        excess = bounds[-1] - num_elements
        bounds = [0] + [min(max(b - excess, 0), num_elements) for b in bounds[1:]]
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


def is_set(path) -> bool:
    """Whether a data path key (data.path, data.train_path, ...) names any data."""
    return path not in (None, "", [])


def parse_blend(path: str | Sequence, megatron_compat: bool = True, key: str = "data.path") -> Blend:
    """data.path (or the per-split path `key`) -> Blend. See the module docstring for the forms it takes."""
    if isinstance(path, (str, os.PathLike)):
        text = os.fspath(path)
        items = text.split() if megatron_compat else [text]
    else:
        items = [os.fspath(item) if isinstance(item, os.PathLike) else item for item in path]
    if not items:
        raise DataError(f"{key} is empty; give a dataset prefix or a blend [weight1, prefix1, ...].")
    if len(items) == 1:
        return Blend((_prefix(items[0], path, key),), None)
    weights = [_weight(item) for item in items[0::2]] if len(items) % 2 == 0 else [None]
    if all(w is None for w in weights):
        # An odd count, or no weight in a weight's place: a weightless list of prefixes, as Megatron reads it.
        return Blend(tuple(_prefix(item, path, key) for item in items), None)
    if any(w is None for w in weights) or any(not isinstance(p, str) for p in items[1::2]):
        raise DataError(
            f"{key} {items!r} is neither a prefix nor a blend (it mixes weights and prefixes); write a blend as "
            "[weight1, prefix1, weight2, prefix2, ...] or a list of prefixes only, weighted by dataset size."
        )
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise DataError(f"{key} blend weights {weights} must be finite and non-negative; fix {key}.")
    total = sum(weights)
    if total <= 0:
        raise DataError(f"{key} blend weights {weights} sum to zero; give some dataset a positive weight.")
    return Blend(tuple(items[1::2]), tuple(w / total for w in weights))


def _weight(item) -> float | None:
    if isinstance(item, bool):
        return None
    if isinstance(item, (int, float)):
        return float(item)
    try:
        return float(item)
    except (TypeError, ValueError):
        return None


def _prefix(item, path, key: str) -> str:
    if not isinstance(item, str) or _weight(item) is not None:
        raise DataError(
            f"{key} {path!r} is neither a prefix nor a blend ({item!r} stands where a dataset prefix belongs); "
            "write a blend as [weight1, prefix1, weight2, prefix2, ...] or a list of prefixes."
        )
    return item
