"""Profiler traces of chosen steps (logging.profile), and the CUDA allocator's history (logging.memory_snapshot).

    profiler = StepProfiler(cfg.logging, ctx.rank, ctx.device)
    with profiler.step(step_number):     # around each train_step; a no-op outside the window
        trainer_step()

On the ranks logging.profile_ranks names, torch.profiler runs over the steps logging.profile asks for, with one
warm-up step before them when the run has one (torch's schedule: warmup, then active; the profiler does not exist
before), and writes one Chrome / Perfetto trace per rank: logging.dir/traces/rank<r>_steps<first>-<last>.json.
Each step is a range "step <n>"; inside it the ranges of parallel/trace_ranges.py name the pipeline's actions
("F mb3 c0"), its exchanges ("p2p ..."), the gradient buckets ("dp ... bucket 2") and the tensor-parallel
collectives ("tp all-reduce (...)"). tools/plot.py --timeline draws the pipeline from them.

The memory snapshot follows Megatron's --record-memory-history: the allocator's history is recorded from the
start (so the first step's allocations, optimizer state included, are in it) and dumped at the window's end into
logging.dir/traces/memory_rank<r>_step<last>.pickle, for https://pytorch.org/memory_viz. Validation refuses it
on the CPU (megagpt/config.py).
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch

from megagpt.config import LoggingConfig, profile_steps
from megagpt.log import get_logger

WARMUP_STEPS = 1  # profiled but not kept: the first step under a profiler pays for starting it
MEMORY_HISTORY_ENTRIES = 100_000  # the allocator's ring buffer of events (Megatron's and torchtitan's default)


def trace_dir(logging: LoggingConfig) -> Path:
    return Path(logging.dir) / "traces"


def trace_path(logging: LoggingConfig, rank: int, first: int, last: int) -> Path:
    return trace_dir(logging) / f"rank{rank}_steps{first}-{last}.json"


class StepProfiler:
    """Starts torch.profiler just before the window (its warm-up step), steps it after each step, and stops it
    after the window's last step, writing the trace; outside the window it costs one comparison a step."""

    def __init__(self, logging: LoggingConfig, rank: int, device: torch.device):
        self.logging = logging
        self.rank = rank
        self.device = device
        window = profile_steps(logging)
        ranks = logging.profile_ranks
        self.window = window if window is not None and (ranks == "all" or rank in ranks) else None
        self.profiler = None
        self.first_recorded = 0  # the first step the trace keeps (a resumed run may start inside the window)
        self.memory_snapshot = self.window is not None and logging.memory_snapshot and device.type == "cuda"
        if self.memory_snapshot:
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)

    @contextlib.contextmanager
    def step(self, step: int):
        """Around training step `step` (numbered from 1, as logged)."""
        if self.window is not None and self.profiler is None and step > self.window[1]:
            self._stop(step, dump=False)  # resumed after the window: nothing to profile, stop recording memory
        if self.window is None or not self.window[0] - WARMUP_STEPS <= step <= self.window[1]:
            yield
            return
        if self.profiler is None:
            self._start(step)
        try:
            with torch.profiler.record_function(f"step {step}"):
                yield
        except BaseException:
            self._stop(step)  # a failing step still leaves what was recorded
            raise
        self.profiler.step()
        if step == self.window[1]:
            self._stop(step)

    def _start(self, step: int) -> None:
        first, last = self.window
        self.first_recorded = max(first, step)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        warmup = self.first_recorded - step
        with warnings.catch_warnings():  # a window from step 1 (or resumed inside it) has no step to warm up with
            warnings.filterwarnings("ignore", message="Profiler won't be using warmup")
            schedule = torch.profiler.schedule(wait=0, warmup=warmup, active=last - self.first_recorded + 1, repeat=1)
        trace_dir(self.logging).mkdir(parents=True, exist_ok=True)
        self.profiler = torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=self._write)
        self.profiler.__enter__()

    def _write(self, profiler) -> None:
        path = trace_path(self.logging, self.rank, self.first_recorded, self.window[1])
        profiler.export_chrome_trace(str(path))
        get_logger().info(
            f"wrote the profiler trace of steps {self.first_recorded}-{self.window[1]} into {path.parent} (one file "
            f"per rank; open in ui.perfetto.dev, or draw the pipeline: tools/plot.py --timeline {path.parent})"
        )

    def close(self, step: int) -> None:
        """The run stops after `step` (a stop signal, checkpoint.exit_after_minutes): a window still open writes
        what it recorded."""
        if self.profiler is not None:
            self._stop(step)

    def _stop(self, step: int, dump: bool = True) -> None:
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)  # writes the trace if the window was still recording
            self.profiler = None
        self.window = None  # one window per run
        if self.memory_snapshot and not dump:
            torch.cuda.memory._record_memory_history(enabled=None)
            self.memory_snapshot = False
        if self.memory_snapshot:
            path = trace_dir(self.logging) / f"memory_rank{self.rank}_step{step}.pickle"
            torch.cuda.memory._dump_snapshot(str(path))
            torch.cuda.memory._record_memory_history(enabled=None)
            self.memory_snapshot = False
            get_logger().info(f"wrote the CUDA memory snapshot into {path} (open in pytorch.org/memory_viz)")
