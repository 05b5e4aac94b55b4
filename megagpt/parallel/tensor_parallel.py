"""Tensor-parallel layers (Megatron-style). With a group of one rank they are plain Linear / Embedding.

Weights are initialised as the full matrix from the global RNG and then sliced, so every rank of every
layout starts from the same model for the same seed.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megagpt.parallel.comm import copy_to_group, reduce_from_group
from megagpt.parallel.context import Group


def _shard_of_full_init(rows: int, cols: int, std: float, dim: int, group: Group) -> torch.Tensor:
    """Draw the full (rows, cols) N(0, std) matrix, keep this rank's slice along dim."""
    full = torch.empty(rows, cols)
    nn.init.normal_(full, mean=0.0, std=std)
    return full.chunk(group.size, dim=dim)[group.index].clone()


def _divide(n: int, parts: int, what: str) -> int:
    if n % parts != 0:
        raise ValueError(f"{what}={n} is not divisible by the tensor-parallel size {parts}")
    return n // parts


class ColumnParallelLinear(nn.Module):
    """y = x A^T + b with A split by output rows: each rank computes out_features / tp of the outputs."""

    def __init__(self, in_features: int, out_features: int, group: Group, *, bias: bool, init_std: float):
        super().__init__()
        self.group = group
        out_per_rank = _divide(out_features, group.size, "out_features")
        self.weight = nn.Parameter(_shard_of_full_init(out_features, in_features, init_std, 0, group))
        self.bias = nn.Parameter(torch.zeros(out_per_rank)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out/tp)
        return F.linear(copy_to_group(x, self.group), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = x A^T + b with A split by input columns: each rank holds in_features / tp inputs; outputs are summed."""

    def __init__(self, in_features: int, out_features: int, group: Group, *, bias: bool, init_std: float):
        super().__init__()
        self.group = group
        _divide(in_features, group.size, "in_features")
        self.weight = nn.Parameter(_shard_of_full_init(out_features, in_features, init_std, 1, group))
        # The bias is added once, after the sum over ranks.
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in/tp) -> (..., out)
        y = reduce_from_group(F.linear(x, self.weight), self.group)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the (padded) vocabulary split into contiguous ranges, one per tp rank."""

    def __init__(self, num_embeddings: int, embedding_dim: int, group: Group, *, init_std: float):
        super().__init__()
        self.group = group
        per_rank = _divide(num_embeddings, group.size, "padded vocabulary")
        self.vocab_start = group.index * per_rank
        self.vocab_end = self.vocab_start + per_rank
        self.weight = nn.Parameter(_shard_of_full_init(num_embeddings, embedding_dim, init_std, 0, group))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (b, s) -> (b, s, h)
        if self.group.size == 1:
            return F.embedding(ids, self.weight)
        # Ids outside this rank's range look up row 0 and are zeroed; the all-reduce fills them from their owner.
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_group(out, self.group)
