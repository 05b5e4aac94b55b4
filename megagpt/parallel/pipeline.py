"""Pipeline parallelism: which layers a stage holds, the schedules, and the executor that runs them.

Layers are cut into pp * vpp equal virtual stages. Pipeline rank r holds model chunks c = 0 .. vpp-1, chunk c
being virtual stage v = c * pp + r (Megatron's interleaving): with pp=2, vpp=2 and 8 layers, rank 0 holds
layers 0-1 and 4-5, rank 1 holds 2-3 and 6-7. The embedding sits on virtual stage 0, the final LayerNorm,
output layer and loss on the last one.

A schedule is a list of steps for one rank, each of actions F(chunk, micro_batch) and B(chunk, micro_batch),
in warm-up, steady state and cool-down: for 1F1B every action is a step; for the interleaved schedule a
steady-state step is one forward and one backward. The tests read these lists without any process.

The executor runs the steps: an F needs the activation of the previous virtual stage and sends its output on; a
B needs the output's gradient from the next stage and sends the input's gradient back. After each step the rank
makes one batched exchange with its neighbours, sending what the step produced and receiving what the next step
needs (Megatron's discipline), which completes under NCCL's rules as under gloo's
(tests/unit/test_pipeline_nccl.py). A failure names the stage, the transfers and the peers.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from megagpt.errors import UserError
from megagpt.parallel.comm import batch_send_recv
from megagpt.parallel.trace_ranges import trace_range


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

    @functools.cached_property
    def label(self) -> str:
        """Its name in profiler traces and timelines, built once: kind, micro-batch, chunk, e.g. 'F mb3 c0'."""
        return f"{self.kind} mb{self.micro_batch} c{self.chunk}"


# An Action.label read back from a trace: (kind, micro-batch, chunk).
ACTION_LABEL = re.compile(r"^([A-Z]+) mb(\d+) c(\d+)$")


def _phases(forwards: list[Action], backwards: list[Action], warmup: int) -> list[list[Action]]:
    """The schedule as steps: each warm-up forward alone (filling the pipeline), then steady-state steps of one
    forward and one backward (1F1B), then each remaining backward alone (draining it)."""
    steady = len(forwards) - warmup
    steps = [[f] for f in forwards[:warmup]]
    steps += [[forwards[warmup + i], backwards[i]] for i in range(steady)]
    steps += [[b] for b in backwards[steady:]]
    return steps


def one_f_one_b_steps(pp: int, pp_rank: int, num_micro_batches: int) -> list[list[Action]]:
    """1F1B: stage r runs pp - r - 1 warm-up forwards, so it holds at most pp - r micro-batches' activations.
    With pp=1 this is plain gradient accumulation: F0 B0 F1 B1 ...
    Each action is a step of its own (Megatron's 1F1B exchanges after every forward and every backward): were
    a steady-state forward and backward one step, the gradient for the backward would have to arrive before
    the forward could start, and the stages would take turns instead of overlapping."""
    warmup = min(pp - pp_rank - 1, num_micro_batches)
    forwards = [Action("F", 0, m) for m in range(num_micro_batches)]
    backwards = [Action("B", 0, m) for m in range(num_micro_batches)]
    return [[action] for step in _phases(forwards, backwards, warmup) for action in step]


def interleaved_steps(pp: int, vpp: int, pp_rank: int, num_micro_batches: int) -> list[list[Action]]:
    """Interleaved 1F1B (Megatron's virtual pipeline): micro-batches go through the chunks in groups of pp, so
    the bubble shrinks by vpp; num_micro_batches must be a multiple of pp."""
    total = num_micro_batches * vpp

    def micro_batch(k: int) -> int:  # the k-th virtual micro-batch's micro-batch within its chunk
        return (k // (pp * vpp)) * pp + k % pp

    forwards = [Action("F", (k // pp) % vpp, micro_batch(k)) for k in range(total)]
    backwards = [Action("B", vpp - 1 - (k // pp) % vpp, micro_batch(k)) for k in range(total)]
    warmup = min((pp - pp_rank - 1) * 2 + (vpp - 1) * pp, total)
    return _phases(forwards, backwards, warmup)


def schedule_steps(pp: int, vpp: int, pp_rank: int, num_micro_batches: int) -> list[list[Action]]:
    """One rank's training schedule as steps; after each step the rank exchanges tensors with its neighbours
    once (the executor's rhythm, Megatron's too): each action for 1F1B, each warm-up forward, steady-state
    forward + backward and cool-down backward for the interleaved schedule."""
    if vpp == 1:
        return one_f_one_b_steps(pp, pp_rank, num_micro_batches)
    return interleaved_steps(pp, vpp, pp_rank, num_micro_batches)


def schedule(pp: int, vpp: int, pp_rank: int, num_micro_batches: int) -> list[Action]:
    """One rank's training schedule as a flat list of actions."""
    return [action for step in schedule_steps(pp, vpp, pp_rank, num_micro_batches) for action in step]


def max_alive_promised(pp: int, vpp: int, pp_rank: int, num_micro_batches: int) -> int:
    """The most (chunk, micro-batch) activations a schedule may hold at once on a rank."""
    if vpp == 1:
        return min(pp - pp_rank, num_micro_batches)
    return min((pp - pp_rank - 1) * 2 + (vpp - 1) * pp + 1, num_micro_batches * vpp)


# ----------------------------------------------------------------------------------------------------------------
# Transfers: what each step sends and receives


def forward_steps(pp: int, vpp: int, pp_rank: int, num_micro_batches: int) -> list[list[Action]]:
    """Evaluation's schedule: the training schedule's forwards in their order, one per step (for vpp > 1,
    groups of pp micro-batches pass through chunk 0, then chunk 1, ...), so every stage keeps busy."""
    return [[a] for a in schedule(pp, vpp, pp_rank, num_micro_batches) if a.kind == "F"]


@dataclass(frozen=True, order=True)
class Transfer:
    """One tensor between neighbouring virtual stages: the activation ("F") a stage receives for its forward of a
    micro-batch, or the gradient ("B") it receives for its backward. Sender and receiver name it alike."""

    kind: str
    stage: int  # the virtual stage that receives it
    micro_batch: int

    def describe(self) -> str:
        what = "activation" if self.kind == "F" else "gradient"
        return f"the {what} of micro-batch {self.micro_batch}"


def step_exchange(
    step: list[Action], next_step: list[Action] | None, pp: int, vpp: int, pp_rank: int
) -> tuple[list[Transfer], list[Transfer]]:
    """(what this rank sends after `step`, what it receives for `next_step`), each in one canonical order.

    NCCL matches a pair of ranks' sends and receives by posting order, ignoring tags, so both ends list the
    transfers between them sorted the same way (with pp=2 activations and gradients share a pair of ranks)."""
    last = pp * vpp - 1
    sends, recvs = [], []
    for action in step:
        stage = virtual_stage(pp, pp_rank, action.chunk)
        if action.kind == "F" and stage < last:
            sends.append(Transfer("F", stage + 1, action.micro_batch))
        if action.kind == "B" and stage > 0:
            sends.append(Transfer("B", stage - 1, action.micro_batch))
    for action in next_step or []:
        stage = virtual_stage(pp, pp_rank, action.chunk)
        if (action.kind == "F" and stage > 0) or (action.kind == "B" and stage < last):
            recvs.append(Transfer(action.kind, stage, action.micro_batch))
    return sorted(sends), sorted(recvs)


# ----------------------------------------------------------------------------------------------------------------
# Executor


@dataclass
class StepRecord:
    """What one run of a schedule did on this rank (for the trainer's loss and for tests)."""

    losses: list[torch.Tensor] = field(default_factory=list)  # per micro-batch, last stage only
    max_alive: int = 0  # most micro-batches whose activations were held at once
    exchanges: int = 0  # batched send/receive groups posted
    _marks: list = field(default_factory=list)  # (action, start mark, end mark) from the clock
    _clock: object = None

    @property
    def events(self) -> list[tuple[Action, float, float]]:
        """(action, start, end) of each forward/backward computation in seconds on one timeline (wall-clock on
        CPU; on GPU CUDA events placed on it, read here, which waits for the step's kernels)."""
        return [(action, *self._clock.seconds(start, end)) for action, start, end in self._marks]

    @property
    def order(self) -> list[Action]:
        return [action for action, _, _ in self._marks]

    @property
    def busy_s(self) -> float:
        """Seconds spent computing forwards and backwards (the rest of a step is waiting)."""
        return sum(end - start for _, start, end in self.events)


class _Clock:
    """Marks the start and end of computations. On CUDA time.time() would measure kernel launches, not kernels,
    so marks are CUDA events there, converted to seconds only when someone reads them."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.origin_s = time.time()
            self.origin = self.mark()

    def mark(self):
        if not self.cuda:
            return time.time()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> tuple[float, float]:
        if not self.cuda:
            return start, end
        end.synchronize()
        return tuple(self.origin_s + self.origin.elapsed_time(event) / 1e3 for event in (start, end))


class PipelineExecutor:
    """Runs schedules over this rank's model chunks.

    chunks[c] is this rank's model chunk c; pp_ranks are the global ranks of the pipeline group, in stage order;
    hidden_shape is the activation shape passed between stages, (micro_batch, s or s/tp, h), in the model's
    dtype (train.precision); gradients travel back in the same shape and dtype. post(sends, recvs) posts one
    batched exchange of (tensor, peer, tag) and returns its work handles: one per operation (gloo) or one for the
    whole batch (NCCL); comm.batch_send_recv when None, a model of a backend in tests.

    Communication follows Megatron's schedules: after each step (schedule_steps) one batched exchange carries the
    step's outputs and the next step's inputs, and is waited for before the next step computes. Every rank's
    exchanges with a neighbour pair up one to one with the neighbour's, in the same order, so the schedule
    completes under NCCL's rules (per-pair matching in posting order, one stream per rank, a large send waiting
    for its receive) as well as under gloo's; tests/unit/test_pipeline_nccl.py replays it against those rules.
    A failure names the stage, the transfer and the peer. On CPU each wait has parallel.timeout_s; on CUDA a
    wait only orders the streams (a timeout there would spin the CPU until the transfer ends), and the process
    group's timeout, parallel.timeout_s, with NCCL's watchdog ends a hung transfer.
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
        post=None,
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
        self.post = post
        self.last_stage = self.pp * self.vpp - 1

    @property
    def needs_inputs(self) -> bool:
        """Whether this rank holds the first virtual stage, the one that embeds the micro-batches' tokens."""
        return any(self._stage(chunk) == 0 for chunk in range(self.vpp))

    @property
    def needs_labels(self) -> bool:
        """Whether this rank holds the last virtual stage, the one whose loss needs the micro-batches' labels."""
        return any(self._stage(chunk) == self.last_stage for chunk in range(self.vpp))

    def _rank_of_stage(self, stage: int) -> int:
        return self.pp_ranks[stage % self.pp]

    def _peer(self, transfer: Transfer, sending: bool) -> int:
        """The other end of a transfer: an activation flows from stage - 1 to stage, a gradient from stage + 1."""
        source = transfer.stage - 1 if transfer.kind == "F" else transfer.stage + 1
        return self._rank_of_stage(transfer.stage if sending else source)

    def _tag(self, transfer: Transfer) -> int:
        # Unique per message: gloo matches by tag; NCCL ignores tags and relies on the canonical order.
        return (transfer.micro_batch * (self.pp * self.vpp) + transfer.stage) * 2 + (transfer.kind == "B")

    def _stage(self, chunk: int) -> int:
        return virtual_stage(self.pp, self.pp_rank, chunk)

    @contextlib.contextmanager
    def _named(self, describe):
        """A backend failure or timeout inside the block becomes one sentence naming this stage and the operation
        (describe() says which; it runs only on a failure, not on every exchange)."""
        try:
            yield
        except RuntimeError as e:
            what = describe()
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

    def _exchange(self, sends: dict[Transfer, torch.Tensor], recvs: list[Transfer]) -> dict[Transfer, torch.Tensor]:
        """Post the sends and receives as one batch, wait for all of it, return the received tensors."""
        if not sends and not recvs:
            return {}
        buffers = {t: torch.empty(self.hidden_shape, dtype=self.dtype, device=self.device) for t in recvs}

        def what() -> str:
            parts = [f"sending {t.describe()} to rank {self._peer(t, True)}" for t in sends]
            return ", ".join(parts + [f"receiving {t.describe()} from rank {self._peer(t, False)}" for t in recvs])

        def label() -> str:
            parts = [f"send {t.kind} mb{t.micro_batch} s{t.stage}" for t in sends]
            return "p2p " + " ".join(parts + [f"recv {t.kind} mb{t.micro_batch} s{t.stage}" for t in recvs])

        with self._named(what), trace_range(label):
            works = (self.post or batch_send_recv)(
                [(tensor, self._peer(t, True), self._tag(t)) for t, tensor in sends.items()],
                [(buffers[t], self._peer(t, False), self._tag(t)) for t in recvs],
            )
            for work in works:  # one per operation (gloo) or one for the batch (NCCL)
                if self.device.type == "cuda":
                    work.wait()
                else:
                    work.wait(self.timeout)
        self._record.exchanges += 1
        return buffers

    def _outgoing(self, tensor: torch.Tensor, transfer: Transfer) -> torch.Tensor:
        if tensor.dtype != self.dtype or tuple(tensor.shape) != self.hidden_shape:
            raise PipelineError(
                f"pipeline stage {self.pp_rank} would send {transfer.describe()} of {tuple(tensor.shape)} "
                f"{tensor.dtype}, but stages exchange {self.hidden_shape} {self.dtype}"
            )
        return tensor.contiguous()

    def run(self, micro_batches: Sequence, forward, *, backward: bool, loss_scale: float = 1.0) -> StepRecord:
        """Run one step's schedule. micro_batches: a sequence of this dp rank's micro-batches, each with `.inputs`
        (mbs, s) token ids, read only where this rank holds the first stage, and `.labels` (mbs, s), read only where
        it holds the last one (data/batches.py); a rank holding neither only takes len(micro_batches).
        forward(chunk_module, x, labels) -> the chunk's output (the mean loss on the last stage).
        Without backward (evaluation) micro-batches only flow forward, in the training schedule's forward order.
        loss_scale multiplies the loss before backward (fp16 loss scaling); the recorded losses are not scaled."""
        num = len(micro_batches)
        steps = (schedule_steps if backward else forward_steps)(self.pp, self.vpp, self.pp_rank, num)
        clock = _Clock(self.device)
        record = self._record = StepRecord(_clock=clock)
        saved: dict[tuple[int, int], tuple] = {}  # activations of micro-batches awaiting their backward

        def exchange(step, next_step):
            sends, recvs = step_exchange(step, next_step, self.pp, self.vpp, self.pp_rank)
            return self._exchange({t: self._outgoing(outputs.pop(t), t) for t in sends}, recvs)

        outputs: dict[Transfer, torch.Tensor] = {}
        received = exchange([], steps[0])
        for i, step in enumerate(steps):
            for action in step:
                chunk, m = action.chunk, action.micro_batch
                stage = self._stage(chunk)
                if action.kind == "F":
                    if stage == 0:
                        x = micro_batches[m].inputs
                    else:
                        x = received.pop(Transfer("F", stage, m)).requires_grad_(backward)
                    labels = micro_batches[m].labels if stage == self.last_stage else None
                    start = clock.mark()
                    with torch.set_grad_enabled(backward), trace_range(action.label):
                        y = forward(self.chunks[chunk], x, labels)
                    record._marks.append((action, start, clock.mark()))
                    if stage == self.last_stage:
                        record.losses.append(y.detach())
                    else:
                        outputs[Transfer("F", stage + 1, m)] = y.detach()
                    if backward:
                        saved[(chunk, m)] = (x, y)
                        record.max_alive = max(record.max_alive, len(saved))
                else:
                    x, y = saved.pop((chunk, m))
                    start = clock.mark()
                    with trace_range(action.label):
                        if stage == self.last_stage:
                            # Each micro-batch's mean loss weighs 1 / num.
                            torch.autograd.backward(y * loss_scale / num)
                        else:
                            torch.autograd.backward(y, received.pop(Transfer("B", stage, m)))
                    record._marks.append((action, start, clock.mark()))
                    if stage > 0:
                        outputs[Transfer("B", stage - 1, m)] = x.grad
            received.update(exchange(step, steps[i + 1] if i + 1 < len(steps) else None))
        return record
