"""ZeRO-3 (FSDP-style): each data-parallel rank stores only its 1/dp slice of every parameter; a unit of layers
gathers its whole parameters just before it computes and frees them right after.

A unit is one module with the parameters it owns: a pipeline chunk's root (the embeddings, the final LayerNorm:
whatever is not inside a transformer layer) or one transformer layer. Each unit's parameters live in gradient
buckets of their own (data_parallel.py never lets a bucket cross units), so a unit's gather is one all-gather per
bucket, from the rank's slice `bucket.param_shard` into the flat `bucket.param_buffer`, whose storage the
parameters are views of. Freeing a unit gives that storage back (size 0); the parameter tensors keep their shapes
and their places in autograd's saved tensors, and the next gather refills the same storage before backward
reads them, as FSDP does.

    forward    pre-forward hook: wait for the unit's gather (start it if no one did), start the next unit's
               gather (async: it runs while this unit computes); forward hook: free the unit, and wrap its
               output in an identity whose backward is this unit's pre-backward hook
    backward   pre-backward: gather the unit again, start the gather of the unit backward reaches next
               (the previous layer); when every parameter of the unit has its gradient, free it
    recompute  a layer rerun inside backward (parallel.recompute=full) finds its parameters gathered by its
               pre-backward, or gathers them; a forward that runs inside backward never frees or prefetches

Order within a chunk: forward gathers the root, then layer 0, 1, ...; backward the root, then the last layer
down to layer 0 (the root holds the tied output layer, which backward meets first, and the embedding, which it
meets last, so it stays gathered for the chunk's whole forward and whole backward, like FSDP2's root). Prefetch
never crosses chunks, so the gathers are issued in the same order on every rank of the dp group whatever the
pipeline schedule interleaves: the rule NCCL needs. A gather is waited for before the unit computes and before
its storage is freed; `release()` (after the step's backward) frees every unit.

Pipeline micro-batches gather per use (each micro-batch's forward and backward gather the unit again) rather
than keeping the parameters for the step: keeping them would hold the whole stage's parameters for most of the
step, which is what ZeRO-3 exists to avoid (bench/zero.py measures the cost; docs/benchmarks.md).
"""

from __future__ import annotations

import torch

from megagpt.parallel.comm import all_gather_flat, named_failure
from megagpt.parallel.context import Group


def free_storage(tensor: torch.Tensor) -> None:
    """Give the tensor's memory back, keeping the tensor (and its views) to be refilled by alloc_storage."""
    if tensor.device.type != "meta":
        tensor.untyped_storage().resize_(0)


def alloc_storage(tensor: torch.Tensor) -> bool:
    """Give a freed tensor its memory again (uninitialised); False when it already had it."""
    storage = tensor.untyped_storage()
    nbytes = tensor.numel() * tensor.element_size()
    if tensor.device.type == "meta" or storage.nbytes() == nbytes:
        return False
    storage.resize_(nbytes)
    return True


def has_storage(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "meta" or tensor.untyped_storage().nbytes() > 0


class TransientBytes:
    """Bytes of the full buffers ZeRO-2/3 allocate only while in use, and their peak since `reset_peak()`:
    storage resizes are no operator the CPU allocation tracker (train/memory.py) sees, so they are counted here."""

    def __init__(self):
        self.live = 0
        self.peak = 0

    def add(self, tensor: torch.Tensor) -> None:
        self.live += tensor.numel() * tensor.element_size()
        self.peak = max(self.peak, self.live)

    def free(self, tensor: torch.Tensor) -> None:
        free_storage(tensor)
        self.live -= tensor.numel() * tensor.element_size()

    def reset_peak(self) -> None:
        self.peak = self.live


def in_backward() -> bool:
    """Whether autograd's engine is running this code (a recomputed forward inside backward)."""
    return torch._C._current_graph_task_id() != -1


class _Unit:
    def __init__(self, module: torch.nn.Module, params: list, buckets: list):
        self.module = module
        self.params = params
        self.buckets = buckets
        self.forward_next: _Unit | None = None
        self.backward_next: _Unit | None = None
        self.works: list = []  # in-flight all-gathers
        self.gathered = False  # storage allocated (its values are whole once `works` are waited for)
        self.grads = 0  # parameters of the unit whose gradient this backward has delivered


class _PreBackward(torch.autograd.Function):
    """Identity on a unit's output; its backward, which runs just before the unit's own, gathers the unit."""

    @staticmethod
    def forward(ctx, x, unit, gatherer):
        ctx.unit, ctx.gatherer = unit, gatherer
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.gatherer.use(ctx.unit, ctx.unit.backward_next)
        return grad, None, None


class ParamGatherer:
    """Gathers and frees the units' parameters around their forward and backward (see the module docstring).

    chunks: per pipeline chunk, its units in forward order, the root first: [(module, params), ...].
    bucket_of: each parameter's bucket (with `param_buffer` and `param_shard`)."""

    def __init__(
        self, chunks: list[list[tuple[torch.nn.Module, list]]], bucket_of: dict, dp_group: Group, transient=None
    ):
        self.dp_group = dp_group
        self.transient = transient if transient is not None else TransientBytes()
        self.units: list[_Unit] = []
        self.unit_of: dict = {}
        for chunk in chunks:
            units = []
            for module, params in chunk:
                buckets = list({id(bucket_of[p]): bucket_of[p] for p in params}.values())
                unit = _Unit(module, params, buckets)
                units.append(unit)
                for param in params:
                    self.unit_of[param] = unit
                    param.register_post_accumulate_grad_hook(self._on_grad)
                module.register_forward_pre_hook(self._pre_forward(unit))
                module.register_forward_hook(self._post_forward(unit))
            root, layers = units[0], units[1:]
            for earlier, later in zip([root, *layers], layers):
                earlier.forward_next = later
            for earlier, later in zip([root, *layers[::-1]], layers[::-1]):
                earlier.backward_next = later
            self.units += units

    def _pre_forward(self, unit: _Unit):
        def hook(module, args):
            self.use(unit, None if in_backward() else unit.forward_next)

        return hook

    def _post_forward(self, unit: _Unit):
        def hook(module, args, output):
            if in_backward():  # a recomputed forward: backward still needs the parameters
                return output
            self.free(unit)
            if isinstance(output, torch.Tensor) and output.requires_grad:
                return _PreBackward.apply(output, unit, self)
            return output

        return hook

    def _on_grad(self, param) -> None:
        unit = self.unit_of[param]
        unit.grads += 1
        if unit.grads == len(unit.params):  # the unit's backward is done
            self.free(unit)

    def start(self, unit: _Unit) -> None:
        """Start gathering the unit's parameters (async), unless they are gathered or on their way."""
        if unit.gathered:
            return
        for bucket in unit.buckets:
            if alloc_storage(bucket.param_buffer):
                self.transient.add(bucket.param_buffer)
            unit.works.append(
                all_gather_flat(bucket.param_buffer, self.dp_group, async_op=True, local=bucket.param_shard)
            )
        unit.gathered = True

    def wait(self, unit: _Unit) -> None:
        with named_failure("the ZeRO-3 parameter all-gather", self.dp_group):
            for work in unit.works:
                if work is not None:
                    work.wait()
        unit.works = []

    def use(self, unit: _Unit, prefetch: _Unit | None) -> None:
        """Make the unit's parameters whole now, and start gathering `prefetch`'s for what runs next."""
        self.start(unit)
        self.wait(unit)
        if prefetch is not None:
            self.start(prefetch)

    def free(self, unit: _Unit) -> None:
        unit.grads = 0
        if not unit.gathered:
            return
        self.wait(unit)  # never free memory a collective still writes into
        for bucket in unit.buckets:
            self.transient.free(bucket.param_buffer)
        unit.gathered = False

    def release(self) -> None:
        """Free every unit (after a step's backward: a unit whose parameters all got no gradient stays gathered)."""
        for unit in self.units:
            self.free(unit)
