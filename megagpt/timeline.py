"""The pipeline timeline of a profiled run, read back from the Chrome traces logging.profile wrote.

    timeline = read_timeline("runs/x/traces")          # every rank's trace; the last profiled step
    for row in timeline.rows:                           # one per rank
        for block in row.blocks:                        # its forwards and backwards, in order
            block.kind, block.micro_batch, block.chunk, block.start_ms, block.end_ms

The blocks are the record_function ranges the pipeline executor names after its actions (Action.label,
'F mb3 c0'; any kind a schedule adds, such as a split backward's, is read the same way), inside the trace's
"step <n>" range (train/profiler.py), so evaluation's forwards between steps are left out.

Clocks: a trace's times are microseconds of the host's wall clock (baseTimeNanoseconds + ts), so the traces of
ranks on one host share a clock and are drawn as measured. Ranks on other hosts have other clocks (NTP keeps them
within about a millisecond, not always better); each further host is shifted so that its ranks' mean end of the
step matches the first host's: every step ends in the optimizer's gradient-norm all-reduce, which all ranks leave
within a collective's latency of each other.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from megagpt.errors import UserError
from megagpt.parallel.pipeline import ACTION_LABEL

_TRACE_NAME = re.compile(r"^rank(\d+)_steps(\d+)-(\d+)\.json$")
_STEP = re.compile(r"^step (\d+)$")


@dataclass(frozen=True)
class Block:
    kind: str  # the action's kind: "F", "B", or a kind a schedule adds
    micro_batch: int
    chunk: int
    start_ms: float  # from the step's start (the earliest rank's), on the aligned clock
    end_ms: float


@dataclass
class RankRow:
    rank: int
    host: str
    step_start_ms: float  # this rank's "step <n>" range
    step_end_ms: float
    blocks: list[Block] = field(default_factory=list)

    @property
    def busy_ms(self) -> float:
        return sum(b.end_ms - b.start_ms for b in self.blocks)

    @property
    def idle_fraction(self) -> float:
        """The share of the step this rank spent outside forwards and backwards (the bubble, exchanges, optimizer)."""
        span = self.step_end_ms - self.step_start_ms
        return 1.0 - self.busy_ms / span if span > 0 else 0.0


@dataclass
class Timeline:
    step: int
    rows: list[RankRow]  # by rank
    hosts_aligned: int  # hosts whose clocks were shifted onto the first host's (0 on one host)
    world_size: int | None  # of the profiled run, from the traces' distributedInfo (None: not distributed)


def trace_files(folder: str | Path) -> dict[int, Path]:
    """rank -> its trace in `folder` (a run folder or its traces/); the newest window's file when there are several."""
    folder = Path(folder)
    if (folder / "traces").is_dir():
        folder = folder / "traces"
    found: dict[int, tuple[int, Path]] = {}
    for path in sorted(folder.glob("rank*_steps*.json")):
        match = _TRACE_NAME.match(path.name)
        if match:
            rank, last = int(match.group(1)), int(match.group(3))
            if rank not in found or last > found[rank][0]:
                found[rank] = (last, path)
    if not found:
        raise UserError(
            f"{folder} holds no profiler traces (rank<r>_steps<a>-<b>.json); train with logging.profile set, e.g. "
            f"logging.profile=5-7, and pass the run folder"
        )
    return {rank: path for rank, (_, path) in sorted(found.items())}


def _absolute_events(path: Path) -> tuple[str, list[tuple[str, float, float]], int | None]:
    """(host name, [(name, start_us, end_us)] of the trace's user_annotation ranges on the host's wall clock,
    the world size)."""
    try:
        trace = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the profiler trace {path}: {e}; profile the run again") from None
    base_us = trace.get("baseTimeNanoseconds", 0) / 1e3
    events = [
        (e["name"], base_us + e["ts"], base_us + e["ts"] + e.get("dur", 0.0))
        for e in trace.get("traceEvents", [])
        if e.get("cat") == "user_annotation" and e.get("ph") == "X"
    ]
    world_size = (trace.get("distributedInfo") or {}).get("world_size")
    return str(trace.get("host_name", "")), events, world_size


def _step_range(events, step: int | None) -> tuple[int, float, float] | None:
    steps = {int(m.group(1)): (start, end) for name, start, end in events if (m := _STEP.match(name))}
    if not steps:
        return None
    chosen = max(steps) if step is None else step
    return (chosen, *steps[chosen]) if chosen in steps else None


def read_timeline(folder: str | Path, step: int | None = None) -> Timeline:
    """Every rank's forwards and backwards during training step `step` (default: the last one profiled)."""
    files = trace_files(folder)
    traces = {rank: _absolute_events(path) for rank, path in files.items()}
    raw = {rank: (host, events) for rank, (host, events, _) in traces.items()}
    world_size = next((world for _, _, world in traces.values() if world), None)
    if step is None:  # the last step every rank profiled
        last = [_step_range(events, None) for _, events in raw.values()]
        if not any(last):
            raise UserError(
                f"the traces in {folder} hold no training step ('step N' range); profile a run with "
                "logging.profile and point at its traces folder"
            )
        step = min(found[0] for found in last if found is not None)
    ranges = {rank: _step_range(events, step) for rank, (_, events) in raw.items()}
    missing = sorted(rank for rank, found in ranges.items() if found is None)
    if missing:
        raise UserError(f"the traces of ranks {missing} hold no range 'step {step}'; choose a profiled step")
    offsets = _host_offsets({rank: (raw[rank][0], ranges[rank][2]) for rank in raw})
    origin = min(ranges[rank][1] - offsets[raw[rank][0]] for rank in raw)
    rows = []
    for rank, (host, events) in raw.items():
        _, start, end = ranges[rank]
        shift = origin + offsets[host]  # absolute us -> ms from the step's start on the aligned clock

        def ms(t: float, shift=shift) -> float:
            return (t - shift) / 1e3

        row = RankRow(rank, host, ms(start), ms(end))
        for name, b_start, b_end in sorted(events, key=lambda e: e[1]):
            match = ACTION_LABEL.match(name)
            if match and start <= b_start and b_end <= end:
                kind, micro_batch, chunk = match.group(1), int(match.group(2)), int(match.group(3))
                row.blocks.append(Block(kind, micro_batch, chunk, ms(b_start), ms(b_end)))
        rows.append(row)
    return Timeline(step, rows, hosts_aligned=len(offsets) - 1, world_size=world_size)


def _host_offsets(step_ends: dict[int, tuple[str, float]]) -> dict[str, float]:
    """host -> microseconds to subtract from its clock to put it on the first rank's host's clock, matching the
    hosts' mean step ends (see the module docstring)."""
    by_host: dict[str, list[float]] = {}
    for rank in sorted(step_ends):
        host, end = step_ends[rank]
        by_host.setdefault(host, []).append(end)
    means = {host: sum(ends) / len(ends) for host, ends in by_host.items()}
    reference = means[next(iter(by_host))]
    return {host: mean - reference for host, mean in means.items()}
