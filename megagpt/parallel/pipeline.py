"""Pipeline parallelism: which layers a stage holds, the schedules, and the executor that runs them.

Layers are cut into pp * vpp equal virtual stages. Pipeline rank r holds model chunks c = 0 .. vpp-1, chunk c
being virtual stage v = c * pp + r (Megatron's interleaving): with pp=2, vpp=2 and 8 layers, rank 0 holds
layers 0-1 and 4-5, rank 1 holds 2-3 and 6-7. The embedding sits on virtual stage 0, the final LayerNorm,
output layer and loss on the last one.

A schedule is a plain list of actions for one rank, F(chunk, micro_batch) and B(chunk, micro_batch), built
below as warm-up, steady state and cool-down; the tests read these lists without any process. The executor
runs a list: before an F it receives the activation from the previous virtual stage, after it sends its
output on; a B receives the output's gradient from the next stage and sends the input's gradient back.
Sends are posted asynchronously and waited for at the end of the step, receives are waited for at once, so
any order that respects the data dependencies runs without deadlock. Every wait has a timeout and a failure
names the stage, the operation and the peer.
"""

from __future__ import annotations

import contextlib
import datetime
import time
from dataclasses import dataclass, field

import torch

from megagpt.errors import UserError
from megagpt.parallel.comm import batch_send_recv


class PipelineError(UserError):
    """A pipeline send or receive failed or timed out: a peer died, hangs or disagrees on shapes."""


# ----------------------------------------------------------------------------------------------------------------
# Partition


def virtual_stage(pp: int, pp_rank: int, chunk: int) -> int:
    return chunk * pp + pp_rank


def stage_layers(num_layers: int, pp: int, vpp: int, pp_rank: int, chunk: int) -> range:
    """The global layer indices of one model chunk; num_layers must be a multiple of pp * vpp."""
    per_stage = num_layers // (pp * vpp)
    start = virtual_stage(pp, pp_rank, chunk) * per_stage
    return range(start, start + per_stage)


# ----------------------------------------------------------------------------------------------------------------
# Schedules


@dataclass(frozen=True)
class Action:
    kind: str  # "F" forward or "B" backward
    chunk: int
    micro_batch: int

    def __repr__(self) -> str:
        return f"{self.kind}{self.chunk}.{self.micro_batch}"


def _merge(forwards: list[Action], backwards: list[Action], warmup: int) -> list[Action]:
    """warm-up forwards, then one forward and one backward at a time, then the remaining backwards."""
    steady = len(forwards) - warmup
    order = forwards[:warmup]  # warm-up: fill the pipeline
    for i in range(steady):  # steady state: 1F1B
        order += [forwards[warmup + i], backwards[i]]
    order += backwards[steady:]  # cool-down: drain it
    return order


def one_f_one_b(pp: int, pp_rank: int, num_micro_batches: int) -> list[Action]:
    """1F1B: stage r runs pp - r - 1 warm-up forwards, so it holds at most pp - r micro-batches' activations.
    With pp=1 this is plain gradient accumulation: F0 B0 F1 B1 ..."""
    warmup = min(pp - pp_rank - 1, num_micro_batches)
    forwards = [Action("F", 0, m) for m in range(num_micro_batches)]
    backwards = [Action("B", 0, m) for m in range(num_micro_batches)]
    return _merge(forwards, backwards, warmup)


def interleaved_one_f_one_b(pp: int, vpp: int, pp_rank: int, num_micro_batches: int) -> list[Action]:
    """Interleaved 1F1B (Megatron's virtual pipeline): micro-batches go through the chunks in groups of pp, so
    the bubble shrinks by vpp; num_micro_batches must be a multiple of pp."""
    total = num_micro_batches * vpp

    def micro_batch(k: int) -> int:  # the k-th virtual micro-batch's micro-batch within its chunk
        return (k // (pp * vpp)) * pp + k % pp

    forwards = [Action("F", (k // pp) % vpp, micro_batch(k)) for k in range(total)]
    backwards = [Action("B", vpp - 1 - (k // pp) % vpp, micro_batch(k)) for k in range(total)]
    warmup = min((pp - pp_rank - 1) * 2 + (vpp - 1) * pp, total)
    return _merge(forwards, backwards, warmup)


def schedule(pp: int, vpp: int, pp_rank: int, num_micro_batches: int) -> list[Action]:
    if vpp == 1:
        return one_f_one_b(pp, pp_rank, num_micro_batches)
    return interleaved_one_f_one_b(pp, vpp, pp_rank, num_micro_batches)


def max_alive_promised(pp: int, vpp: int, pp_rank: int, num_micro_batches: int) -> int:
    """The most (chunk, micro-batch) activations a schedule may hold at once on a rank."""
    if vpp == 1:
        return min(pp - pp_rank, num_micro_batches)
    return min((pp - pp_rank - 1) * 2 + (vpp - 1) * pp + 1, num_micro_batches * vpp)


# ----------------------------------------------------------------------------------------------------------------
# Executor


@dataclass
class StepRecord:
    """What one run of a schedule did on this rank (for the trainer's loss and for tests)."""

    losses: list[torch.Tensor] = field(default_factory=list)  # per micro-batch, last stage only
    # (action, start, end) of each forward/backward computation, wall-clock seconds (time.time)
    events: list[tuple[Action, float, float]] = field(default_factory=list)
    max_alive: int = 0  # most micro-batches whose activations were held at once
    max_in_flight: int = 0  # most sent tensors not yet delivered at once
    busy_s: float = 0.0  # seconds spent computing forwards and backwards (the rest of a step is waiting)

    @property
    def order(self) -> list[Action]:
        return [action for action, _, _ in self.events]


class PipelineExecutor:
    """Runs schedules over this rank's model chunks.

    chunks[c] is this rank's model chunk c; pp_ranks are the global ranks of the pipeline group, in stage order;
    hidden_shape is the activation shape passed between stages, (micro_batch, s or s/tp, h), in the model's
    dtype (train.precision); gradients travel back in the same shape and dtype.
    """

    def __init__(
        self,
        chunks,
        pp_rank: int,
        pp_ranks: tuple[int, ...],
        hidden_shape: tuple[int, ...],
        device: torch.device,
        timeout: datetime.timedelta,
        dtype: torch.dtype = torch.float32,
    ):
        self.chunks = chunks
        self.pp = len(pp_ranks)
        self.vpp = len(chunks)
        self.pp_rank = pp_rank
        self.pp_ranks = pp_ranks
        self.hidden_shape = hidden_shape
        self.dtype = dtype
        self.device = device
        self.timeout = timeout
        self.last_stage = self.pp * self.vpp - 1

    # where a chunk's input comes from and its output goes: (global rank, chunk there)
    def _prev(self, chunk: int) -> tuple[int, int]:
        if self.pp_rank > 0:
            return self.pp_ranks[self.pp_rank - 1], chunk
        return self.pp_ranks[-1], chunk - 1

    def _next(self, chunk: int) -> tuple[int, int]:
        if self.pp_rank < self.pp - 1:
            return self.pp_ranks[self.pp_rank + 1], chunk
        return self.pp_ranks[0], chunk + 1

    def _tag(self, kind: str, stage: int, micro_batch: int) -> int:
        # Unique per message, so gloo matches each receive to its send whatever else is in flight.
        return (micro_batch * (self.pp * self.vpp) + stage) * 2 + (kind == "B")

    def _stage(self, chunk: int) -> int:
        return virtual_stage(self.pp, self.pp_rank, chunk)

    def _receives(self, action: Action) -> bool:
        stage = self._stage(action.chunk)
        return stage > 0 if action.kind == "F" else stage < self.last_stage

    @contextlib.contextmanager
    def _named(self, what: str):
        """A backend failure or timeout inside the block becomes one sentence naming this stage and the operation."""
        try:
            yield
        except RuntimeError as e:
            reason = str(e).splitlines()[0]
            me = f"pipeline stage {self.pp_rank} (rank {self.pp_ranks[self.pp_rank]})"
            if "timed out" in reason.lower() or "timeout" in reason.lower():
                raise PipelineError(
                    f"{me} timed out after {self.timeout.total_seconds():.0f}s (parallel.timeout_s) {what}: {reason}; "
                    f"a peer process hangs or died"
                ) from None
            raise PipelineError(
                f"{me} failed {what}: {reason}; a peer process died or disagrees on the layout"
            ) from None

    def _send(self, tensor: torch.Tensor, peer: int, tag: int, what: str, pair_with_next_receive: bool) -> None:
        """Post a send now, or, when this rank's next action receives, post it together with that receive (the
        pairing that keeps backends without tags, like NCCL, from deadlocking)."""
        if tensor.dtype != self.dtype or tuple(tensor.shape) != self.hidden_shape:
            raise PipelineError(
                f"pipeline stage {self.pp_rank} would send {what} of {tuple(tensor.shape)} {tensor.dtype}, but stages "
                f"exchange {self.hidden_shape} {self.dtype}"
            )
        self._sends.append((tensor.contiguous(), peer, tag))
        if not pair_with_next_receive:
            self._post([], f"sending {what} to rank {peer}")

    def _post(self, recvs: list, what: str) -> list:
        with self._named(what):
            works = batch_send_recv(self._sends, recvs)
        num_sends = len(self._sends)
        for work, (tensor, _, tag) in zip(works, self._sends):
            self._in_flight[tag] = (work, tensor)
        self._sends = []
        self._record.max_in_flight = max(self._record.max_in_flight, len(self._in_flight))
        return works[num_sends:]

    def _delivered(self, tag: int) -> None:
        """A send known to have reached its peer: complete it and free its tensor."""
        if tag in self._in_flight:
            work, _ = self._in_flight.pop(tag)
            with self._named("completing a delivered send"):
                work.wait(self.timeout)

    def _limit_in_flight(self, limit: int) -> None:
        """Wait for the oldest gradient sends while more than `limit` are in flight. Each channel is FIFO, so the
        oldest is the next its peer receives, and the peer needs nothing more from this rank to get there."""
        gradient_tags = [tag for tag in self._in_flight if tag % 2 == 1]
        for tag in gradient_tags[: max(0, len(gradient_tags) - limit)]:
            self._delivered(tag)

    def _recv(self, peer: int, tag: int, what: str) -> torch.Tensor:
        buffer = torch.empty(self.hidden_shape, dtype=self.dtype, device=self.device)
        what = f"receiving {what} from rank {peer}"
        (work,) = self._post([(buffer, peer, tag)], what)
        with self._named(what):
            work.wait(self.timeout)
        return buffer

    def run(self, micro_batches: list[torch.Tensor], forward, *, backward: bool, loss_scale: float = 1.0) -> StepRecord:
        """Run one step's schedule. micro_batches: this dp rank's token tensors (mbs, s + 1).
        forward(chunk_module, x, labels) -> the chunk's output (the mean loss on the last stage).
        Without backward (evaluation) every micro-batch only flows forward. loss_scale multiplies the loss
        before backward (fp16 loss scaling); the recorded losses are not scaled."""
        num = len(micro_batches)
        if backward:
            actions = schedule(self.pp, self.vpp, self.pp_rank, num)
        else:
            actions = [Action("F", c, m) for m in range(num) for c in range(self.vpp)]
        record = self._record = StepRecord()
        self._sends, self._in_flight = [], {}  # in flight: tag -> (work, tensor), oldest first
        saved: dict[tuple[int, int], tuple] = {}  # activations of micro-batches awaiting their backward
        for i, action in enumerate(actions):
            chunk, m = action.chunk, action.micro_batch
            stage = self._stage(chunk)
            next_receives = i + 1 < len(actions) and self._receives(actions[i + 1])
            if action.kind == "F":
                if stage == 0:
                    x = micro_batches[m][:, :-1]
                else:
                    peer, _ = self._prev(chunk)
                    x = self._recv(peer, self._tag("F", stage, m), f"the activation of micro-batch {m}")
                    x.requires_grad_(backward)
                labels = micro_batches[m][:, 1:] if stage == self.last_stage else None
                started = time.time()
                with torch.set_grad_enabled(backward):
                    y = forward(self.chunks[chunk], x, labels)
                record.events.append((action, started, time.time()))
                if stage == self.last_stage:
                    record.losses.append(y.detach())
                else:
                    peer, _ = self._next(chunk)
                    what = f"the activation of micro-batch {m}"
                    self._send(y.detach(), peer, self._tag("F", stage + 1, m), what, next_receives)
                if backward:
                    saved[(chunk, m)] = (x, y)
                    record.max_alive = max(record.max_alive, len(saved))
            else:
                x, y = saved.pop((chunk, m))
                if stage == self.last_stage:
                    started = time.time()
                    # Each micro-batch's mean loss weighs 1 / num.
                    torch.autograd.backward(y * loss_scale / num)
                else:
                    peer, _ = self._next(chunk)
                    grad = self._recv(peer, self._tag("B", stage, m), f"the gradient of micro-batch {m}")
                    # The next stage sent this gradient after using our activation: that send is delivered.
                    self._delivered(self._tag("F", stage + 1, m))
                    started = time.time()
                    torch.autograd.backward(y, grad)
                record.events.append((action, started, time.time()))
                if stage > 0:
                    peer, _ = self._prev(chunk)
                    what = f"the gradient of micro-batch {m}"
                    self._send(x.grad, peer, self._tag("B", stage - 1, m), what, next_receives)
                    self._limit_in_flight(max_alive_promised(self.pp, self.vpp, self.pp_rank, num))
        if self._sends:
            self._post([], "sending the step's last transfers")
        for tag in list(self._in_flight):
            self._delivered(tag)
        record.busy_s = sum(end - start for _, start, end in record.events)
        return record
