"""Every collective megagpt uses, each a no-op on a group of one rank; the autograd ones as conjugate pairs.

Tensor parallelism (Megatron's mappings), activations (b, s, h) with the sequence on dim 1:

    copy_to_group              forward: identity               backward: all-reduce
    reduce_from_group          forward: all-reduce             backward: identity
    gather_from_group          forward: all-gather (last dim)  backward: split (last dim)

Sequence parallelism replaces the all-reduces around each tensor-parallel block:

    reduce_scatter_to_sequence forward: reduce-scatter (seq)   backward: all-gather (seq dim)

and the column-parallel layers all-gather their sequence shard themselves (tensor_parallel.py's
sequence_parallel_linear: forward all-gather; backward all-gather again, reduce-scatter the input gradient), so
that only the shard is kept for backward. Column-parallel layers consume the full input on every rank, so its
gradient is the sum of the ranks' partial gradients (copy_to_group, or that reduce-scatter); row-parallel layers
produce partial sums of the output (reduce_from_group / reduce_scatter_to_sequence). The embedding enters the
sequence shards through a reduce-scatter of its partial sums too, so no plain split into the sequence is needed.

`comm_stats` counts the calls and bytes of each collective in this process, for benchmarks.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import torch
import torch.distributed as dist

from megagpt.errors import UserError
from megagpt.parallel.context import Group
from megagpt.parallel.trace_ranges import trace_range


class CommunicationError(UserError):
    """A collective failed or timed out (parallel.timeout_s): a peer died, hangs, or runs another layout."""


@contextlib.contextmanager
def named_failure(what: str, group: Group):
    """Turn a backend's failure inside the block into one sentence naming this rank, the operation and the group."""
    try:
        yield
    except RuntimeError as e:
        me = dist.get_rank() if dist.is_initialized() else 0
        raise CommunicationError(
            f"rank {me} failed in {what} over ranks {list(group.ranks)}: {str(e).splitlines()[0]}; a peer process "
            f"died, hangs past parallel.timeout_s, or runs another layout"
        ) from None


comm_stats: dict[str, Counter] = {"calls": Counter(), "bytes": Counter()}


def _count(name: str, x: torch.Tensor) -> None:
    comm_stats["calls"][name] += 1
    comm_stats["bytes"][name] += x.numel() * x.element_size()


def reset_comm_stats() -> None:
    for counter in comm_stats.values():
        counter.clear()


_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
# torch 2.13 renamed the flat-tensor collectives; keep working on torch >= 2.4.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_reduce(x: torch.Tensor, group: Group, op: str = "sum", async_op: bool = False):
    """Reduce x over the group in place; returns x, or the async work handle when async_op."""
    if group.size == 1:
        return None if async_op else x
    _count("all_reduce", x)
    with named_failure(f"all-reduce ({op})", group):
        work = dist.all_reduce(x, op=_REDUCE_OPS[op], group=group.handle, async_op=async_op)
    return work if async_op else x


def _check_divisible(x: torch.Tensor, dim: int, group: Group) -> None:
    if x.shape[dim] % group.size != 0:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} does not split evenly over {group.size} ranks")


def all_gather(x: torch.Tensor, dim: int, group: Group, async_op: bool = False):
    """Concatenate the ranks' x along dim, in rank order. With async_op, (result, work): the result is filled
    once work.wait() returns (work is None for a group of one rank)."""
    if group.size == 1:
        return (x, None) if async_op else x
    x = x.movedim(dim, 0).contiguous()
    out = torch.empty((group.size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    _count("all_gather", out)  # every collective counts its full (unsharded) tensor
    with named_failure("all-gather", group):
        work = _all_gather_flat(out, x, group=group.handle, async_op=async_op)
    return (out.movedim(0, dim), work) if async_op else out.movedim(0, dim)


def reduce_scatter(x: torch.Tensor, dim: int, group: Group, async_op: bool = False):
    """Sum x over the ranks and keep this rank's slice along dim. With async_op, (result, work) as all_gather."""
    if group.size == 1:
        return (x, None) if async_op else x
    _check_divisible(x, dim, group)
    _count("reduce_scatter", x)
    x = x.movedim(dim, 0).contiguous()
    out = torch.empty((x.shape[0] // group.size, *x.shape[1:]), dtype=x.dtype, device=x.device)
    with named_failure("reduce-scatter", group):
        work = _reduce_scatter_flat(out, x, group=group.handle, async_op=async_op)
    return (out.movedim(0, dim), work) if async_op else out.movedim(0, dim)


def wait(work, what: str, group: Group) -> None:
    """Wait for an async collective's work handle (None: nothing was in flight), naming it if it fails (and, in a
    profiler trace, naming the wait "tp wait <what>")."""
    if work is not None:
        with named_failure(what, group), trace_range(lambda: f"tp wait {what}"):
            work.wait()


def _own_slice(full: torch.Tensor, group: Group) -> torch.Tensor:
    shard = full.numel() // group.size
    return full[group.index * shard : (group.index + 1) * shard]


def reduce_scatter_flat(full: torch.Tensor, group: Group, async_op: bool = False):
    """Sum the flat tensor `full` over the ranks; this rank's 1/size slice of it receives its part of the sum
    (in place; the rest of `full` is left as it was). Returns the async work handle when async_op."""
    if group.size == 1:
        return None
    _count("reduce_scatter", full)
    with named_failure("reduce-scatter", group):
        return _reduce_scatter_flat(_own_slice(full, group), full, group=group.handle, async_op=async_op)


def all_gather_flat(full: torch.Tensor, group: Group, async_op: bool = False, local: torch.Tensor | None = None):
    """Fill the flat tensor `full` with every rank's 1/size slice of it, each rank sending its own: in place, or
    from `local` (ZeRO-3 keeps the slice apart from `full`, whose memory is freed between uses)."""
    if group.size == 1:
        if local is not None:
            full.copy_(local)
        return None
    _count("all_gather", full)
    with named_failure("all-gather", group):
        source = _own_slice(full, group) if local is None else local
        return _all_gather_flat(full, source, group=group.handle, async_op=async_op)


def split(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """This rank's slice of x along dim (no communication)."""
    if group.size == 1:
        return x
    _check_divisible(x, dim, group)
    return x.chunk(group.size, dim=dim)[group.index].contiguous()


def broadcast(x: torch.Tensor, src_index: int, group: Group) -> torch.Tensor:
    """Overwrite x with the copy held by the group's src_index-th rank."""
    if group.size > 1:
        _count("broadcast", x)
        with named_failure("broadcast", group):
            dist.broadcast(x, src=group.ranks[src_index], group=group.handle)
    return x


def batch_send_recv(sends: list[tuple[torch.Tensor, int, int]], recvs: list[tuple[torch.Tensor, int, int]]) -> list:
    """Post point-to-point sends and receives, each (tensor, global peer rank, tag), as one batched isend/irecv.
    Returns the work handles: one per operation (gloo) or one for the whole batch (NCCL); the caller waits on all."""
    ops = [dist.P2POp(dist.isend, t, peer, tag=tag) for t, peer, tag in sends]
    ops += [dist.P2POp(dist.irecv, t, peer, tag=tag) for t, peer, tag in recvs]
    for t, _, _ in sends:
        _count("send", t)
    return dist.batch_isend_irecv(ops) if ops else []


def broadcast_text(text: str, src_index: int, group: Group, device: torch.device, max_bytes: int = 4096) -> str:
    """The group's src_index-th rank's text (at most max_bytes of UTF-8), on every rank: for decisions one rank
    makes for all (which checkpoint to load, why the run cannot start)."""
    if group.size == 1:
        return text
    data = text.encode()[:max_bytes]
    encoded = torch.zeros(max_bytes + 8, dtype=torch.uint8)
    encoded[:8] = torch.tensor(list(len(data).to_bytes(8, "little")), dtype=torch.uint8)
    encoded[8 : 8 + len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    encoded = broadcast(encoded.to(device), src_index, group).cpu()
    length = int.from_bytes(bytes(encoded[:8].tolist()), "little")
    return bytes(encoded[8 : 8 + length].tolist()).decode(errors="replace")


def barrier(group: Group) -> None:
    if group.size > 1:
        with named_failure("barrier", group):
            dist.barrier(group=group.handle)


def shutdown(world: Group, finished: bool) -> None:
    """End torch.distributed on this rank. After a finished run every rank first meets the others, so none tears
    its groups down while a peer still uses them: rank 0 hosts the rendezvous store, and when it exited while a
    peer was still destroying its gloo groups, that peer died in C++ ("terminate called without an active
    exception", SIGABRT) after a run that had finished. After an error a peer may be dead: no barrier."""
    if not dist.is_initialized():
        return
    if finished:
        barrier(world)
    dist.destroy_process_group()


def _conjugate_pair(name: str, forward, backward, ops: tuple[str | None, str | None]):
    """An autograd Function doing forward(x, group) in the forward pass and backward(grad, group) in the backward.
    ops names each pass's collective (None: it does not communicate); a pass that communicates shows in profiler
    traces as "tp <op> (<name> forward|backward)"."""
    forward_label, backward_label = (
        f"tp {op} ({name} {direction})" if op else None for op, direction in zip(ops, ("forward", "backward"))
    )

    def forward_pass(ctx, x, group):
        ctx.group = group
        with trace_range(forward_label):
            return forward(x, group)

    def backward_pass(ctx, grad):
        with trace_range(backward_label):
            return backward(grad, ctx.group), None

    return type(
        name,
        (torch.autograd.Function,),
        {"forward": staticmethod(forward_pass), "backward": staticmethod(backward_pass)},
    )


def _identity(x, group):
    return x.view_as(x)  # a new tensor object, so autograd records the Function


def _sum(x, group):
    return all_reduce(x.contiguous(), group)


_CopyToGroup = _conjugate_pair("CopyToGroup", _identity, _sum, (None, "all-reduce"))
_ReduceFromGroup = _conjugate_pair("ReduceFromGroup", _sum, _identity, ("all-reduce", None))
_GatherFromGroup = _conjugate_pair(
    "GatherFromGroup", lambda x, g: all_gather(x, -1, g), lambda d, g: split(d, -1, g), ("all-gather", None)
)
_ReduceScatterToSequence = _conjugate_pair(
    "ReduceScatterToSequence",
    lambda x, g: reduce_scatter(x, 1, g),
    lambda d, g: all_gather(d, 1, g),
    ("reduce-scatter", "all-gather"),
)


def copy_to_group(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Forward identity, backward all-reduce."""
    return x if group.size == 1 else _CopyToGroup.apply(x, group)


def reduce_from_group(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Forward all-reduce, backward identity."""
    return x if group.size == 1 else _ReduceFromGroup.apply(x, group)


def gather_from_group(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Forward all-gather along the last dim, backward split."""
    return x if group.size == 1 else _GatherFromGroup.apply(x, group)


def reduce_scatter_to_sequence(x: torch.Tensor, group: Group) -> torch.Tensor:
    """(b, s, h) partial sums -> (b, s/tp, h) summed. Forward reduce-scatter, backward all-gather."""
    return x if group.size == 1 else _ReduceScatterToSequence.apply(x, group)
