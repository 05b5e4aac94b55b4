"""Collectives as named autograd pairs (Megatron's mappings), each a no-op on a group of one rank.

    copy_to_group      forward: identity        backward: all-reduce
    reduce_from_group  forward: all-reduce      backward: identity

Column-parallel layers wrap their input in copy_to_group (each rank consumes the full input, so the input's
gradient is the sum of the ranks' partial gradients); row-parallel layers wrap their output in
reduce_from_group (each rank holds a partial sum of the output).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megagpt.parallel.context import Group


def all_reduce(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Sum x over the group, in place; returns x."""
    if group.size > 1:
        dist.all_reduce(x, group=group.handle)
    return x


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad.contiguous(), ctx.group), None


class _ReduceFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x.contiguous(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def copy_to_group(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Forward identity, backward all-reduce."""
    return x if group.size == 1 else _CopyToGroup.apply(x, group)


def reduce_from_group(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Forward all-reduce, backward identity."""
    return x if group.size == 1 else _ReduceFromGroup.apply(x, group)
