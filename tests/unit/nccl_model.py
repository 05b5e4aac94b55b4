"""A model of NCCL's point-to-point rules, to run the pipeline executor's real communication against on a CPU.

gloo forgives what NCCL does not. The rules modelled, for messages larger than NCCL's buffers (the case that
matters: activations of megabytes):

1. batch_isend_irecv returns ONE work handle for the whole batch (gloo: one per operation);
2. each batch is one group on the rank's single p2p stream, and groups run in posting order;
3. sends and receives between a pair of ranks match by posting order, ignoring tags;
4. a send or receive completes only when the peer's matching operation runs, that is when the peer's group
   holding it is at the head of the peer's stream (rendezvous); a group completes when all its operations do.

`record` runs one rank's executor alone, with a `post` that records each batch's operations and hands back
work handles that record their waits; the executor's program does not depend on the data it receives, so each
rank can be recorded on its own. `replay` then runs all ranks' programs together under the rules and raises
NcclViolation on a deadlock, an operation no peer ever matches, a match between different messages (NCCL would
deliver the wrong tensor), or a work handle never waited for.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

import torch

from megagpt.data.batches import MicroBatch
from megagpt.parallel.pipeline import PipelineExecutor


class NcclViolation(AssertionError):
    pass


@dataclass
class Op:
    rank: int
    peer: int
    kind: str  # "send" or "recv"
    tag: int
    nbytes: int
    group: tuple[int, int] = (0, 0)  # (rank, index of the batch on that rank)
    done: bool = False


@dataclass
class Program:
    """One rank's communication, in order: ("post", group id) and ("wait", group id)."""

    rank: int
    events: list[tuple[str, tuple[int, int]]] = field(default_factory=list)
    groups: dict[tuple[int, int], list[Op]] = field(default_factory=dict)
    handed_out: int = 0
    waited: int = 0


class _Work:
    def __init__(self, program: Program, group: tuple[int, int]):
        self.program, self.group = program, group

    def wait(self, timeout=None):
        self.program.waited += 1
        self.program.events.append(("wait", self.group))


def recording_post(program: Program, one_work_per_batch: bool):
    """A stand-in for comm.batch_send_recv that records the batch and returns NCCL's or gloo's work handles."""

    def post(sends, recvs):
        group = (program.rank, len(program.groups))
        ops = [Op(program.rank, peer, "send", tag, t.numel() * t.element_size(), group) for t, peer, tag in sends]
        ops += [Op(program.rank, peer, "recv", tag, t.numel() * t.element_size(), group) for t, peer, tag in recvs]
        program.groups[group] = ops
        program.events.append(("post", group))
        works = [_Work(program, group)] if one_work_per_batch else [_Work(program, group) for _ in ops]
        program.handed_out += len(works)
        return works

    return post


def _fake_forward(chunk, x, labels):
    """Shaped like a chunk: tokens in on the first stage, the loss out on the last, autograd through both."""
    y = chunk * (x if x.is_floating_point() else torch.ones(x.shape[0], x.shape[1], 2))
    return y.sum() if labels is not None else y


def record(
    pp: int,
    vpp: int,
    pp_rank: int,
    num_micro_batches: int,
    backward: bool,
    one_work_per_batch: bool = True,
    executor_class=PipelineExecutor,
    schedule: str = "auto",
) -> Program:
    program = Program(pp_rank)
    chunks = [torch.nn.Parameter(torch.tensor(1.0)) for _ in range(vpp)]
    seq = 3
    executor = executor_class(
        chunks,
        pp_rank,
        tuple(range(pp)),
        (1, seq, 2),
        torch.device("cpu"),
        datetime.timedelta(seconds=1),
        post=recording_post(program, one_work_per_batch),
        schedule=schedule,
    )
    micro_batches = [MicroBatch.of(torch.zeros(1, seq + 1, dtype=torch.long)) for _ in range(num_micro_batches)]
    executor.run(micro_batches, _fake_forward, backward=backward)
    return program


def _match(programs: list[Program]) -> dict[int, Op]:
    """Pair every send with the receive NCCL would give it: the k-th send from a to b with the k-th receive
    on b from a, in posting order. Returns id(op) -> its partner."""
    queues: dict[tuple[int, int, str], list[Op]] = {}
    for program in programs:
        for kind, group in program.events:
            if kind == "post":
                for op in program.groups[group]:
                    src, dst = (op.rank, op.peer) if op.kind == "send" else (op.peer, op.rank)
                    queues.setdefault((src, dst, op.kind), []).append(op)
    partner = {}
    for (src, dst, kind), ops in queues.items():
        if kind != "send":
            continue
        recvs = queues.get((src, dst, "recv"), [])
        for k, send in enumerate(ops):
            if k >= len(recvs):
                raise NcclViolation(f"send #{k} from rank {src} to rank {dst} (tag {send.tag}) has no receive")
            recv = recvs[k]
            if (send.tag, send.nbytes) != (recv.tag, recv.nbytes):
                raise NcclViolation(
                    f"send #{k} from rank {src} to rank {dst} is message {send.tag} ({send.nbytes} B) but the "
                    f"receive it meets expects {recv.tag} ({recv.nbytes} B): NCCL would deliver the wrong tensor"
                )
            partner[id(send)], partner[id(recv)] = recv, send
    for (src, dst, kind), ops in queues.items():
        if kind == "recv" and len(ops) > len(queues.get((src, dst, "send"), [])):
            raise NcclViolation(f"a receive on rank {dst} from rank {src} has no send")
    return partner


def replay(programs: list[Program]) -> None:
    """Run the ranks' programs together under NCCL's rules; raise NcclViolation if they cannot all finish."""
    for program in programs:
        if program.waited < program.handed_out:
            raise NcclViolation(f"rank {program.rank} never waited for {program.handed_out - program.waited} works")
    partner = _match(programs)
    n = len(programs)
    pc = [0] * n  # each rank's position in its program
    stream: list[list[tuple[int, int]]] = [[] for _ in range(n)]  # posted groups not yet complete, in order
    complete: set[tuple[int, int]] = set()
    progress = True
    while progress:
        progress = False
        for r, program in enumerate(programs):  # run each rank's host side until it waits for something
            while pc[r] < len(program.events):
                kind, group = program.events[pc[r]]
                if kind == "post":
                    stream[r].append(group)
                elif group not in complete:
                    break
                pc[r] += 1
                progress = True
        heads = {stream[r][0] for r in range(n) if stream[r]}
        for r in range(n):  # rendezvous: an operation runs when its partner's group is at its stream's head too
            if not stream[r]:
                continue
            ops = programs[r].groups[stream[r][0]]
            for op in ops:
                if not op.done and partner[id(op)].group in heads:
                    op.done = partner[id(op)].done = True
                    progress = True
            if all(op.done for op in ops):
                complete.add(stream[r].pop(0))
                progress = True
    stuck = [r for r in range(n) if pc[r] < len(programs[r].events) or stream[r]]
    if stuck:
        lines = []
        for r in stuck:
            head = stream[r][0] if stream[r] else None
            waiting = [
                f"{op.kind} {'to' if op.kind == 'send' else 'from'} {op.peer} tag {op.tag}"
                for op in (programs[r].groups[head] if head else [])
                if not op.done
            ]
            lines.append(f"rank {r} at event {pc[r]} of {len(programs[r].events)}, stream head {head}: {waiting}")
        raise NcclViolation("deadlock under NCCL's rules: " + "; ".join(lines))


def check_pipeline(
    pp: int,
    vpp: int,
    num_micro_batches: int,
    backward: bool,
    one_work_per_batch: bool = True,
    executor_class=PipelineExecutor,
    schedule: str = "auto",
) -> list[Program]:
    programs = [
        record(pp, vpp, r, num_micro_batches, backward, one_work_per_batch, executor_class, schedule) for r in range(pp)
    ]
    replay(programs)
    return programs
