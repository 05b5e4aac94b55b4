"""Tensor-parallel layers (Megatron-style). With a group of one rank they are plain Linear / Embedding.

Weights are drawn as the full matrix from the global RNG and then sliced, so every layout starts from the same
model for the same seed. Each parameter's ParamSpec (parallel/params.py) says how it is held: split weights get
tp_split_dim (the slices, concatenated in rank order along it, are the parameter); replicated parameters fed a
sequence shard get sequence_parallel (their gradient is a partial sum over the tp group: LayerNorms, row biases).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megagpt.parallel.comm import (
    all_gather,
    all_reduce,
    copy_to_group,
    reduce_from_group,
    reduce_scatter,
    reduce_scatter_to_sequence,
    wait,
)
from megagpt.parallel.context import Group
from megagpt.parallel.params import update_spec
from megagpt.parallel.trace_ranges import trace_range
from megagpt.parallel.weight_grads import (
    add_bias,
    computed,
    defer,
    embedding,
    has_deferred_queue,
    linear,
    linear_weight_grads,
)


def divide(n: int, parts: int, what: str) -> int:
    if n % parts != 0:
        raise ValueError(f"{what}={n} is not divisible by the tensor-parallel size {parts}")
    return n // parts


def _shard_of_full_init(rows: int, cols: int, std: float, dim: int, group: Group) -> torch.Tensor:
    """Draw the full (rows, cols) N(0, std) matrix, keep this rank's slice along dim."""
    full = torch.empty(rows, cols)
    nn.init.normal_(full, mean=0.0, std=std)
    return full.chunk(group.size, dim=dim)[group.index].clone()


def mark_tensor_parallel(param: nn.Parameter, partition_dim: int) -> nn.Parameter:
    """This rank holds the partition_dim slice of the parameter."""
    return update_spec(param, tp_split_dim=partition_dim)


def mark_sequence_parallel(module: nn.Module, enabled: bool) -> None:
    """Mark a replicated module's parameters as fed by sequence shards (their grads need a tp all-reduce)."""
    for param in module.parameters():
        update_spec(param, sequence_parallel=enabled)


class _SequenceParallelColumnLinear(torch.autograd.Function):
    """y = all_gather(x) A^T + b for a sequence shard x, keeping only the shard for backward (Megatron's
    sequence-parallel column linear). Letting autograd save F.linear's input would keep the gathered
    full-sequence copy (b, s, in) alive on every rank between forward and backward, undoing what sequence
    parallelism saves. Backward gathers the shard again while it computes the input gradient (which does not
    need it), then reduce-scatters that gradient back to shards while it computes the weight gradient.

    Under a zero-bubble B (weight_grads.py) backward computes only the input gradient, and W gathers the shard
    again for the weight gradient: keeping the gathered input from B to W would hold the full sequence for
    every micro-batch waiting for its W, the memory sequence parallelism exists to save."""

    @staticmethod
    def forward(ctx, x, weight, bias, group):  # x (b, s/tp, in) -> (b, s, out/tp)
        ctx.save_for_backward(x, weight)
        ctx.group, ctx.has_bias = group, bias is not None
        ctx.weight, ctx.bias = weight, bias  # the tensors as received: a zero-bubble W finds their main gradients
        with trace_range("tp all-gather (sequence-parallel linear forward)"):
            full = all_gather(x, 1, group)  # (b, s, in)
        return F.linear(full, weight, bias)  # the gathered input dies here

    @staticmethod
    def backward(ctx, grad):  # grad (b, s, out/tp)
        x, weight = ctx.saved_tensors
        group = ctx.group
        if has_deferred_queue():
            return _sequence_parallel_input_grad(ctx, x, weight, grad)
        full, gathering = all_gather(x, 1, group, async_op=True)  # (b, s, in), filled in the background
        grad_full = grad.matmul(weight)  # (b, s, in): partial sums over this rank's outputs
        wait(gathering, "all-gather (sequence-parallel input, backward)", group)
        grad_x, scattering = reduce_scatter(grad_full, 1, group, async_op=True)  # (b, s/tp, in)
        grad_weight, grad_bias = computed(_weight_grads(ctx, grad, full))
        wait(scattering, "reduce-scatter (sequence-parallel input gradient)", group)
        return grad_x, grad_weight, grad_bias, None


def _weight_grads(ctx, grad, full):
    """The sequence-parallel column linear's (weight, gradient) pairs from its output gradient (b, s, out/tp) and
    gathered input (b, s, in)."""
    wants = ctx.needs_input_grad
    return linear_weight_grads(grad, full, ctx.weight, ctx.bias, wants[1], ctx.has_bias and wants[2])


def _sequence_parallel_input_grad(ctx, x, weight, grad):
    """B of the sequence-parallel column linear: the input gradient now, the weight gradient queued for W."""
    group = ctx.group
    grad_full = grad.matmul(weight)  # (b, s, in)
    with trace_range("tp reduce-scatter (sequence-parallel input gradient, B)"):
        grad_x = reduce_scatter(grad_full, 1, group)  # (b, s/tp, in)

    def compute():
        with trace_range("tp all-gather (sequence-parallel input, W)"):
            full = all_gather(x, 1, group)  # (b, s, in): every tp rank runs its W in the same order
        yield from _weight_grads(ctx, grad, full)

    defer(compute)
    return grad_x, None, None, None


def sequence_parallel_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, group: Group):
    """(b, s/tp, in) sequence shard -> (b, s, out/tp): all-gather, then x A^T + b, keeping only the shard for
    backward (a group of one rank: plain F.linear)."""
    if group.size == 1:
        return F.linear(x, weight, bias)
    return _SequenceParallelColumnLinear.apply(x, weight, bias, group)


class ColumnParallelLinear(nn.Module):
    """y = x A^T + b with A split by output rows: each rank computes out_features / tp of the outputs.

    With sequence parallelism the input arrives as a sequence shard (b, s/tp, in), is all-gathered for the
    matmul, and only the shard is kept for backward (_SequenceParallelColumnLinear).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group: Group,
        *,
        bias: bool,
        init_std: float,
        sequence_parallel: bool = False,
    ):
        super().__init__()
        self.group = group
        self.sequence_parallel = sequence_parallel
        out_per_rank = divide(out_features, group.size, "out_features")
        self.weight = mark_tensor_parallel(
            nn.Parameter(_shard_of_full_init(out_features, in_features, init_std, 0, group)), partition_dim=0
        )
        self.bias = mark_tensor_parallel(nn.Parameter(torch.zeros(out_per_rank)), partition_dim=0) if bias else None

    split_backward = False  # zero-bubble schedules: weight gradients wait for W (weight_grads.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, s, in) or (b, s/tp, in) -> (b, s, out/tp)
        if self.sequence_parallel:
            return sequence_parallel_linear(x, self.weight, self.bias, self.group)
        x = copy_to_group(x, self.group)
        return linear(x, self.weight, self.bias) if self.split_backward else F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = x A^T + b with A split by input columns: each rank holds in_features / tp inputs; outputs are summed.

    With sequence parallelism the sum is a reduce-scatter, leaving each rank its sequence shard (b, s/tp, out).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group: Group,
        *,
        bias: bool,
        init_std: float,
        sequence_parallel: bool = False,
    ):
        super().__init__()
        self.group = group
        self.sequence_parallel = sequence_parallel
        divide(in_features, group.size, "in_features")
        self.weight = mark_tensor_parallel(
            nn.Parameter(_shard_of_full_init(out_features, in_features, init_std, 1, group)), partition_dim=1
        )
        # The bias is added once, after the sum over ranks, so it is replicated.
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        if self.bias is not None:
            update_spec(self.bias, sequence_parallel=sequence_parallel)

    split_backward = False  # zero-bubble schedules: weight gradients wait for W (weight_grads.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, s, in/tp) -> (b, s, out) or (b, s/tp, out)
        y = linear(x, self.weight) if self.split_backward else F.linear(x, self.weight)
        y = reduce_scatter_to_sequence(y, self.group) if self.sequence_parallel else reduce_from_group(y, self.group)
        if self.bias is None:
            return y
        return add_bias(y, self.bias) if self.split_backward else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the padded vocabulary split into contiguous row ranges, one per tp rank.

    Rows past the real vocabulary are padding: zero, never looked up, excluded from the logits' softmax.
    """

    def __init__(
        self,
        vocab_size: int,
        padded_vocab_size: int,
        embedding_dim: int,
        group: Group,
        *,
        init_std: float,
        sequence_parallel: bool = False,
    ):
        super().__init__()
        self.group = group
        self.sequence_parallel = sequence_parallel  # sum the ranks' partial lookups with a reduce-scatter
        per_rank = divide(padded_vocab_size, group.size, "padded vocabulary")
        self.vocab_start = group.index * per_rank
        self.vocab_end = self.vocab_start + per_rank
        # Draw only the real rows, so the init does not depend on how much padding the layout needs.
        full = torch.zeros(padded_vocab_size, embedding_dim)
        nn.init.normal_(full[:vocab_size], mean=0.0, std=init_std)
        self.weight = mark_tensor_parallel(
            nn.Parameter(full[self.vocab_start : self.vocab_end].clone()), partition_dim=0
        )

    split_backward = False  # zero-bubble schedules: the weight gradient waits for W (weight_grads.py)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return embedding(ids, self.weight) if self.split_backward else F.embedding(ids, self.weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (b, s) -> (b, s, h), or (b, s/tp, h) sequence-parallel
        if self.group.size == 1:
            return self.lookup(ids)
        # Ids outside this rank's range look up row 0 and are zeroed; the all-reduce fills them from their owner.
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = self.lookup(local).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence(out, self.group)  # (b, s/tp, h)
        return reduce_from_group(out, self.group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross entropy over logits split along the vocabulary, without gathering them.

    loss = log(sum_v exp(z_v - m)) + m - z_label, with the max m, the sum and z_label each all-reduced over tp.
    """

    @staticmethod
    def forward(ctx, logits, labels, vocab_start, group):  # logits (n, V/tp) fp32, labels (n,)
        logits_max = logits.max(dim=-1).values
        all_reduce(logits_max, group, op="max")
        shifted = logits - logits_max.unsqueeze(-1)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        all_reduce(sum_exp, group)

        local_labels = labels - vocab_start
        owned = (local_labels >= 0) & (local_labels < logits.shape[-1])
        local_labels = local_labels.masked_fill(~owned, 0)
        label_logit = shifted.gather(-1, local_labels.unsqueeze(-1)).squeeze(-1).masked_fill(~owned, 0.0)
        all_reduce(label_logit, group)

        loss = sum_exp.log() - label_logit
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_labels, owned)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # (n,)
        # The saved softmax becomes the gradient in place (Megatron does the same, to save a logits-sized
        # buffer), so the graph supports one backward.
        softmax, local_labels, owned = ctx.saved_tensors
        grad = softmax  # d loss / d z = softmax - onehot(label), on the columns this rank owns
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, local_labels] -= owned.to(grad.dtype)
        return grad.mul_(grad_loss.unsqueeze(-1)), None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, vocab_start: int, group: Group
) -> torch.Tensor:
    """Per-token loss (n,) from this rank's logits (n, V/tp) for vocabulary ids [vocab_start, vocab_start + V/tp).

    Columns the caller wants excluded (vocabulary padding) must be -inf: they then get zero probability.
    """
    return _VocabParallelCrossEntropy.apply(logits, labels, vocab_start, group)
