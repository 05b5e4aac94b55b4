"""Data-parallel gradient reduction in buckets during the backward pass, and ZeRO-1 sharding of what it reduces.

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

`owned_pieces()` lists, as (param, start, end) ranges of the flattened parameter, what this rank updates:
everything with zero=0, its slices with zero=1. The optimizer (train/optimizer.py) keeps its state for those.

Buckets are filled in reverse parameter order, the order backward produces gradients in. The tied token embedding
gets a bucket of its own (ParamSpec.own_bucket, parallel/params.py), so that under zero=1 the first and last
pipeline stages slice it identically and its gradient can be summed between them slice by slice (as Megatron).

    buckets = GradBuckets(model.parameters(), dp_group, bucket_bytes=25e6, shard=False)
    buckets.start_step(len(micro_batches))
    for micro_batch in micro_batches:
        (loss(micro_batch) / len(micro_batches)).backward()
    buckets.finish()        # main_grad holds the dp mean (in this rank's slices with shard=True); a trainer
                            # calls finalize_grads (parallel/grads.py), which does this and the tp/pp sums
    ... update the owned pieces ...
    buckets.gather_params() # shard=True: every rank gets every slice's updated parameters
    buckets.zero()
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megagpt.parallel.comm import all_gather_flat, all_reduce, named_failure, reduce_scatter_flat
from megagpt.parallel.context import Group
from megagpt.parallel.params import spec_of
from megagpt.parallel.trace_ranges import trace_range


@dataclass
class Bucket:
    params: list[torch.nn.Parameter]
    offsets: list[int]  # where each parameter starts in the flat buffers
    buffer: torch.Tensor  # flat fp32 gradients; the params' main_grad views live in it
    param_buffer: torch.Tensor | None = None  # zero=1: flat parameters (model dtype); the params are views into it
    pending: int = 0  # params whose gradient this backward has not produced yet
    work: object = None  # the in-flight reduction
    launched: bool = False
    launched_after: int = -1  # how many of all the parameters' gradients were ready when it started (observability)


class GradBuckets:
    def __init__(self, params, dp_group: Group, bucket_bytes: float, shard: bool = False):
        self.dp_group = dp_group
        self.shard = shard
        self.params = [p for p in params if p.requires_grad]
        self.buckets: list[Bucket] = []
        self.bucket_of: dict[torch.nn.Parameter, Bucket] = {}
        self.expected = 1  # gradients each parameter receives per step: one per micro-batch
        self.received: dict[torch.nn.Parameter, int] = {}
        self.ready_count = 0  # parameters whose gradient this backward has produced, over all buckets

        groups, current, size = [], [], 0
        for param in reversed(self.params):
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
        for bucket_params in groups:
            self._add_bucket(bucket_params)
        self._reset_counts()

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
                raise ValueError(f"a ZeRO-1 bucket needs parameters of one dtype, got {sorted(map(str, dtypes))}")
            bucket.param_buffer = torch.zeros(total, dtype=params[0].dtype, device=device)
        for param, offset in zip(params, offsets):
            param.main_grad = bucket.buffer[offset : offset + param.numel()].view_as(param)
            if bucket.param_buffer is not None:
                flat = bucket.param_buffer[offset : offset + param.numel()].view_as(param)
                flat.copy_(param.detach())
                param.data = flat  # the parameter now lives in the bucket, where the all-gather writes
            self.bucket_of[param] = bucket
            param.register_post_accumulate_grad_hook(self._on_grad_ready)
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

    def start_step(self, num_micro_batches: int) -> None:
        """Each parameter will receive one gradient per micro-batch; after the last, its bucket may be reduced."""
        self.expected = num_micro_batches

    def _on_grad_ready(self, param: torch.nn.Parameter) -> None:
        param.main_grad.add_(param.grad)
        param.grad = None
        received = self.received[param] = self.received.get(param, 0) + 1
        if received < self.expected or self.dp_group.size == 1:
            return
        if received > self.expected:
            raise RuntimeError("a parameter got more gradients than micro-batches; call start_step() and zero()")
        bucket = self.bucket_of[param]
        self.ready_count += 1
        bucket.pending -= 1
        if bucket.pending == 0:
            self._launch(bucket)

    def _launch(self, bucket: Bucket) -> None:
        # Dividing first makes the sum the mean over dp, in the same precision whatever dp is.
        bucket.buffer.div_(self.dp_group.size)
        with trace_range(lambda: f"dp {self._collective} bucket {self.buckets.index(bucket)}"):
            if self.shard:
                bucket.work = reduce_scatter_flat(bucket.buffer, self.dp_group, async_op=True)
            else:
                bucket.work = all_reduce(bucket.buffer, self.dp_group, async_op=True)
        bucket.launched = True
        bucket.launched_after = self.ready_count

    @property
    def _collective(self) -> str:
        return "reduce-scatter" if self.shard else "all-reduce"

    def finish(self) -> None:
        """Wait for every bucket's reduction (starting any whose parameters got no gradient)."""
        if self.dp_group.size == 1:
            return
        for i, bucket in enumerate(self.buckets):
            if not bucket.launched:
                self._launch(bucket)
            what = f"the data-parallel gradient {self._collective}"
            with named_failure(what, self.dp_group), trace_range(lambda i=i: f"dp wait bucket {i}"):
                bucket.work.wait()

    def gather_params(self) -> None:
        """zero=1, after this rank updated its slices: give every rank every slice (one all-gather per bucket)."""
        if not self.shard or self.dp_group.size == 1:
            return
        works = [all_gather_flat(bucket.param_buffer, self.dp_group, async_op=True) for bucket in self.buckets]
        with named_failure("the ZeRO-1 parameter all-gather", self.dp_group):
            for work in works:
                work.wait()

    def zero(self) -> None:
        for bucket in self.buckets:
            bucket.buffer.zero_()
        for param in self.params:
            param.grad = None  # autograd must not accumulate into main_grad itself
        self._reset_counts()

    def _reset_counts(self) -> None:
        self.ready_count = 0
        self.received.clear()
        for bucket in self.buckets:
            bucket.pending = len(bucket.params)
            bucket.work, bucket.launched = None, False
