"""Pipeline parallelism: which layers a stage holds, the schedules, and the executor that runs them.

Layers are cut into pp * vpp equal virtual stages. Pipeline rank r holds model chunks c = 0 .. vpp-1, chunk c
being virtual stage v = c * pp + r (Megatron's interleaving): with pp=2, vpp=2 and 8 layers, rank 0 holds
layers 0-1 and 4-5, rank 1 holds 2-3 and 6-7. The embedding sits on virtual stage 0, the final LayerNorm,
output layer and loss on the last one.

A schedule is a list of steps for one rank, each of actions F(chunk, micro_batch) and B(chunk, micro_batch),
in warm-up, steady state and cool-down: for 1F1B every action is a step; for the interleaved schedule a
steady-state step is one forward and one backward. The zero-bubble schedules (zb-h1, zb-h2; parallel.pp_schedule)
split each backward into B, the input gradients, and W(chunk, micro_batch), the weight gradients B left
(weight_grads.py), and place W where 1F1B waits. The tests read these lists without any process.

The executor runs the steps: an F needs the activation of the previous virtual stage and sends its output on; a
B needs the output's gradient from the next stage and sends the input's gradient back. After each step the rank
makes one batched exchange with its neighbours, sending what the step produced and receiving what the next step
needs (Megatron's discipline), which completes under NCCL's rules as under gloo's
(tests/unit/test_pipeline_nccl.py); a step's W actions run while its exchange is in flight. A failure names the
stage, the transfers and the peers.
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
from megagpt.parallel.weight_grads import WeightGradQueue, deferring


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


SCHEDULES = ("1f1b", "interleaved", "zb-h1", "zb-h2")
ZERO_BUBBLE = ("zb-h1", "zb-h2")


def resolve_schedule(name: str, vpp: int) -> str:
    """parallel.pp_schedule: "auto" is today's choice by vpp (1F1B, or interleaved for vpp > 1)."""
    if name == "auto":
        return "interleaved" if vpp > 1 else "1f1b"
    return name


@dataclass(frozen=True)
class Action:
    # "F" forward; "B" backward (input and weight gradients, or under a zero-bubble schedule the input gradients
    # only); "W" the weight gradients a zero-bubble B left (parallel/weight_grads.py)
    kind: str
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


def zero_bubble_warmup(name: str, pp: int, pp_rank: int, num_micro_batches: int) -> int:
    """Forwards before the first backward-input pass: ZB-H1 keeps 1F1B's pp - r - 1; ZB-H2 runs 2 (pp - r - 1),
    so that stage r computes forwards until the first gradient arrives instead of waiting for it."""
    warmup = pp - pp_rank - 1 if name == "zb-h1" else 2 * (pp - pp_rank - 1)
    return min(warmup, num_micro_batches)


def zero_bubble_steps(name: str, pp: int, pp_rank: int, num_micro_batches: int) -> list[list[Action]]:
    """ZB-H1 / ZB-H2 (Qi et al. 2023, "Zero Bubble Pipeline Parallelism"), vpp = 1: 1F1B's phases with each
    backward split into B (input gradients, which the previous stage waits for) and W (weight gradients, which
    nobody waits for). Stage r lets r weight passes lag behind their B: the late stages, which hold fewer
    micro-batches under 1F1B, spend that slack postponing W into the cool-down, where 1F1B's stages wait for
    gradients; every stage then holds at most pp micro-batches (ZB-H1: 1F1B's peak, on every stage). B travels
    back at the speed of an input gradient, so the first gradients arrive a W earlier per stage: at equal F, B
    and W times ZB-H1's bubble is a third of 1F1B's. ZB-H2 also fills the warm-up with forwards (2 pp - 1
    micro-batches held on the first stage).

    Each F and B is a step (the executor's exchange rhythm, as 1F1B); a W joins the step before it and runs while
    that step's exchange is in flight, i.e. in the time the stage would spend waiting for its next input."""
    warmup = zero_bubble_warmup(name, pp, pp_rank, num_micro_batches)
    lag = pp_rank  # weight passes that may wait behind their B
    forwards = [Action("F", 0, m) for m in range(num_micro_batches)]
    backwards = [Action("B", 0, m) for m in range(num_micro_batches)]
    steps = [[action] for step in _phases(forwards, backwards, warmup) for action in step]
    done_w = 0
    for step in steps:
        if step[0].kind == "B" and step[0].micro_batch - done_w + 1 > lag:
            step.append(Action("W", 0, done_w))
            done_w += 1
    steps[-1] += [Action("W", 0, m) for m in range(done_w, num_micro_batches)]  # the cool-down's last ones
    return steps


def schedule_steps(pp: int, vpp: int, pp_rank: int, num_micro_batches: int, name: str = "auto") -> list[list[Action]]:
    """One rank's training schedule as steps; after each step the rank exchanges tensors with its neighbours
    once (the executor's rhythm, Megatron's too): each forward and backward for 1F1B and the zero-bubble
    schedules (whose W actions ride along with the step before them), each warm-up forward, steady-state
    forward + backward and cool-down backward for the interleaved schedule."""
    name = resolve_schedule(name, vpp)
    if name in ZERO_BUBBLE:
        return zero_bubble_steps(name, pp, pp_rank, num_micro_batches)
    if name == "1f1b":
        return one_f_one_b_steps(pp, pp_rank, num_micro_batches)
    return interleaved_steps(pp, vpp, pp_rank, num_micro_batches)


def schedule(pp: int, vpp: int, pp_rank: int, num_micro_batches: int, name: str = "auto") -> list[Action]:
    """One rank's training schedule as a flat list of actions."""
    return [action for step in schedule_steps(pp, vpp, pp_rank, num_micro_batches, name) for action in step]


def max_alive_promised(pp: int, vpp: int, pp_rank: int, num_micro_batches: int, name: str = "auto") -> int:
    """The most (chunk, micro-batch) activations a schedule may hold at once on a rank: from a micro-batch's
    forward to its backward, or to its W under a zero-bubble schedule (what a B leaves for W is less than a
    whole activation, so this bounds memory from above)."""
    name = resolve_schedule(name, vpp)
    if name == "zb-h1":
        return min(pp, num_micro_batches)
    if name == "zb-h2":
        return min(2 * pp - 1 - pp_rank, num_micro_batches)
    if vpp == 1:
        return min(pp - pp_rank, num_micro_batches)
    return min((pp - pp_rank - 1) * 2 + (vpp - 1) * pp + 1, num_micro_batches * vpp)


def predicted_bubble(
    name: str, pp: int, vpp: int, num_micro_batches: int, times: tuple[float, float, float] = (1.0, 1.0, 1.0)
) -> float:
    """The time a stage waits per unit of its compute in one step, given the times of a forward, an input-gradient
    pass and a weight-gradient pass, times = (F, B, W), equal by default (Qi et al. 2023): 1F1B waits
    (pp - 1)(F + B + W) in a step of m (F + B + W), (pp - 1) / m whatever the times; interleaved (pp - 1) / (vpp m);
    ZB-H1 (pp - 1)(F + B - W) / (m (F + B + W)), a third of 1F1B's at equal times but more where W is the short
    pass (on CPU, where a forward's elementwise work and a backward's attention have no weight gradient to pair
    with, F > B > W and the ratio can exceed a half: bench/pipeline_bubble.py measures F, B and W), and never less
    than (pp - 1) B, the gradients' way back. These closed forms equal simulated_bubble, the executor's own
    rhythm, which ZB-H2 gets instead: under it ZB-H2's extra warm-up forwards wait for their receives, so its
    bubble exceeds 1F1B's and grows with m (and with free transfers it would still not beat ZB-H1 within one
    synchronised step: its near-zero bubble in the paper comes with letting stages run into the next step)."""
    if pp == 1:
        return 0.0
    name = resolve_schedule(name, vpp)
    f, b, w = times
    if name == "zb-h2":
        return simulated_bubble(name, pp, vpp, num_micro_batches, times)
    if name == "zb-h1":
        return (pp - 1) * max(f + b - w, b) / (num_micro_batches * (f + b + w))
    return (pp - 1) / ((vpp if name == "interleaved" else 1) * num_micro_batches)


def slower_schedule_warning(name: str, pp: int, vpp: int, num_micro_batches: int) -> str | None:
    """A sentence when the chosen schedule is predicted to wait longer than 1F1B at this layout (zb-h2 does,
    under megagpt's exchanges), naming the better choice; None otherwise."""
    name = resolve_schedule(name, vpp)
    if pp == 1 or vpp > 1:
        return None
    bubble, one_f_one_b = (predicted_bubble(n, pp, 1, num_micro_batches) for n in (name, "1f1b"))
    if bubble <= one_f_one_b:
        return None
    zb_h1 = predicted_bubble("zb-h1", pp, 1, num_micro_batches)
    return (
        f"parallel.pp_schedule={name} is predicted to wait {bubble:.0%} of its compute at pp={pp} with "
        f"{num_micro_batches} micro-batches, against {one_f_one_b:.0%} for 1f1b and {zb_h1:.0%} for zb-h1: its "
        f"extra warm-up forwards wait for the next stage to post their receives (docs/parallelism.md); use zb-h1"
    )


# ----------------------------------------------------------------------------------------------------------------
# Transfers: what each step sends and receives


def forward_steps(pp: int, vpp: int, pp_rank: int, num_micro_batches: int, name: str = "auto") -> list[list[Action]]:
    """Evaluation's schedule: the training schedule's forwards in their order, one per step (for vpp > 1,
    groups of pp micro-batches pass through chunk 0, then chunk 1, ...), so every stage keeps busy."""
    return [[a] for a in schedule(pp, vpp, pp_rank, num_micro_batches, name) if a.kind == "F"]


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


def simulated_bubble(
    name: str, pp: int, vpp: int, num_micro_batches: int, times: tuple[float, float, float] = (1.0, 1.0, 1.0)
) -> float:
    """The bubble of a schedule as the executor runs it: each rank computes a step, posts one batch (the step's
    sends and the next step's receives), runs the step's W actions, waits for the whole batch, and a transfer
    happens only once both ends have posted it (a large NCCL send waits for its receive; gloo's sends wait so too).
    Returns the waiting per unit of compute, the same on every rank since the step ends with the last one; times
    = (F, B, W) of a whole stage's pass (a chunk's are 1 / vpp of them; 1F1B's backward is B + W).

    This rendezvous rhythm is what keeps every schedule deadlock-free under NCCL's rules, and it costs 1F1B,
    interleaved 1F1B and ZB-H1 nothing (their closed forms in predicted_bubble equal this simulation,
    tests/unit/test_pipeline_schedule.py). It does cost ZB-H2: a stage's extra warm-up forwards cannot be sent
    before the next stage posts their receives, one step before it uses them, so the upstream stage waits at
    every step and its lead buys nothing."""
    name = resolve_schedule(name, vpp)
    f, b, w = (t / vpp for t in times)
    cost = {"F": f, "B": b if name in ZERO_BUBBLE else b + w, "W": w}
    steps = [schedule_steps(pp, vpp, r, num_micro_batches, name) for r in range(pp)]
    posted: dict[tuple[Transfer, str], float] = {}  # (transfer, "send" or "recv") -> when its end was posted
    pending: list[tuple[int, float, list]] = []  # per rank: (next step, time its W's end, the batch it waits for)
    for r in range(pp):
        _, recvs = step_exchange([], steps[r][0], pp, vpp, r)
        posted.update(((t, "recv"), 0.0) for t in recvs)
        pending.append((0, 0.0, [(t, "recv") for t in recvs]))
    finished = [None] * pp
    while None in finished:
        progressed = False
        for r in range(pp):
            while finished[r] is None:
                i, ready, batch = pending[r]
                other = [(t, "recv" if side == "send" else "send") for t, side in batch]
                if any(end not in posted for end in other):
                    break  # a peer has not posted its side yet
                start = max([ready] + [max(posted[a], posted[b]) for a, b in zip(batch, other)])
                if i == len(steps[r]):
                    finished[r] = start
                    break
                step, next_step = steps[r][i], (steps[r][i + 1] if i + 1 < len(steps[r]) else None)
                computed = start + sum(cost[a.kind] for a in step if a.kind != "W")
                sends, recvs = step_exchange(step, next_step, pp, vpp, r)
                batch = [(t, "send") for t in sends] + [(t, "recv") for t in recvs]
                posted.update((end, computed) for end in batch)
                pending[r] = (i + 1, computed + sum(cost[a.kind] for a in step if a.kind == "W"), batch)
                progressed = True
        if not progressed and None in finished:
            raise RuntimeError(f"schedule {name} deadlocks at pp={pp}, vpp={vpp}, m={num_micro_batches}")
    compute = num_micro_batches * sum(times)
    return (max(finished) - compute) / compute


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
        schedule: str = "auto",
    ):
        self.chunks = chunks
        self.schedule = resolve_schedule(schedule, len(chunks))
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

    def _exchange(
        self, sends: dict[Transfer, torch.Tensor], recvs: list[Transfer], meanwhile=None
    ) -> dict[Transfer, torch.Tensor]:
        """Post the sends and receives as one batch, run meanwhile() (a zero-bubble step's weight passes) while it
        is in flight, wait for all of it, return the received tensors."""
        if not sends and not recvs:
            if meanwhile is not None:
                meanwhile()
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
        if meanwhile is not None:
            meanwhile()
        with self._named(what):
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
        loss_scale multiplies the loss before backward (fp16 loss scaling); the recorded losses are not scaled.
        Under a zero-bubble schedule a step's W actions run while the step's exchange is in flight."""
        num = len(micro_batches)
        steps = (schedule_steps if backward else forward_steps)(self.pp, self.vpp, self.pp_rank, num, self.schedule)
        self._record = StepRecord(_clock=_Clock(self.device))
        self._saved: dict[tuple[int, int], tuple] = {}  # activations of micro-batches awaiting their backward
        self._weight_work: dict[tuple[int, int], WeightGradQueue] = {}  # zero-bubble: what each B left for W
        self._outputs: dict[Transfer, torch.Tensor] = {}  # what the step produced for the neighbours
        self._alive: set[tuple[int, int]] = set()
        self._received = self._exchange_after([], steps[0])
        for i, step in enumerate(steps):
            for action in step:
                if action.kind == "F":
                    self._forward(action, micro_batches, forward, backward)
                elif action.kind == "B":
                    self._backward(action, loss_scale, num)
            weights = [action for action in step if action.kind == "W"]

            def meanwhile(weights=weights):  # while the step's exchange is in flight
                for action in weights:
                    self._weights(action)

            next_step = steps[i + 1] if i + 1 < len(steps) else None
            self._received.update(self._exchange_after(step, next_step, meanwhile if weights else None))
        return self._record

    def _exchange_after(self, step, next_step, meanwhile=None) -> dict[Transfer, torch.Tensor]:
        sends, recvs = step_exchange(step, next_step, self.pp, self.vpp, self.pp_rank)
        return self._exchange({t: self._outgoing(self._outputs.pop(t), t) for t in sends}, recvs, meanwhile)

    def _timed(self, action: Action, compute):
        """compute() marked on the step's clock and named in profiler traces (F, B or W, micro-batch, chunk)."""
        start = self._record._clock.mark()
        with trace_range(action.label):
            result = compute()
        self._record._marks.append((action, start, self._record._clock.mark()))
        return result

    def _hold(self, key: tuple[int, int], alive: bool) -> None:
        """Count a micro-batch's activations held on this chunk from its forward until its backward (or W)."""
        if alive:
            self._alive.add(key)
        else:
            self._alive.discard(key)
        self._record.max_alive = max(self._record.max_alive, len(self._alive))

    def _forward(self, action: Action, micro_batches: Sequence, forward, backward: bool) -> None:
        chunk, m = action.chunk, action.micro_batch
        stage = self._stage(chunk)
        if stage == 0:
            x = micro_batches[m].inputs
        else:
            x = self._received.pop(Transfer("F", stage, m)).requires_grad_(backward)
        labels = micro_batches[m].labels if stage == self.last_stage else None
        with torch.set_grad_enabled(backward):
            y = self._timed(action, lambda: forward(self.chunks[chunk], x, labels))
        if stage == self.last_stage:
            self._record.losses.append(y.detach())
        else:
            self._outputs[Transfer("F", stage + 1, m)] = y.detach()
        if backward:
            self._saved[(chunk, m)] = (x, y)
            self._hold((chunk, m), True)

    def _backward(self, action: Action, loss_scale: float, num: int) -> None:
        """B: the whole backward, or under a zero-bubble schedule the input gradients, queueing the weights' for W."""
        chunk, m = action.chunk, action.micro_batch
        stage = self._stage(chunk)
        x, y = self._saved.pop((chunk, m))
        if stage == self.last_stage:
            # Each micro-batch's mean loss weighs 1 / num (times the fp16 loss scale).
            roots, grads = y * loss_scale / num, None
        else:
            roots, grads = y, self._received.pop(Transfer("B", stage, m))
        if self.schedule in ZERO_BUBBLE:
            queue = self._weight_work[(chunk, m)] = WeightGradQueue()
            with deferring(queue):
                self._timed(action, lambda: torch.autograd.backward(roots, grads))
        else:
            self._timed(action, lambda: torch.autograd.backward(roots, grads))
            self._hold((chunk, m), False)
        if stage > 0:
            self._outputs[Transfer("B", stage - 1, m)] = x.grad

    def _weights(self, action: Action) -> None:
        """W: the weight gradients the micro-batch's B queued."""
        key = (action.chunk, action.micro_batch)
        self._timed(action, self._weight_work.pop(key).run)
        self._hold(key, False)
