"""The logged rows: the console line's ETA (the time left at this run's pace, also after a resume), the performance
fields (step time, throughput, MFU and HFU against the device's peak, memory) and where they go (TensorBoard, by step
and by consumed tokens)."""

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megagpt.estimate import hardware_flops_per_step, model_flops_per_step
from megagpt.train.metrics import MetricsWriter, StepPerformance, memory_fields, performance_text
from megagpt.train.peaks import Peak, device_peak, known_peak_tflops, matmul_kind
from tests.conftest import tiny_config


def test_eta_uses_the_steps_this_run_took(tmp_path):
    row = {"step": 60, "loss": 1.0, "lr": 1e-4, "grad_norm": 1.0, "tokens_per_s": 1.0, "elapsed_s": 100.0}
    fresh = MetricsWriter(tmp_path, tensorboard=False, total_steps=100)
    assert fresh.console_line(row).endswith("elapsed 0:01:40 | eta 0:01:06")  # 100 s / 60 steps * 40
    fresh.close()
    resumed = MetricsWriter(tmp_path, tensorboard=False, total_steps=100, resume_step=50)
    assert resumed.console_line(row).endswith("elapsed 0:01:40 | eta 0:06:40")  # 100 s / 10 steps * 40
    resumed.close()


# ---------------------------------------------------------------------------------------------------------------
# Performance fields: the planner's FLOPs over the measured time and the device's peak.


def test_mfu_and_hfu_are_the_planners_flops_over_time_and_peak():
    for recompute, extra in (("none", False), ("selective", True), ("full", True)):
        cfg = tiny_config(f"parallel.recompute={recompute}", "train.global_batch_size=8")
        perf = StepPerformance(cfg, world_size=4, peak=Peak(2.0, "config"))
        row = perf.fields(samples=12, steps=3, seconds=1.5)  # three ramp-up steps of 2, 4 and 6 samples
        device_seconds = 1.5 * 4
        assert row["step_time_ms"] == pytest.approx(500.0)
        assert row["tokens_per_s"] == pytest.approx(12 * 64 / 1.5)
        assert row["tokens_per_s_per_device"] == pytest.approx(row["tokens_per_s"] / 4)
        assert row["tflops_per_device"] == pytest.approx(model_flops_per_step(cfg, 12) / device_seconds / 1e12)
        assert row["mfu"] == pytest.approx(row["tflops_per_device"] / 2.0)
        assert row["hfu"] == pytest.approx(hardware_flops_per_step(cfg, 12) / device_seconds / 2e12)
        assert (row["hfu"] > row["mfu"] * 1.0001) == extra, recompute
        assert ("HFU" in performance_text({**row, "rss_gib": 0.1})) == extra  # the console names HFU where it differs
        assert (row["peak_tflops"], row["peak_source"]) == (2.0, "config")
    # The FLOPs of a step follow its batch: 12 samples cost 12 / 8 of a full global batch.
    assert model_flops_per_step(cfg, 12) == pytest.approx(model_flops_per_step(cfg) * 12 / 8)


def test_the_peak_comes_from_the_table_the_config_or_a_measurement(monkeypatch):
    assert known_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert known_peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert known_peak_tflops("NVIDIA A100-SXM4-40GB", "tf32") == 156.0
    assert known_peak_tflops("NVIDIA L40S", "fp16") == 362.05 and known_peak_tflops("NVIDIA L4", "fp16") == 121.0
    assert known_peak_tflops("Tesla V100-SXM2-16GB", "fp16") == 125.0
    assert known_peak_tflops("Tesla V100-SXM2-16GB", "bf16") is None  # no bf16 tensor cores: measured instead
    assert known_peak_tflops("Some Future GPU", "bf16") is None
    gpu = torch.device("cuda", 0)
    assert matmul_kind(tiny_config("train.precision=fp32"), gpu) == "tf32"  # allow_tf32 is on by default
    assert matmul_kind(tiny_config("train.precision=fp32", "train.allow_tf32=false"), gpu) == "fp32"
    assert matmul_kind(tiny_config("train.precision=fp32"), torch.device("cpu")) == "fp32"
    assert matmul_kind(tiny_config("train.precision=bf16"), gpu) == "bf16"

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert device_peak(tiny_config("train.precision=bf16"), gpu) == Peak(989.4, "table")
    assert device_peak(tiny_config("train.precision=fp32"), gpu) == Peak(494.7, "table")
    assert device_peak(tiny_config("logging.peak_tflops=123"), gpu) == Peak(123.0, "config")
    measured = device_peak(tiny_config("train.precision=bf16"), torch.device("cpu"))
    assert measured.source == "measured" and 0 < measured.tflops < 1e3


def test_memory_fields_read_the_allocator_on_a_gpu_and_the_resident_set_everywhere(monkeypatch):
    cpu = memory_fields(torch.device("cpu"))
    assert set(cpu) == {"rss_gib"} and 0.01 < cpu["rss_gib"] < 1000  # this test process holds torch: > 10 MiB
    resets = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 4 * 2**30)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: resets.append(device))
    gpu = memory_fields(torch.device("cuda", 0))
    assert (gpu["mem_max_allocated_gib"], gpu["mem_reserved_gib"]) == (3.0, 4.0) and gpu["rss_gib"] > 0
    assert resets == [torch.device("cuda", 0)]  # the next row's peak is that of its own window


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_memory_fields_on_a_real_gpu():
    device = torch.device("cuda", torch.cuda.current_device())
    x = torch.empty(2**28, dtype=torch.uint8, device=device)  # 256 MiB, freed before the row is read
    del x
    fields = memory_fields(device)
    assert fields["mem_max_allocated_gib"] >= 0.25 and fields["mem_reserved_gib"] >= 0.25  # cached, not returned
    assert memory_fields(device)["mem_max_allocated_gib"] < fields["mem_max_allocated_gib"] - 0.2  # peak was reset


def test_rows_reach_tensorboard_by_step_and_by_consumed_tokens_and_the_console(tmp_path):
    writer = MetricsWriter(tmp_path, tensorboard=True, total_steps=4)
    perf = StepPerformance(tiny_config(), world_size=1, peak=Peak(1.0, "measured"))
    rows = []
    for step, tokens in ((2, 512), (4, 2048)):  # a ramp-up: the second row's steps held three times the tokens
        row = {"step": step, "loss": 5.0 / step, "lr": 1e-3, "grad_norm": 1.0, **perf.fields(4 * step, 2, 0.5),
               "rss_gib": 0.5, "consumed_tokens": tokens, "elapsed_s": 1.0}  # fmt: skip
        writer.write(row)
        rows.append(row)
    line = writer.console_line(rows[-1])
    assert "1,000.0 ms/step" not in line and "250.0 ms/step" in line and "MFU" in line
    assert "(peak 1 TFLOP/s measured)" in line and "rss 0.50 GiB" in line
    writer.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/mfu", "train/step_time_ms", "train/tflops_per_device", "train/rss_gib"} <= tags
    assert {"train_by_tokens/loss", "train_by_tokens/mfu", "train_by_tokens/lr"} <= tags
    assert [(e.step, e.value) for e in events.Scalars("train_by_tokens/loss")] == [(512, 2.5), (2048, 1.25)]
    assert [e.step for e in events.Scalars("train/mfu")] == [2, 4]
    assert events.Scalars("train/mfu")[1].value == pytest.approx(rows[1]["mfu"])
