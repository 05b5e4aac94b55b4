"""tools/estimate.py and launcher --dry-run (megagpt/estimate.py): the 175B preset's size, its shards built on the
meta device against the estimate, and the memory estimate against what a CPU training step measures."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest

from megagpt.config import load_config
from megagpt.estimate import estimate, stage_estimate
from megagpt.parallel.context import ParallelContext
from megagpt.parallel.pipeline import simulated_bubble
from megagpt.parallel.topology import Topology
from tests.conftest import REPO, tiny_config

GPT3_175B = ["parallel.tp=8", "parallel.pp=16", "parallel.sequence_parallel=true", "parallel.recompute=selective",
             "parallel.zero=1"]  # fmt: skip


@pytest.fixture(scope="module")
def gpt3_175b():
    return load_config(REPO / "configs/gpt3-175b.yaml", GPT3_175B)


def test_the_175b_preset_has_175b_parameters(gpt3_175b):
    result = estimate(gpt3_175b, 1024)
    assert abs(result["params_real_vocab"] / 175e9 - 1) < 0.005
    assert result["layout"]["dp"] == 8 and len(result["params_per_rank_by_stage"]) == 16
    # 72 B s l h^2 (1 + s_eff / 6h + V / 12lh) with half the layers local at a window of 256
    b, s, layers, h = 1536, 2048, 96, 12288
    s_eff = (2048 + 256) / 2
    assert result["model_flops_per_step"] == pytest.approx(
        72 * b * s * layers * h**2 * (1 + s_eff / (6 * h) + 50257 / (12 * layers * h))
    )
    assert result["pipeline_bubble"] == pytest.approx(15 / (1536 // 8))
    # Recomputation is hardware work, not model work: selective repeats the attention core's forward
    # (4 b s keys h per layer), full every layer's forward; the step time at a stated MFU does not change.
    core = 4 * b * s * h * (2048 + 256) / 2 * layers
    assert gpt3_175b.parallel.recompute == "selective"
    assert result["hardware_flops_per_step"] == pytest.approx(result["model_flops_per_step"] + core)
    full = estimate(
        dataclasses.replace(gpt3_175b, parallel=dataclasses.replace(gpt3_175b.parallel, recompute="full")), 1024
    )
    assert full["hardware_flops_per_step"] == pytest.approx(
        result["model_flops_per_step"] + core + 24 * b * s * h**2 * layers
    )
    assert full["step_seconds"] == pytest.approx(result["step_seconds"])
    assert full["hfu"] == pytest.approx(0.4 * full["hardware_flops_per_step"] / full["model_flops_per_step"])


def test_every_stage_of_one_tp_dp_slice_built_on_the_meta_device_adds_up_to_the_estimate(gpt3_175b):
    from megagpt.cli.train import meta_rank_params

    topology = Topology(8, 8, 16)
    result = estimate(gpt3_175b, 1024)
    built = [meta_rank_params(gpt3_175b, topology, topology.rank(0, 0, stage)) for stage in range(16)]
    assert built == result["params_per_rank_by_stage"]
    assert sum(built) == result["params_per_pipeline_slice"]
    # The slice holds 1/tp of every tensor tp splits, all of every tensor it replicates, and the tied embedding
    # twice (the first stage's and the last stage's copy): its 8 tp ranks hold the whole model plus that copy.
    tp_slices = sum(meta_rank_params(gpt3_175b, topology, topology.rank(t, 0, 0)) for t in range(8))
    assert tp_slices == 8 * built[0]


MEMORY_CONFIGS = {
    "fp32, dense and local, no recomputation": [
        "model.hidden_size=256", "model.num_heads=4", "model.seq_length=256", "model.local_window=64",
        "train.micro_batch_size=4", "train.global_batch_size=8",
    ],
    "bf16, selective recomputation, dropout": [
        "model.hidden_size=256", "model.num_heads=4", "model.seq_length=512", "model.local_window=128",
        "train.micro_batch_size=2", "train.global_batch_size=4", "train.precision=bf16", "parallel.recompute=selective",
        "model.dropout=0.1",
    ],
    "fp32, full recomputation, dense": [
        "model.hidden_size=384", "model.num_heads=6", "model.seq_length=256", "train.micro_batch_size=4",
        "train.global_batch_size=8", "parallel.recompute=full", "model.num_layers=6", "model.attention_pattern=[dense]",
    ],
}  # fmt: skip


@pytest.mark.parametrize("overrides", MEMORY_CONFIGS.values(), ids=MEMORY_CONFIGS.keys())
def test_the_memory_estimate_is_within_ten_percent_of_a_measured_step(overrides, tmp_path):
    from megagpt.train.run import pretrain

    cfg = tiny_config(*overrides, "train.iters=1", f"logging.dir={tmp_path}", "logging.tensorboard=false",
                      "train.eval_iters=0")  # fmt: skip
    measured = pretrain(cfg, ParallelContext.single_process()).memory[0]
    predicted = stage_estimate(cfg, 1, 0)
    assert predicted.weights_bytes == measured["params_bytes"]
    assert predicted.grads_bytes == measured["grads_bytes"]
    assert predicted.optimizer_bytes == measured["optimizer_bytes"]
    measured_total = sum(measured[k] for k in ("params_bytes", "grads_bytes", "optimizer_bytes", "peak_step_bytes"))
    assert predicted.total_bytes == pytest.approx(measured_total, rel=0.10)


def test_the_tools_print_and_refuse():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "tools/estimate.py"), "--config", str(REPO / "configs/gpt3-175b.yaml"),
           "--tp", "8", "--pp", "16", "--dp", "8", "--zero", "1", "--recompute", "selective", "--sequence-parallel",
           "--json"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["layout"]["world_size"] == 1024 and report["memory_per_gpu_bytes"]["total_bytes"] < 80e9
    bad = subprocess.run(cmd[:-1] + ["--tp", "7"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "does not divide" in bad.stderr
    for tokens in ("-5", "0", "nan"):
        negative = subprocess.run(cmd + ["--tokens", tokens], capture_output=True, text=True, env=env, timeout=120)
        assert negative.returncode == 2 and "must be a positive token budget" in negative.stderr, negative.stderr
    dry = subprocess.run(
        [sys.executable, str(REPO / "launcher/pretrain.py"), "--config", str(REPO / "configs/gpt3-175b.yaml"),
         "--dry-run", "--world-size", "1024", *GPT3_175B, "--meta-ranks", "0,1023"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    counts = re.findall(r"^rank \d+ .*: ([\d,]+) parameters built on the meta device; the estimate says ([\d,]+)$",
                        dry.stdout, flags=re.MULTILINE)  # fmt: skip
    assert len(counts) == 2 and all(built == estimated for built, estimated in counts)
    refused = subprocess.run(
        [sys.executable, str(REPO / "launcher/pretrain.py"), "--config", str(REPO / "configs/tiny-cpu.yaml"),
         "--dry-run", "--world-size", "2", "--meta-ranks", "5"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert refused.returncode == 2 and "rank 5 is outside the world of 2" in refused.stderr


def test_the_estimate_and_the_dry_run_know_the_zero_bubble_schedules(gpt3_175b, capsys):
    from megagpt.cli.train import dry_run

    runs = {}
    for name in ("auto", "zb-h1", "zb-h2"):
        cfg = dataclasses.replace(gpt3_175b, parallel=dataclasses.replace(gpt3_175b.parallel, pp_schedule=name))
        runs[name] = estimate(cfg, 1024)
        dry_run(cfg, 1024)
    micro = 1536 // 8
    assert runs["auto"]["layout"]["pp_schedule"] == "1f1b"
    assert runs["auto"]["pipeline_bubble"] == pytest.approx(15 / micro)
    for name in ("zb-h1", "zb-h2"):
        assert runs[name]["layout"]["pp_schedule"] == name
    assert runs["zb-h1"]["pipeline_bubble"] == pytest.approx(15 / (3 * micro))
    # ZB-H2 as the executor runs it (its warm-up forwards wait for their receives): far worse than 1F1B here.
    assert runs["zb-h2"]["pipeline_bubble"] == pytest.approx(simulated_bubble("zb-h2", 16, 1, micro))
    assert runs["zb-h2"]["pipeline_bubble"] > 10 * runs["auto"]["pipeline_bubble"]
    # ZB-H1 holds 1F1B's 16 micro-batches on the first stage, and on the later ones too (counted whole until W,
    # an upper bound); ZB-H2 2 pp - 1 = 31 on the first.
    by_stage = {name: run["memory_by_stage_bytes"] for name, run in runs.items()}
    assert by_stage["zb-h1"][0] == by_stage["auto"][0]
    assert all(zb >= plain for zb, plain in zip(by_stage["zb-h1"], by_stage["auto"]))
    assert runs["zb-h2"]["memory_per_gpu_bytes"]["micro_batches_held"] == 31
    assert by_stage["zb-h2"][0] > by_stage["auto"][0]
    printed = capsys.readouterr().out
    assert "pipeline schedule 1f1b: 192 micro-batches per replica, predicted bubble 7.8%, up to 16" in printed
    assert "pipeline schedule zb-h1: 192 micro-batches per replica, predicted bubble 2.6%, up to 16" in printed
    zb_h2 = f"{runs['zb-h2']['pipeline_bubble']:.1%}"
    assert f"pipeline schedule zb-h2: 192 micro-batches per replica, predicted bubble {zb_h2}, up to 31" in printed
    warning = "warning: parallel.pp_schedule=zb-h2 is predicted to wait "
    assert printed.count(warning) == 1 and "against 8% for 1f1b and 3% for zb-h1" in printed and "use zb-h1" in printed


def test_each_zero_level_divides_what_it_shards_by_dp(gpt3_175b):
    """zero 1: the optimizer state / dp; zero 2: the fp32 gradients too; zero 3: the weights too; zero 2 and 3 add
    their transient full buffers (two layers and the root under zero 3), less than what they save."""
    at = {z: stage_estimate(dataclasses.replace(gpt3_175b, parallel=dataclasses.replace(
        gpt3_175b.parallel, zero=z)), 1024, 0) for z in (0, 1, 2, 3)}  # fmt: skip
    dp = 8
    assert at[1].optimizer_bytes == pytest.approx(at[0].optimizer_bytes / dp, rel=1e-6)
    assert (
        at[2].grads_bytes == pytest.approx(at[1].grads_bytes / dp, rel=1e-6)
        and at[2].weights_bytes == at[1].weights_bytes
    )
    assert at[3].weights_bytes == pytest.approx(at[1].weights_bytes / dp, rel=1e-6)
    assert at[0].transient_bytes == at[1].transient_bytes == 0 < at[2].transient_bytes < at[3].transient_bytes
    assert at[2].total_bytes < at[1].total_bytes < at[0].total_bytes  # zero 3 at 6 layers a stage: not smaller
    # dp = 1 has nothing to shard over: every level stores what zero 1 stores
    one = load_config(REPO / "configs/gpt3-175b.yaml", ["parallel.tp=8", "parallel.pp=16", "parallel.zero=3"])
    single = stage_estimate(one, 128, 0)
    assert single.weights_bytes == single.params * 2 and single.transient_bytes == 0
