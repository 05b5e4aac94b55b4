"""tools/plot.py: metrics figures of one run and of several, the pipeline timeline read from profiler traces (clock
alignment across hosts included), and its one-sentence errors. A real profiled pipeline run's traces are read in
tests/distributed/test_pipeline_parallel.py."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest

from megagpt.cli.plot import main
from megagpt.errors import UserError
from megagpt.timeline import read_timeline
from tests.conftest import REPO

pytest.importorskip("matplotlib", reason="tools/plot.py draws with matplotlib (the dev and plot extras)")


def png_size(path) -> tuple[int, int]:
    """(width, height) of a valid PNG: its signature, then the IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR" and data[-8:-4] == b"IEND"
    from PIL import Image  # matplotlib depends on pillow

    with Image.open(path) as image:
        image.verify()
    return struct.unpack(">II", data[16:24])


def write_run(folder, steps=20, fp16=False, extra=True, seq_length=64):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(f"model:\n  seq_length: {seq_length}\nparallel:\n  tp: 1\n  pp: 2\n")
    rows = []
    for step in range(1, steps + 1):
        row = {"step": step, "loss": 10 - step * 0.2, "lr": 1e-3, "grad_norm": 1.0 / step, "tokens_per_s": 1000.0}
        row["consumed_samples"] = 8 * step
        if extra:  # the observability fields, when the run logged them
            row.update(step_time_ms=50.0, tokens_per_s_per_device=250.0, tflops_per_device=1.5, mfu=0.3, hfu=0.4)
        if fp16:
            row["loss_scale"] = 2.0 ** (16 - step % 3)
        if step % 10 == 0:
            row.update(val_loss=row["loss"] + 0.1, val_ppl=1.0)
        rows.append(row)
    text = "\n".join(json.dumps(row) for row in rows)
    (folder / "metrics.jsonl").write_text(text + '\n{"step": 21, "lo')  # a line cut short by a killed run


def test_one_run_and_several_runs_overlaid(tmp_path, capsys):
    write_run(tmp_path / "a")
    assert main([str(tmp_path / "a")]) == 0
    width, height = png_size(tmp_path / "a" / "metrics.png")
    assert (width, height) == (1280, 4 * 360)  # 8 panels in 4 rows of two: every logged metric but the loss scale
    assert f"wrote {tmp_path / 'a' / 'metrics.png'}" in capsys.readouterr().out

    write_run(tmp_path / "b", fp16=True, extra=False, seq_length=128)
    out = tmp_path / "cmp" / "loss.png"
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "--labels", "fp32", "fp16", "--out", str(out)]) == 0
    assert png_size(out)[1] == 5 * 360  # the loss scale's panel too
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "--panels", "loss", "--out", str(out)]) == 0
    assert png_size(out) == (640, 360)


def test_several_runs_are_drawn_against_tokens(tmp_path, monkeypatch):
    from megagpt import plots

    write_run(tmp_path / "a", seq_length=64)
    write_run(tmp_path / "b", seq_length=128)
    drawn = []
    monkeypatch.setattr(plots, "_draw_series", lambda ax, run, name, *a: drawn.append((run.label, name, a[-1])))
    plots.plot_metrics([plots.read_run(tmp_path / "a"), plots.read_run(tmp_path / "b")], tmp_path / "x.png")
    assert {by_tokens for _, _, by_tokens in drawn} == {True}
    runs = [plots.read_run(tmp_path / name) for name in "ab"]
    assert [run.tokens(run.rows[1]) for run in runs] == [16 * 64, 16 * 128]


def test_plot_errors_are_one_sentence(tmp_path, capsys, monkeypatch):
    write_run(tmp_path / "a")
    for argv, expected in [
        ([str(tmp_path / "missing")], "holds no metrics.jsonl"),
        ([str(tmp_path / "a"), "--panels", "loss,speed"], "unknown panels ['speed']"),
        ([str(tmp_path / "a"), "--labels", "x", "y"], "gives 2 labels for 1 runs"),
        (["--timeline", str(tmp_path / "a")], "holds no profiler traces"),
        ([], "name at least one run folder"),
    ]:
        assert main(argv) == 2
        assert expected in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    assert main([str(tmp_path / "a")]) == 2
    assert "pip install 'megagpt[plot]'" in capsys.readouterr().err


def write_trace(folder, rank, host, base_us, events, world_size=2):
    trace = {
        "baseTimeNanoseconds": int(base_us * 1000),
        "host_name": host,
        "distributedInfo": {"backend": "gloo", "rank": rank, "world_size": world_size},
        "traceEvents": [
            {"ph": "X", "cat": "user_annotation", "name": name, "ts": start, "dur": end - start, "pid": 1, "tid": 1}
            for name, start, end in events
        ]
        + [{"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 10, "dur": 5}],
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank{rank}_steps6-7.json").write_text(json.dumps(trace))


def test_timeline_reads_the_action_ranges_and_aligns_hosts(tmp_path):
    traces = tmp_path / "run" / "traces"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("parallel:\n  tp: 1\n  pp: 2\n")
    # Rank 0 on host a; rank 1 on host b, whose clock runs 5 s ahead: both steps end together after alignment.
    write_trace(traces, 0, "a", 1e9, [
        ("step 6", 0, 900), ("F mb0 c0", 10, 20),
        ("step 7", 1000, 2000), ("F mb0 c0", 1100, 1300), ("F mb1 c1", 1300, 1400), ("B mb0 c0", 1600, 1800),
        ("p2p send F mb0 s1", 1300, 1310), ("F mb9 c0", 2100, 2200),  # evaluation after the step: left out
    ])  # fmt: skip
    write_trace(traces, 1, "b", 1e9 + 5e6, [
        ("step 6", 0, 900), ("step 7", 1000, 2000), ("F mb0 c0", 1300, 1500), ("W mb0 c0", 1500, 1600),
    ])  # fmt: skip
    timeline = read_timeline(tmp_path / "run")
    assert timeline.step == 7 and timeline.world_size == 2 and timeline.hosts_aligned == 1
    zero, one = timeline.rows
    assert [(b.kind, b.micro_batch, b.chunk) for b in zero.blocks] == [("F", 0, 0), ("F", 1, 1), ("B", 0, 0)]
    times = [t for b in zero.blocks for t in (b.start_ms, b.end_ms)]
    assert times == pytest.approx([0.1, 0.3, 0.3, 0.4, 0.6, 0.8])
    assert [(b.kind, b.start_ms) for b in one.blocks] == [("F", pytest.approx(0.3)), ("W", pytest.approx(0.5))]
    assert zero.idle_fraction == pytest.approx(0.5) and one.idle_fraction == pytest.approx(0.7)
    assert [b.kind for b in read_timeline(traces, step=6).rows[0].blocks] == ["F"]

    out = tmp_path / "timeline.png"
    assert main(["--timeline", str(tmp_path / "run"), "--out", str(out)]) == 0
    assert png_size(out)[0] >= 1000
    assert main(["--timeline", str(traces), "--step", "5"]) == 2  # no such profiled step: one sentence

    # Traces without any training step (not written by logging.profile) say so, not "no range 'step 0'".
    write_trace(tmp_path / "bare", 0, "a", 1e9, [("F mb0 c0", 10, 20)])
    with pytest.raises(UserError, match="hold no training step"):
        read_timeline(tmp_path / "bare")


def test_tools_plot_is_a_thin_script_that_answers_help():
    result = subprocess.run(
        [sys.executable, str(REPO / "tools/plot.py"), "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "--timeline" in result.stdout
