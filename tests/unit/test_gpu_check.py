"""tools/gpu_check.py (make gpu-check) where it can run without a GPU: its arguments, the skipping of what a
machine cannot run, the budget, the report, the goals it reads from the benches, and the configs its steps use."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from megagpt.config import config_from_dict, validate
from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("gpu_check", REPO / "tools" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up
spec.loader.exec_module(gpu_check)


def test_arguments_are_checked():
    assert gpu_check.parse_args(["--only", "versions, tiny_training"]).only == ["versions", "tiny_training"]
    for bad in (["--only", "versions,warp_drive"], ["--only", ","], ["--budget-s", "0"], ["--step", "nope"]):
        with pytest.raises(SystemExit):
            gpu_check.parse_args(bad)
    listing = subprocess.run([sys.executable, "tools/gpu_check.py", "--list"], cwd=REPO, capture_output=True, text=True)
    assert listing.returncode == 0
    assert [line.split()[0] for line in listing.stdout.splitlines()] == gpu_check.STEP_NAMES
    bad = subprocess.run(
        [sys.executable, "tools/gpu_check.py", "--only", "x"], cwd=REPO, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "unknown step(s) ['x']; the steps are versions, kernel_build" in bad.stderr


def test_without_a_gpu_it_checks_the_versions_skips_the_rest_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "gpu_count", lambda: 0)
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert "no CUDA device is visible" in capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    statuses = {step["name"]: (step["status"], step["reason"]) for step in report["steps"]}
    assert statuses["versions"][0] == "pass"
    assert {s for name, s in statuses.items() if name != "versions"} == {("skipped", "no CUDA device is visible")}
    versions = report["steps"][0]["metrics"]
    assert versions["torch"] and "nvcc" in versions and "triton" in versions
    markdown = (tmp_path / "report.md").read_text()
    assert "| versions | pass |" in markdown and "| multi_gpu | skipped | 0 | no CUDA device is visible |" in markdown


def test_one_gpu_skips_the_multi_gpu_step_and_the_budget_skips_what_does_not_fit(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "gpu_count", lambda: 1)
    ran = []

    def fake_run_step(step, out, limit_s):
        ran.append((step.name, limit_s))
        return gpu_check.StepResult(step.name, "pass", 1.0)

    monkeypatch.setattr(gpu_check, "run_step", fake_run_step)
    results = gpu_check.run_check(gpu_check.parse_args(["--out", str(tmp_path), "--only", "versions,multi_gpu"]))
    assert [(r.name, r.status, r.reason) for r in results] == [
        ("versions", "pass", ""),
        ("multi_gpu", "skipped", "needs 2 GPUs, 1 visible"),
    ]
    ran.clear()
    results = gpu_check.run_check(gpu_check.parse_args(["--out", str(tmp_path), "--budget-s", "10"]))
    assert ran == [] and {r.reason.split(" (")[0] for r in results[:-1]} == {"out of time"}


def test_a_step_runs_as_a_child_and_its_failures_are_reported(tmp_path, monkeypatch):
    """The child protocol: the child writes result.json; a 'failed' entry makes the step fail with that reason."""
    ok = gpu_check.run_step(gpu_check.STEPS[0], tmp_path, 120)
    assert ok.status == "pass" and ok.metrics["torch"]
    assert (tmp_path / "versions" / "result.json").exists() and (tmp_path / "versions" / "output.log").exists()
    needs_gpu = next(s for s in gpu_check.STEPS if s.name == "flash_dropout")
    failed = gpu_check.run_step(needs_gpu, tmp_path, 120)  # no GPU here: the child raises
    assert failed.status == "fail" and failed.reason == "exit status 1" and "Traceback" in failed.output_tail
    slow = gpu_check.run_step(gpu_check.STEPS[0], tmp_path, 0.01)
    assert slow.status == "timeout" and slow.reason == "stopped after 0s"


def test_the_report_reads_the_goals_from_the_benches(tmp_path):
    results = [
        gpu_check.StepResult("versions", "pass", 1, metrics={"device": "1 x NVIDIA H100 80GB HBM3"}),
        gpu_check.StepResult(
            "fused_kernels",
            "pass",
            30,
            metrics={
                "kernels": {
                    "a": {"of_copy": 0.91, "speedup_vs_torch": 2.5},
                    "b": {"of_copy": 0.83, "speedup_vs_torch": 1.4},
                }
            },
        ),
        gpu_check.StepResult("attention_bench", "pass", 20, metrics={"attention": {"flex": {"over_dense": 0.41}}}),
        gpu_check.StepResult("throughput_1.3b", "timeout", 240, reason="stopped after 240s", output_tail="step 3"),
        gpu_check.StepResult("tiny_training", "fail", 50, reason="recompute=full: losses [nan] not finite"),
    ]
    gpu_check.write_report(results, tmp_path, "2026-12-06T12:00:00", 480)
    goals = {g["goal"]: (g["measured"], g["met"]) for g in json.loads((tmp_path / "report.json").read_text())["goals"]}
    assert goals == {
        "fused kernels >= 80% of copy bandwidth": ("worst 83%", True),
        "fused kernels faster than torch": ("worst 1.40x", True),
        "Flex local <= 0.35 of dense": ("0.410", False),
        "gpt3-1.3b bf16 MFU >= 55%": ("not measured", None),
    }
    markdown = (tmp_path / "report.md").read_text()
    assert "Device: 1 x NVIDIA H100 80GB HBM3" in markdown
    assert "| Flex local <= 0.35 of dense | 0.410 | no |" in markdown
    assert "| tiny_training | fail | 50 | recompute=full: losses [nan] not finite |" in markdown
    assert "Output (last lines):" in markdown and "step 3" in markdown


def test_the_steps_configs_validate(tmp_path):
    for recompute in ("none", "selective", "full"):
        cfg = gpu_check.tiny_training_config(tmp_path, recompute, tmp_path / "corpus")
        assert (cfg.train.device, cfg.train.precision, cfg.model.dropout) == ("cuda", "bf16", 0.1)
        assert cfg.train.eval_interval == 10 and cfg.train.iters > 10
    for layout in gpu_check.MULTI_GPU_LAYOUTS.values():
        cfg = config_from_dict({"preset": "tiny-cpu"}, ["train.device=cuda", *layout])
        validate(cfg, world_size=2)


def test_the_tiny_training_step_passes_where_it_can_run(tmp_path):
    """The step's own logic, on the CPU: its corpus is learnable (falling loss), every recompute mode evaluates at
    step 10, and selective's gradients equal none's. On a GPU the same function runs on CUDA."""
    metrics = gpu_check.step_tiny_training(tmp_path, "cpu")
    assert "failed" not in metrics, metrics["failed"]
    for recompute in ("none", "selective", "full"):
        losses = metrics[recompute]["losses"]
        assert losses[-1] < losses[0] - 0.5 and metrics[recompute]["eval_steps"] == [10, 20]
    assert metrics["gradients"]["none_vs_selective_max_abs"] <= metrics["gradients"]["none_vs_none_max_abs"]
