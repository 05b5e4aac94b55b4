"""Data-parallel gradient reduction in buckets during the backward pass, and ZeRO sharding of what it reduces.

Every parameter gets `param.main_grad`, an fp32 view into one flat buffer per bucket (fp32 whatever the model's
dtype, so micro-batches accumulate without bf16/fp16 rounding). A hook that runs as soon as autograd has finished a
parameter's gradient adds it into main_grad and frees param.grad. The hook also counts: once a parameter has
received its gradient from every micro-batch of the step, it is ready, and when every parameter of a bucket is
ready, the bucket's reduction starts asynchronously while backward goes on with earlier layers (and, in a
pipeline, with other micro-batches). `finish()` waits for the reductions.

    zero=0  each bucket is all-reduced: every dp rank holds the whole averaged gradient.
    zero=1  each bucket (padded to a multiple of dp) is reduce-scattered: dp rank r holds the averaged gradient
            only in the r-th 1/dp slice of the bucket, and updates only the parameters (pieces of parameters)
            there. The parameters themselves live in one flat buffer per bucket, so after the update
            `gather_params()` is one in-place all-gather per bucket.
    zero=2  as zero=1, and the rank keeps only its slice of the gradients: `bucket.grad_shard` (fp32, 1/dp) is
            the persistent gradient; the full fp32 buffer exists only while a step accumulates into it (its
            memory is allocated at the bucket's first gradient and given back once reduce-scattered).
    zero=3  as zero=2, and the parameters are sharded too: the rank stores `bucket.param_shard` (1/dp) and the
            full flat parameters are gathered only around each unit's forward and backward (zero3.py); the
            buckets then never cross units (a chunk's root, or one transformer layer).

ZeRO-2/3 with gradient accumulation, two ways (`accumulate`):

    "slice"   (the default) each micro-batch's gradients are reduce-scattered as soon as the bucket has them
              and added into the owned slice; the full buffer is freed in between. num_micro_batches times the
              traffic, and a full buffer lives only while one micro-batch's bucket fills (and one in flight).
    "bucket"  micro-batches add into the full buffer; after the step's last micro-batch the bucket is
              reduce-scattered once into the owned slice. zero=1's traffic, but the full buffers live from a
              bucket's first gradient of the step to the end of backward: during the step, zero=1's memory.

parallel.zero_accumulate picks one; bench/zero.py measures both (docs/benchmarks.md).

`owned_pieces()` lists, as (param, start, end) ranges of the flattened parameter, what this rank updates:
everything with zero=0, its slices with zero >= 1. The optimizer (train/optimizer.py) keeps its state for those,
with its weights at `param_piece()` and its reduced gradient at `grad_piece()`.

Buckets are filled in reverse parameter order, the order backward produces gradients in. The tied token embedding
gets a bucket of its own (ParamSpec.own_bucket, parallel/params.py), so that under zero >= 1 the first and last
pipeline stages slice it identically and its gradient can be summed between them slice by slice (as Megatron).
With dp = 1 every zero level keeps everything whole (there is nothing to shard over).

    buckets = GradBuckets(model.parameters(), dp_group, bucket_bytes=25e6, zero=0)
    buckets.start_step(len(micro_batches))
    for micro_batch in micro_batches:
        (loss(micro_batch) / len(micro_batches)).backward()
    buckets.finish()        # main_grad holds the dp mean (zero >= 1: in this rank's slices); a trainer
                            # calls finalize_grads (parallel/grads.py), which does this and the tp/pp sums
    ... update the owned pieces ...
    buckets.gather_params() # zero 1, 2: every rank gets every slice's updated parameters (zero 3: at next use)
    buckets.zero()
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from megagpt.parallel.comm import all_gather_flat, all_reduce, named_failure, reduce_scatter_flat
from megagpt.parallel.context import Group
from megagpt.parallel.params import spec_of
from megagpt.parallel.trace_ranges import trace_range
from megagpt.parallel.zero3 import ParamGatherer, TransientBytes, alloc_storage, free_storage, has_storage

ACCUMULATE = ("bucket", "slice")


@dataclass(eq=False)  # a bucket is itself: compared and hashed by identity, never by its tensors
class Bucket:
    params: list[torch.nn.Parameter]
    offsets: list[int]  # where each parameter starts in the flat buffers
    buffer: torch.Tensor  # flat fp32 gradients; the params' main_grad views live in it (zero >= 2: transient)
    param_buffer: torch.Tensor | None = None  # zero >= 1: flat parameters (model dtype); the params are views into it
    grad_shard: torch.Tensor | None = None  # zero >= 2: this rank's slice of the reduced fp32 gradient
    param_shard: torch.Tensor | None = None  # zero = 3: this rank's slice of the parameters (param_buffer: transient)
    pending: int = 0  # params whose gradient this backward has not produced yet
    unscattered: int = 0  # gradients added since the bucket was last reduced
    work: object = None  # the in-flight reduction
    launched: bool = False
    launched_after: int = -1  # how many of all the parameters' gradients were ready when it started (observability)


Unit = tuple[torch.nn.Module, list[torch.nn.Parameter]]


class GradBuckets:
    """zero: 0 to 3 (the module docstring). units (zero=3): per model chunk, [(module, its params), ...] in forward
    order, the chunk's root first; the parameters must be those of `params`. accumulate: "bucket" or "slice"."""

    def __init__(
        self,
        params,
        dp_group: Group,
        bucket_bytes: float,
        zero: int = 0,
        units: list[list[Unit]] | None = None,
        accumulate: str = "slice",
    ):
        if zero not in (0, 1, 2, 3) or accumulate not in ACCUMULATE:
            raise ValueError(f"zero={zero} must be 0 to 3 and accumulate={accumulate!r} one of {ACCUMULATE}")
        self.dp_group = dp_group
        self.zero_level = zero
        self.shard = zero >= 1
        self.shard_grads = zero >= 2 and dp_group.size > 1
        self.shard_params = zero >= 3 and dp_group.size > 1
        self.accumulate = accumulate
        self.params = [p for p in params if p.requires_grad]
        self.buckets: list[Bucket] = []
        self.bucket_of: dict[torch.nn.Parameter, Bucket] = {}
        self.offset_of: dict[torch.nn.Parameter, int] = {}
        self.expected = 1  # gradients each parameter receives per step: one per micro-batch
        self.received: dict[torch.nn.Parameter, int] = {}
        self.ready_count = 0  # parameters whose gradient this backward has produced, over all buckets

        if self.shard_params and units is None:
            raise ValueError("zero=3 gathers parameters per unit: pass the model's units")
        unit_params = [self.params] if units is None else [params for chunk in units for _, params in chunk]
        if units is not None and sorted(map(id, sum(unit_params, []))) != sorted(map(id, self.params)):
            raise ValueError("the units must hold exactly the parameters given")
        for bucket_params in self._bucket_groups(unit_params, bucket_bytes):
            self._add_bucket(bucket_params)
        self._reset_counts()
        # The full buffers zero 2 and 3 allocate only while in use (gradients, gathered parameters), counted.
        self.transient = TransientBytes()
        self.gatherer = ParamGatherer(units, self.bucket_of, dp_group, self.transient) if self.shard_params else None

    def _bucket_groups(self, unit_params: list[list], bucket_bytes: float) -> list[list[torch.nn.Parameter]]:
        """Parameters in backward order, cut into buckets of about bucket_bytes, never across a unit."""
        groups = []
        for params in reversed(unit_params):
            current, size = [], 0
            for param in reversed([p for p in params if p.requires_grad]):
                if spec_of(param).own_bucket:
                    groups += [current, [param]] if current else [[param]]
                    current, size = [], 0
                    continue
                current.append(param)
                size += param.numel() * 4
                if size >= bucket_bytes:
                    groups.append(current)
                    current, size = [], 0
            if current:
                groups.append(current)
        return groups

    def _add_bucket(self, params: list[torch.nn.Parameter]) -> None:
        offsets, total = [], 0
        for param in params:
            if hasattr(param, "main_grad"):
                raise ValueError("a parameter already belongs to a GradBuckets; build one per model")
            offsets.append(total)
            total += param.numel()
        if self.shard:  # every dp rank gets an equal slice
            total = -(-total // self.dp_group.size) * self.dp_group.size
        device = params[0].device
        bucket = Bucket(params, offsets, torch.zeros(total, dtype=torch.float32, device=device))
        if self.shard:
            dtypes = {p.dtype for p in params}
            if len(dtypes) > 1:
                raise ValueError(f"a ZeRO bucket needs parameters of one dtype, got {sorted(map(str, dtypes))}")
            bucket.param_buffer = torch.zeros(total, dtype=params[0].dtype, device=device)
        for param, offset in zip(params, offsets):
            param.main_grad = bucket.buffer[offset : offset + param.numel()].view_as(param)
            if bucket.param_buffer is not None:
                flat = bucket.param_buffer[offset : offset + param.numel()].view_as(param)
                flat.copy_(param.detach())
                param.data = flat  # the parameter now lives in the bucket, where the all-gather writes
            self.bucket_of[param] = bucket
            self.offset_of[param] = offset
            param.register_post_accumulate_grad_hook(self._on_grad_ready)
            param.accumulate_main_grad = functools.partial(self.accumulate_main_grad, param)
        low, high = self.owned_range(bucket)
        if self.shard_grads:
            bucket.grad_shard = torch.zeros(high - low, dtype=torch.float32, device=device)
            free_storage(bucket.buffer)
        if self.shard_params:
            bucket.param_shard = bucket.param_buffer[low:high].clone()
            free_storage(bucket.param_buffer)
        self.buckets.append(bucket)

    def owned_range(self, bucket: Bucket) -> tuple[int, int]:
        """The [start, end) of the bucket's flat buffers this rank reduces into and updates."""
        if not self.shard:
            return 0, bucket.buffer.numel()
        size = bucket.buffer.numel() // self.dp_group.size
        return self.dp_group.index * size, (self.dp_group.index + 1) * size

    def owned_pieces(self) -> list[tuple[torch.nn.Parameter, int, int]]:
        """(param, start, end): the ranges of the flattened parameters this rank updates, in parameter order."""
        pieces = []
        for bucket in self.buckets:
            low, high = self.owned_range(bucket)
            for param, offset in zip(bucket.params, bucket.offsets):
                start, end = max(low, offset), min(high, offset + param.numel())
                if start < end:
                    pieces.append((param, start - offset, end - offset))
        order = {param: i for i, param in enumerate(self.params)}
        return sorted(pieces, key=lambda piece: (order[piece[0]], piece[1]))

    def _in_shard(self, shard: torch.Tensor, param: torch.nn.Parameter, start: int, end: int) -> torch.Tensor:
        low, _ = self.owned_range(self.bucket_of[param])
        offset = self.offset_of[param] - low
        return shard[offset + start : offset + end]

    def grad_piece(self, param: torch.nn.Parameter, start: int, end: int) -> torch.Tensor:
        """Where the reduced fp32 gradient of an owned piece lives after finish()."""
        if self.shard_grads:
            return self._in_shard(self.bucket_of[param].grad_shard, param, start, end)
        return param.main_grad.view(-1)[start:end]

    def param_piece(self, param: torch.nn.Parameter, start: int, end: int) -> torch.Tensor:
        """Where the weights of an owned piece are stored (zero=3: this rank's slice; else the parameter)."""
        if self.shard_params:
            return self._in_shard(self.bucket_of[param].param_shard, param, start, end)
        return param.detach().view(-1)[start:end]

    def start_step(self, num_micro_batches: int) -> None:
        """Each parameter will receive one gradient per micro-batch; after the last, its bucket may be reduced."""
        self.expected = num_micro_batches

    def _on_grad_ready(self, param: torch.nn.Parameter) -> None:
        if param.grad is None:  # a zero-bubble B left this gradient to its W (parallel/weight_grads.py)
            return
        grad, param.grad = param.grad, None
        self.accumulate_main_grad(param, lambda main_grad: main_grad.add_(grad))

    def accumulate_main_grad(self, param: torch.nn.Parameter, add: Callable[[torch.Tensor], object]) -> None:
        """add(main_grad) adds one micro-batch's gradient of param into its fp32 main gradient in place; then the
        bucket counts it and may start its reduction. Autograd's gradients arrive here from the post-accumulate
        hook; a zero-bubble W calls it directly (param.accumulate_main_grad), so that a linear's weight gradient
        is accumulated by the matmul itself (addmm into main_grad, Megatron's gradient-accumulation fusion)
        instead of being materialised, handed to autograd and added."""
        bucket = self.bucket_of[param]
        if self.shard_grads:
            self._open(bucket)
        add(param.main_grad)
        bucket.unscattered += 1
        received = self.received[param] = self.received.get(param, 0) + 1
        if received > self.expected:
            raise RuntimeError("a parameter got more gradients than micro-batches; call start_step() and zero()")
        if self.dp_group.size == 1:
            return
        if received == self.expected:
            self.ready_count += 1
            bucket.pending -= 1
        if self.shard_grads and self.accumulate == "slice":
            if bucket.unscattered == len(bucket.params):  # this micro-batch's gradients of the bucket are in
                # Settle the reductions launched before (backward has moved on, they are likely done): at most
                # one full buffer stays in flight, besides the ones filling.
                for earlier in self.buckets:
                    if earlier.work is not None:
                        self._settle(earlier)
                self._launch(bucket)
        elif bucket.pending == 0:
            self._launch(bucket)

    def _open(self, bucket: Bucket) -> None:
        """zero >= 2: make the transient full buffer ready to accumulate into (after its last reduction)."""
        if bucket.work is not None:
            self._settle(bucket)
        if alloc_storage(bucket.buffer):
            bucket.buffer.zero_()
            self.transient.add(bucket.buffer)

    def _launch(self, bucket: Bucket) -> None:
        # Dividing first makes the sum the mean over dp, in the same precision whatever dp is.
        bucket.buffer.div_(self.dp_group.size)
        with trace_range(lambda: f"dp {self._collective} bucket {self.buckets.index(bucket)}"):
            if self.shard:
                bucket.work = reduce_scatter_flat(bucket.buffer, self.dp_group, async_op=True)
            else:
                bucket.work = all_reduce(bucket.buffer, self.dp_group, async_op=True)
        bucket.launched = True
        bucket.unscattered = 0
        bucket.launched_after = self.ready_count

    @property
    def _collective(self) -> str:
        return "reduce-scatter" if self.shard else "all-reduce"

    def _settle(self, bucket: Bucket) -> None:
        """Wait for the bucket's reduction; zero >= 2: add the owned slice into grad_shard, free the buffer."""
        with named_failure(f"the data-parallel gradient {self._collective}", self.dp_group):
            with trace_range(lambda: f"dp wait bucket {self.buckets.index(bucket)}"):
                bucket.work.wait()
        bucket.work = None
        if self.shard_grads:
            low, high = self.owned_range(bucket)
            bucket.grad_shard.add_(bucket.buffer[low:high])
            self.transient.free(bucket.buffer)

    def finish(self) -> None:
        """Wait for every bucket's reduction (starting any whose parameters got no gradient, or, zero >= 2, any
        holding gradients not reduced yet); zero=3: free the parameters backward left gathered."""
        if self.gatherer is not None:
            self.gatherer.release()
        if self.dp_group.size == 1:
            return
        for bucket in self.buckets:
            unreduced = bucket.unscattered > 0 if self.shard_grads else not bucket.launched
            if unreduced:
                self._launch(bucket)
        for bucket in self.buckets:
            if bucket.work is not None:
                self._settle(bucket)

    def gather_params(self) -> None:
        """zero 1 and 2, after this rank updated its slices: give every rank every slice (one all-gather per
        bucket). zero=3 gathers at each unit's next use instead."""
        if not self.shard or self.shard_params or self.dp_group.size == 1:
            return
        works = [all_gather_flat(bucket.param_buffer, self.dp_group, async_op=True) for bucket in self.buckets]
        with named_failure("the ZeRO-1 parameter all-gather", self.dp_group):
            for work in works:
                work.wait()

    def store_param(self, param: torch.nn.Parameter, value: torch.Tensor) -> None:
        """Write a parameter's whole value (a checkpoint's, for this rank's tp shard). zero=3 keeps only this
        rank's slice of it, so loading never holds more than one parameter whole; otherwise the parameter."""
        if not self.shard_params:
            param.copy_(value)
            return
        bucket = self.bucket_of[param]
        low, high = self.owned_range(bucket)
        offset = self.offset_of[param]
        start, end = max(low, offset), min(high, offset + param.numel())
        if start < end:
            bucket.param_shard[start - low : end - low].copy_(value.reshape(-1)[start - offset : end - offset])

    def stored_bytes(self) -> tuple[int, int]:
        """(parameter bytes, gradient bytes) this rank keeps between steps: zero=2 and 3 keep 1/dp of the
        gradients, zero=3 1/dp of the parameters (padded to whole slices)."""
        if self.shard_params:
            params = sum(b.param_shard.numel() * b.param_shard.element_size() for b in self.buckets)
        else:
            params = sum(p.numel() * p.element_size() for p in self.params)
        kept = [b.grad_shard if self.shard_grads else b.buffer for b in self.buckets]
        return params, sum(t.numel() * t.element_size() for t in kept)

    def zero(self) -> None:
        for bucket in self.buckets:
            if self.shard_grads:
                bucket.grad_shard.zero_()
                if has_storage(bucket.buffer):
                    self.transient.free(bucket.buffer)
            else:
                bucket.buffer.zero_()
        for param in self.params:
            param.grad = None  # autograd must not accumulate into main_grad itself
        self._reset_counts()

    def _reset_counts(self) -> None:
        self.ready_count = 0
        self.received.clear()
        for bucket in self.buckets:
            bucket.pending = len(bucket.params)
            bucket.unscattered = 0
            bucket.work, bucket.launched = None, False
