"""logging.profile, logging.profile_ranks and logging.memory_snapshot: validation, the named trace ranges (free when
no profiler listens), and StepProfiler's window, file names and memory snapshot. The profiled multi-rank pipeline
run is in tests/distributed/test_pipeline_parallel.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from megagpt.config import profile_steps, validate
from megagpt.errors import ConfigError
from megagpt.parallel.pipeline import ACTION_LABEL, Action, schedule
from megagpt.parallel.trace_ranges import trace_range
from megagpt.train.profiler import MEMORY_HISTORY_ENTRIES, StepProfiler, trace_path
from tests.conftest import REPO, tiny_config


def test_profile_keys_parse_and_validate():
    assert profile_steps(tiny_config().logging) is None
    assert profile_steps(tiny_config("logging.profile=5-7").logging) == (5, 7)
    assert profile_steps(tiny_config("logging.profile=4").logging) == (4, 4)  # an int from the command line
    assert profile_steps(tiny_config("logging.profile= 2 - 3 ").logging) == (2, 3)
    validate(tiny_config("logging.profile=5-7", "logging.profile_ranks=[0,3]"), world_size=4)


@pytest.mark.parametrize(
    "overrides, world, expected",
    [
        (["logging.profile=7-5"], 1, "logging.profile='7-5' must be a step or a range of steps such as '5-7'"),
        (["logging.profile=0"], 1, "logging.profile=0 must be a step or a range"),
        (["logging.profile=a-b"], 1, "logging.profile='a-b' must be a step"),
        (["logging.profile=5-70"], 1, "ends at step 70, after the last step train.iters=20"),
        (["logging.profile=2", "logging.profile_ranks=[0,4]"], 4, "names ranks [4] outside the world of 4"),
        (["logging.profile=2", "logging.profile_ranks=[]"], 1, "must list each rank once"),
        (["logging.profile=2", "logging.profile_ranks=[1,1]"], 2, "must list each rank once"),
        (["logging.memory_snapshot=true"], 1, "set logging.profile too"),
    ],
)
def test_bad_profile_keys_are_one_sentence_each(overrides, world, expected):
    with pytest.raises(ConfigError) as error:
        validate(tiny_config(*overrides), world_size=world)
    assert expected in str(error.value)


def test_memory_snapshot_is_refused_on_the_cpu():
    with pytest.raises(ConfigError, match="memory_snapshot records the CUDA allocator, but train.device=cpu"):
        validate(tiny_config("logging.profile=2", "logging.memory_snapshot=true", "train.device=cpu"))


def test_action_labels_read_back_for_every_kind():
    for action in schedule(2, 2, 0, 4) + [Action("W", 1, 12)]:  # a kind a split-backward schedule may add
        match = ACTION_LABEL.match(action.label)
        assert match and (match.group(1), int(match.group(2)), int(match.group(3))) == (
            action.kind,
            action.micro_batch,
            action.chunk,
        )
    assert Action("F", 0, 3).label == "F mb3 c0"


def test_trace_ranges_record_only_under_a_profiler():
    built = []

    def name():
        built.append(1)
        return "p2p lazily named"

    with trace_range(name), trace_range("F mb0 c0"), trace_range(None):
        pass
    assert not built, "a range's name was built with no profiler listening"
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with trace_range(name), trace_range("F mb0 c0"), trace_range(None):
            torch.ones(2) + 1
    names = {event.name for event in prof.events()}
    assert {"p2p lazily named", "F mb0 c0"} <= names and built == [1]


def run_steps(profiler: StepProfiler, steps, fail_at=None):
    for step in steps:
        with profiler.step(step):
            torch.ones(64, 64) @ torch.ones(64, 64)
            if step == fail_at:
                raise RuntimeError("the step failed")


def step_ranges(path) -> list[str]:
    events = json.loads(path.read_text())["traceEvents"]
    return sorted(e["name"] for e in events if e.get("cat") == "user_annotation" and e["name"].startswith("step "))


def test_step_profiler_keeps_its_window_after_one_warm_up_step(tmp_path):
    cfg = tiny_config(f"logging.dir={tmp_path}", "logging.profile=3-4")
    profiler = StepProfiler(cfg.logging, rank=5, device=torch.device("cpu"))
    run_steps(profiler, range(1, 7))
    path = trace_path(cfg.logging, 5, 3, 4)
    assert path.name == "rank5_steps3-4.json" and [p.name for p in path.parent.iterdir()] == [path.name]
    assert step_ranges(path) == ["step 3", "step 4"]  # step 2 ran under the profiler's warm-up, not kept

    # A run resumed inside the window keeps what is left of it; a rank not listed writes nothing.
    resumed = tiny_config(f"logging.dir={tmp_path / 'resumed'}", "logging.profile=3-5")
    run_steps(StepProfiler(resumed.logging, rank=0, device=torch.device("cpu")), range(4, 7))
    assert step_ranges(trace_path(resumed.logging, 0, 4, 5)) == ["step 4", "step 5"]
    other = tiny_config(f"logging.dir={tmp_path / 'other'}", "logging.profile=1-2", "logging.profile_ranks=[1]")
    run_steps(StepProfiler(other.logging, rank=0, device=torch.device("cpu")), range(1, 4))
    assert not (tmp_path / "other").exists()


def test_a_failing_step_still_writes_what_was_recorded(tmp_path):
    cfg = tiny_config(f"logging.dir={tmp_path}", "logging.profile=1-3")
    with pytest.raises(RuntimeError, match="the step failed"):
        run_steps(StepProfiler(cfg.logging, rank=0, device=torch.device("cpu")), range(1, 4), fail_at=2)
    assert step_ranges(trace_path(cfg.logging, 0, 1, 3)) == ["step 1", "step 2"]


def test_a_run_stopped_inside_the_window_writes_what_was_recorded(tmp_path):
    cfg = tiny_config(f"logging.dir={tmp_path}", "logging.profile=1-4")
    profiler = StepProfiler(cfg.logging, rank=0, device=torch.device("cpu"))
    run_steps(profiler, range(1, 3))
    assert not (tmp_path / "traces").exists() or not list((tmp_path / "traces").iterdir())
    profiler.close(2)  # what Trainer.train does when a stop signal ends the run after step 2
    assert step_ranges(trace_path(cfg.logging, 0, 1, 4)) == ["step 1", "step 2"]


def test_a_run_resumed_after_the_window_stops_recording_cuda_memory(tmp_path, monkeypatch):
    """The snapshot's history is recorded from the start; a run resumed past the window must not record it for
    the rest of the run (the CUDA calls are recorded here: this machine may have no GPU)."""
    calls = []
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", lambda *a, **k: calls.append(k))
    monkeypatch.setattr(torch.cuda.memory, "_dump_snapshot", lambda path: calls.append({"dump": path}))
    cfg = tiny_config(f"logging.dir={tmp_path}", "logging.profile=2-3", "logging.memory_snapshot=true")
    profiler = StepProfiler(cfg.logging, rank=0, device=torch.device("cuda"))
    assert calls == [{"max_entries": MEMORY_HISTORY_ENTRIES}]
    run_steps(profiler, range(5, 7))  # resumed from a checkpoint of step 4
    assert calls[1:] == [{"enabled": None}] and profiler.window is None


def test_memory_snapshot_is_taken_only_on_cuda(tmp_path, monkeypatch):
    """The CPU side of the GPU-only snapshot: a CPU device never touches the CUDA allocator's history."""
    calls = []
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", lambda *a, **k: calls.append((a, k)))
    cfg = tiny_config(f"logging.dir={tmp_path}", "logging.profile=1", "logging.memory_snapshot=true")
    run_steps(StepProfiler(cfg.logging, rank=0, device=torch.device("cpu")), range(1, 3))
    assert not calls


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_memory_snapshot_on_cuda_dumps_the_allocators_history(tmp_path):
    cfg = tiny_config(f"logging.dir={tmp_path}", "logging.profile=2-3", "logging.memory_snapshot=true")
    profiler = StepProfiler(cfg.logging, rank=0, device=torch.device("cuda"))
    for step in range(1, 5):
        with profiler.step(step):
            torch.ones(256, 256, device="cuda") @ torch.ones(256, 256, device="cuda")
    torch.cuda.synchronize()
    snapshot = tmp_path / "traces" / "memory_rank0_step3.pickle"
    assert snapshot.stat().st_size > 0
    import pickle

    assert "segments" in pickle.loads(snapshot.read_bytes())
    assert step_ranges(trace_path(cfg.logging, 0, 2, 3)) == ["step 2", "step 3"]


def test_the_ranges_bench_runs_and_prints_its_ratios(tmp_path):
    cfg = tiny_config(f"logging.dir={tmp_path}", "logging.profile=2")
    profiler = StepProfiler(cfg.logging, rank=0, device=torch.device("cpu"))
    for step in (1, 2):
        with profiler.step(step), trace_range("F mb0 c0"):
            pass
    cmd = [sys.executable, str(REPO / "bench/trace_ranges.py"), "--calls", "200", "--rounds", "1"]
    cmd += ["--trace", str(trace_path(cfg.logging, 0, 2, 2))]
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("nullcontext", "trace_range", "record_function"):
        assert re.search(rf"^{name} +[\d.]+ us/range$", result.stdout, re.M), result.stdout
    assert re.search(r"^1 named ranges per step of [\d.]+ ms", result.stdout, re.M), result.stdout
