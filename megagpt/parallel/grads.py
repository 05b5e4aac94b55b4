"""After backward: finish the gradients across every group (finalize_grads), then measure and clip their global norm.

Each function takes parameters whose .grad is the gradient to work on and whose ParamSpec (parallel/params.py)
says how it is held: in training, the optimizer's fp32 main pieces (train/optimizer.py), whose .grad are views of
the buckets' main_grad (data_parallel.py) and which carry their model parameter's spec.

    buckets.start_step(n); ... backward of n micro-batches ...
    finalize_grads(buckets, mains, ctx)     # dp mean, tp sums, tied-embedding sum: the whole model's gradient
    norm = global_grad_norm(mains, ctx.tp_group, ctx.pp_group, dp_shards)
    clip_grads(mains, max_norm, norm)
"""

from __future__ import annotations

import torch

from megagpt.parallel.comm import all_reduce
from megagpt.parallel.context import Group, ParallelContext
from megagpt.parallel.data_parallel import GradBuckets
from megagpt.parallel.params import spec_of


def finalize_grads(buckets: GradBuckets, params: list[torch.nn.Parameter], ctx: ParallelContext) -> None:
    """The post-backward work, in order (Megatron's finalize_model_grads):

    1. wait for the buckets' data-parallel reductions (main_grad: the dp mean, in this rank's slices with ZeRO-1);
    2. sum over tp the partial gradients of replicated parameters fed only a sequence shard;
    3. sum the tied embedding's gradient between its two holders (first and last pipeline stage).

    params: the tensors whose .grad views main_grad, this rank's pieces; ZeRO-1 lays them out alike on every rank
    that must agree in steps 2 and 3 (the tied embedding has a bucket of its own for this).
    """
    buckets.finish()
    allreduce_sequence_parallel_grads(params, ctx.tp_group)
    allreduce_embedding_grads(params, ctx.embedding_group)


def allreduce_sequence_parallel_grads(params: list[torch.nn.Parameter], tp_group: Group) -> None:
    """Sum, over the tp group, the grads of replicated parameters that each rank fed only a sequence shard."""
    grads = [p.grad for p in params if spec_of(p).sequence_parallel and p.grad is not None]
    if tp_group.size == 1 or not grads:
        return
    flat = torch.cat([g.flatten() for g in grads])  # one collective instead of one per LayerNorm
    all_reduce(flat, tp_group)
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def allreduce_embedding_grads(params: list[torch.nn.Parameter], embedding_group: Group) -> None:
    """Sum the tied token embedding's gradient between the first pipeline stage (input embedding) and the last
    (output layer), so both copies take the same step. Every holder takes part, the first stage's included:
    test tied_embedding here, never embedding_copy, or the first stage would leave the all-reduce waiting."""
    for param in params:
        if spec_of(param).tied_embedding and param.grad is not None:
            all_reduce(param.grad, embedding_group)


def global_grad_norm(
    params: list[torch.nn.Parameter], tp_group: Group, pp_group: Group, dp_shards: Group | None = None
) -> torch.Tensor:
    """L2 norm of the whole model's gradient, the same number on every rank (inf or NaN if any gradient is), as
    a 0-dim fp32 tensor on the gradients' device: reading it is a host sync, so the trainer does on logging steps.

    A tensor-parallel parameter's slices are disjoint, so each rank counts its own; a parameter replicated across
    tp is counted by the group's first rank; the last stage's copy of the tied embedding is not counted (the
    first stage's is). Pipeline stages hold disjoint layers and are summed. Data-parallel replicas hold
    identical (reduced) grads and are not summed again, unless each holds a disjoint shard (ZeRO-1: dp_shards).
    """
    counted = [p.grad for p in params if p.grad is not None and spec_of(p).counted_on(tp_group.index)]
    square_sum = torch.zeros((), dtype=torch.float32, device=params[0].device)
    for grad in counted:
        square_sum += grad.float().pow(2).sum()
    all_reduce(square_sum, tp_group)
    all_reduce(square_sum, pp_group)
    if dp_shards is not None:
        all_reduce(square_sum, dp_shards)
    return square_sum.sqrt()


def clip_grads(params: list[torch.nn.Parameter], max_norm: float, total_norm: torch.Tensor) -> None:
    """Scale the grads so their global norm is at most max_norm (torch's clip_grad_norm_ rule), on the device:
    the coefficient min(1, max_norm / (norm + 1e-6)) never comes to the host."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        coefficient = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, coefficient.to(grads[0].device))
