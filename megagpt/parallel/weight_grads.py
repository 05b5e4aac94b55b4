"""Backward split in two for the zero-bubble pipeline schedules: B computes the input gradients, W the weights'.

A zero-bubble schedule (parallel/pipeline.py, zb-h1 and zb-h2) runs a micro-batch's backward as B, on the critical
path (the previous stage waits for its input gradient), and W later, in time the stage would otherwise spend
waiting. Nothing is computed twice: during B each layer with weights computes its input gradient and queues a
record of what its weight gradient needs (a linear's input and output gradient, LayerNorm's input, mean and
reciprocal std and output gradient, the embedding's indices and output gradient); W drains the queue.

    queue = WeightGradQueue()
    with deferring(queue):
        torch.autograd.backward(y, grad_y)   # B: input gradients; the layers' weight-gradient work goes to queue
    ...
    queue.run()                              # W: the weight gradients, accumulated like any backward's

W adds each gradient where a plain backward's would go. A parameter of the gradient buckets (data_parallel.py)
takes it straight into its fp32 main gradient through param.accumulate_main_grad, which counts it for the bucket:
a linear's weight gradient is accumulated by the matmul itself (addmm into main_grad where the dtypes agree,
Megatron's gradient-accumulation fusion) and an embedding's by index_add_ into main_grad, so W allocates no
gradient tensor (no vocabulary-sized one for the embeddings) and adds nothing afterwards. Any
other weight (no buckets, or a tensor derived from a parameter) gets its gradient through autograd
(torch.autograd.backward on the weight as the layer received it), i.e. the same AccumulateGrad and hooks as a
plain backward. Either way every gradient is counted once, and a bucket's reduction starts as soon as the W work
of its last parameter is done.

The layers opt in with `split_backward` (set by `enable_split_backward` for the zero-bubble schedules only); without
it they run the plain torch ops, exactly as before. A split layer whose backward runs without a queue (no B of a
zero-bubble schedule is running) computes its weight gradient at once, as a plain backward would.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class MatmulGrad:
    """A linear's weight gradient left as the product a @ b: accumulated by one addmm into main_grad."""

    a: torch.Tensor
    b: torch.Tensor

    @property
    def dtype(self) -> torch.dtype:
        return self.a.dtype

    def materialize(self) -> torch.Tensor:
        return self.a.matmul(self.b)

    def add_to(self, out: torch.Tensor) -> None:
        out.addmm_(self.a, self.b)


@dataclass
class RowsGrad:
    """An embedding's weight gradient left as rows to add at their indices: accumulated by one index_add_ into
    main_grad, with no vocabulary-sized temporary (at GPT-3 175B's width that temporary is 2.5 GB in fp32)."""

    shape: torch.Size
    index: torch.Tensor
    rows: torch.Tensor

    @property
    def dtype(self) -> torch.dtype:
        return self.rows.dtype

    def materialize(self) -> torch.Tensor:
        full = torch.zeros(self.shape, dtype=self.rows.dtype, device=self.rows.device)
        return full.index_add_(0, self.index, self.rows)

    def add_to(self, out: torch.Tensor) -> None:
        out.index_add_(0, self.index, self.rows)


Deferred = MatmulGrad | RowsGrad  # a gradient W can accumulate in place

# (weight as the layer received it, its gradient: a tensor, a Deferred, or None when it needs none)
WeightGrads = Iterable[tuple[torch.Tensor, "torch.Tensor | Deferred | None"]]

# The queue the running B appends to. Module-level on purpose: autograd runs a CUDA backward on its own device
# threads, where a thread-local would not be seen; B itself is one synchronous call on the main thread.
_active: list[WeightGradQueue] = []


class WeightGradQueue:
    """The deferred weight-gradient work of one (model chunk, micro-batch), in the order B produced it."""

    def __init__(self):
        self.work: collections.deque[Callable[[], WeightGrads]] = collections.deque()

    def __len__(self) -> int:
        return len(self.work)

    def run(self) -> None:
        """W: compute the queued weight gradients one layer at a time and accumulate each at once, as a plain
        backward does (so only one layer's gradients and saved tensors are extra at a time, and a bucket's
        reduction starts as soon as its last weight is done). Each weight is used once per chunk's forward in
        the layouts the zero-bubble schedules run, so it gets one gradient per micro-batch (the buckets count)."""
        while self.work:
            compute = self.work.popleft()  # dropping the record frees what it saved
            through_autograd = []
            with torch.no_grad():  # as inside backward, where the work was queued
                for weight, grad in compute():
                    if grad is not None and not _into_main_grad(weight, grad):
                        through_autograd.append((weight, _tensor(grad)))
            del compute
            if through_autograd:
                torch.autograd.backward([w for w, _ in through_autograd], [g for _, g in through_autograd])


def _tensor(grad: torch.Tensor | Deferred) -> torch.Tensor:
    return grad.materialize() if isinstance(grad, (MatmulGrad, RowsGrad)) else grad


def _into_main_grad(weight: torch.Tensor, grad: torch.Tensor | Deferred) -> bool:
    """Accumulate grad into the fp32 main gradient of a bucketed parameter (False: weight is not one)."""
    accumulate = getattr(weight, "accumulate_main_grad", None)
    if accumulate is None:
        return False
    if isinstance(grad, (MatmulGrad, RowsGrad)) and grad.dtype == weight.main_grad.dtype:
        accumulate(grad.add_to)
    else:  # a low-precision gradient is formed first, as autograd's would be, then added in fp32
        value = _tensor(grad)
        accumulate(lambda main_grad: main_grad.add_(value))
    return True


@contextlib.contextmanager
def deferring(queue: WeightGradQueue):
    """Within the block, split layers queue their weight-gradient work on `queue` instead of computing it."""
    _active.append(queue)
    try:
        yield queue
    finally:
        _active.pop()


def has_deferred_queue() -> bool:
    """Whether a zero-bubble B is running (layers with their own backward then leave their weight gradients to W)."""
    return bool(_active)


def defer(compute: Callable[[], WeightGrads]) -> bool:
    """Queue `compute` on the B running now; False when none runs (the caller then computes the gradients itself)."""
    if not _active:
        return False
    _active[-1].work.append(compute)
    return True


def computed(pairs: WeightGrads) -> tuple:
    """The gradients of (weight, gradient) pairs as tensors (None where a weight needs none), for a backward that
    returns them to autograd at once."""
    return tuple(None if grad is None else _tensor(grad) for _, grad in pairs)


def weight_grads_now_or_later(compute: Callable[[], WeightGrads], wanted: int) -> tuple:
    """For a split layer's backward: () x wanted Nones when the work was queued, else the gradients computed now."""
    if defer(compute):
        return (None,) * wanted
    return computed(compute())


def linear_weight_grads(grad, x, weight, bias, want_weight: bool, want_bias: bool) -> WeightGrads:
    """y = x W^T + b: (weight, grad^T x) and (bias, grad summed over rows), from the output gradient and the input."""
    rows = _rows(grad)
    yield weight, MatmulGrad(rows.t(), _rows(x)) if want_weight else None
    yield bias, rows.sum(0) if want_bias else None


def enable_split_backward(model: torch.nn.Module) -> None:
    """Make every layer of `model` that holds weights split its backward into B and W (see the module docstring)."""
    for module in model.modules():
        if hasattr(module, "split_backward"):
            module.split_backward = True


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _wants(tensor: torch.Tensor | None) -> bool:
    return tensor is not None and tensor.requires_grad


class _Linear(torch.autograd.Function):
    """y = x W^T + b; B: grad_x = grad W; W: grad_W = grad^T x, grad_b = sum of grad."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x)
        ctx.weight, ctx.bias = weight, bias  # the tensors as received: W finds their main gradients (or autograd)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        weight, bias = ctx.weight, ctx.bias
        grad_x = grad.matmul(weight) if ctx.needs_input_grad[0] else None

        def compute():
            return linear_weight_grads(grad, x, weight, bias, _wants(weight), _wants(bias))

        return (grad_x, *weight_grads_now_or_later(compute, 2))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear whose weight and bias gradients wait for W under a zero-bubble B."""
    return _Linear.apply(x, weight, bias)


class _AddBias(torch.autograd.Function):
    """y + b over the last dim; B passes the gradient through, W sums it for b."""

    @staticmethod
    def forward(ctx, y, bias):
        ctx.bias = bias
        return y + bias

    @staticmethod
    def backward(ctx, grad):
        bias = ctx.bias
        return (grad, *weight_grads_now_or_later(lambda: [(bias, _rows(grad).sum(0))], 1))


def add_bias(y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return _AddBias.apply(y, bias)


class _Embedding(torch.autograd.Function):
    """F.embedding(ids, W); indices have no gradient, so all of the backward is W's: scatter-add the rows."""

    @staticmethod
    def forward(ctx, ids, weight):
        ctx.save_for_backward(ids)
        ctx.weight = weight
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        weight = ctx.weight

        def compute():
            yield weight, RowsGrad(weight.shape, ids.reshape(-1), _rows(grad))

        return (None, *weight_grads_now_or_later(compute, 1))


def embedding(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return _Embedding.apply(ids, weight)


class _LayerNorm(torch.autograd.Function):
    """Layer norm over the last dim with weight and bias, keeping what torch's keeps (x, mean, rstd); B: the input
    gradient; W: the weight and bias gradients, from the same saved tensors (torch's own backward kernel, each
    half asked for its outputs only)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, mean, rstd = torch.native_layer_norm(x, weight.shape, weight, bias, eps)
        ctx.save_for_backward(x, mean, rstd)
        ctx.weight, ctx.bias = weight, bias
        return y

    @staticmethod
    def backward(ctx, grad):
        x, mean, rstd = ctx.saved_tensors
        weight, bias = ctx.weight, ctx.bias

        def half(mask):
            return torch.ops.aten.native_layer_norm_backward(grad, x, weight.shape, mean, rstd, weight, bias, mask)

        def compute():
            _, grad_weight, grad_bias = half([False, _wants(weight), _wants(bias)])
            return [(weight, grad_weight), (bias, grad_bias)]

        grad_x = half([True, False, False])[0] if ctx.needs_input_grad[0] else None
        return (grad_x, *weight_grads_now_or_later(compute, 2), None)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """Layer norm whose weight and bias gradients wait for W under a zero-bubble B."""
    return _LayerNorm.apply(x, weight, bias, eps)
