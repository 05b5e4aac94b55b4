"""Data-parallel gradient reduction: fp32 gradient buffers, reduced across dp in buckets during the backward pass.

Every parameter gets `param.main_grad`, a view into one flat fp32 buffer per bucket. A hook that runs as soon
as autograd has finished a parameter's gradient adds it into main_grad (so micro-batches accumulate there) and
frees param.grad. The hook also counts: once a parameter has received its gradient from every micro-batch of
the step, it is ready, and when every parameter of a bucket is ready, the bucket's all-reduce starts
asynchronously while backward goes on with earlier layers (and, in a pipeline, with other micro-batches).
`finish()` waits for the reductions and points param.grad at main_grad for the optimizer.

Buckets are filled in reverse parameter order, the order backward produces gradients in.

    buckets = GradBuckets(model.parameters(), dp_group, bucket_bytes=25e6)
    buckets.start_step(len(micro_batches))
    for micro_batch in micro_batches:
        (loss(micro_batch) / len(micro_batches)).backward()
    buckets.finish()        # grads now hold the dp mean
    optimizer.step()
    buckets.zero()
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megagpt.parallel.comm import all_reduce, named_failure
from megagpt.parallel.context import Group


@dataclass
class Bucket:
    params: list[torch.nn.Parameter]
    buffer: torch.Tensor  # flat fp32, the params' main_grad views live in it
    pending: int = 0  # params whose gradient this backward has not produced yet
    work: object = None  # the in-flight all-reduce
    launched: bool = False
    launched_after: int = -1  # how many of all the parameters' gradients were ready when it started (observability)


class GradBuckets:
    def __init__(self, params, dp_group: Group, bucket_bytes: float):
        self.dp_group = dp_group
        self.params = [p for p in params if p.requires_grad]
        self.buckets: list[Bucket] = []
        self.bucket_of: dict[torch.nn.Parameter, Bucket] = {}
        self.expected = 1  # gradients each parameter receives per step: one per micro-batch
        self.received: dict[torch.nn.Parameter, int] = {}
        self.ready_count = 0  # parameters whose gradient this backward has produced, over all buckets

        groups, current, size = [], [], 0
        for param in reversed(self.params):
            current.append(param)
            size += param.numel() * 4
            if size >= bucket_bytes:
                groups.append(current)
                current, size = [], 0
        if current:
            groups.append(current)

        for bucket_params in groups:
            device = bucket_params[0].device
            buffer = torch.zeros(sum(p.numel() for p in bucket_params), dtype=torch.float32, device=device)
            bucket = Bucket(bucket_params, buffer)
            offset = 0
            for param in bucket_params:
                if hasattr(param, "main_grad"):
                    raise ValueError("a parameter already belongs to a GradBuckets; build one per model")
                param.main_grad = buffer[offset : offset + param.numel()].view_as(param)
                offset += param.numel()
                self.bucket_of[param] = bucket
                param.register_post_accumulate_grad_hook(self._on_grad_ready)
            self.buckets.append(bucket)
        self._reset_counts()

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
        bucket.work = all_reduce(bucket.buffer, self.dp_group, async_op=True)
        bucket.launched = True
        bucket.launched_after = self.ready_count

    def finish(self) -> None:
        """Wait for every bucket's reduction (starting any whose parameters got no gradient), then expose grads."""
        if self.dp_group.size > 1:
            for bucket in self.buckets:
                if not bucket.launched:
                    self._launch(bucket)
                with named_failure("the data-parallel gradient all-reduce", self.dp_group):
                    bucket.work.wait()
        for param in self.params:
            param.grad = param.main_grad

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
