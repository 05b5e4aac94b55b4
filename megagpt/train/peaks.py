"""The peak a device could compute at, the denominator of MFU: a table of known GPUs, the user's number, or a
matmul measured once at startup.

The table holds dense (no 2:4 sparsity) tensor-core peaks from the vendors' datasheets, per GPU, in TFLOP/s, for
the dtype the model's matmuls run in: bf16 and fp16 for those precisions; for fp32 the TF32 tensor-core peak when
train.allow_tf32 lets the matmuls use it on a GPU, the plain fp32 peak otherwise. A GPU is found by a substring of
torch.cuda.get_device_name (the more specific names first: "H100 PCIe" before "H100"). On a CPU, or a GPU the table
does not know, the peak is measured by a short matmul in the compute dtype; `logging.peak_tflops` overrides both.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

from megagpt.config import Config
from megagpt.model.facts import compute_dtype

# (substring of the device name, {matmul dtype: dense TFLOP/s}), most specific first. A missing dtype: measured.
KNOWN_GPUS: list[tuple[str, dict[str, float]]] = [
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM5
    ("H200 NVL", {"bf16": 835.0, "fp16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    ("H200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM5
    ("GH200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),  # SXM4 and PCIe alike
    ("V100-PCIE", {"fp16": 112.0, "fp32": 14.0}),  # no bf16 or tf32 tensor cores
    ("V100", {"fp16": 125.0, "fp32": 15.7}),  # SXM2
    ("L40S", {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6}),
    ("L40", {"bf16": 181.05, "fp16": 181.05, "tf32": 90.5, "fp32": 90.5}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    ("RTX A6000", {"bf16": 154.8, "fp16": 154.8, "tf32": 77.4, "fp32": 38.7}),
    ("MI300X", {"bf16": 1307.4, "fp16": 1307.4, "tf32": 653.7, "fp32": 163.4}),
]


@dataclass(frozen=True)
class Peak:
    tflops: float  # per device, in the dtype the matmuls run in
    source: str  # "table", "config" (logging.peak_tflops) or "measured"


def matmul_kind(cfg: Config, device: torch.device) -> str:
    """The dtype whose peak bounds the model's matmuls: bf16, fp16, tf32 (fp32 on a GPU with TF32 allowed), fp32."""
    precision = cfg.train.precision
    if precision == "fp32" and device.type == "cuda" and cfg.train.allow_tf32:
        return "tf32"
    return precision


def known_peak_tflops(device_name: str, kind: str) -> float | None:
    """The table's peak of the first GPU whose name is in device_name; None if unknown (or that dtype is)."""
    name = device_name.lower()
    for part, peaks in KNOWN_GPUS:
        if part.lower() in name:
            return peaks.get(kind)
    return None


@functools.cache  # once per process: tests that train many times measure once
def measure_matmul_tflops(device: torch.device, dtype: torch.dtype, size: int | None = None) -> float:
    """The fastest of up to 10 timings of square matmuls in `dtype` (at most ~0.25 s of them after a warm-up): a
    rough peak for devices without a known one. Keeping the best timing discounts moments the device (on a shared
    CPU, the cores) was busy with something else; on a GPU each timing covers 10 matmuls back to back, so that
    launch and synchronization overheads do not count."""
    gpu = device.type == "cuda"
    n = size or (4096 if gpu else 512)
    per_timing = 10 if gpu else 1
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    times: list[float] = []
    started = time.perf_counter()
    for i in range(11):
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(per_timing):
            a @ b
        _synchronize(device)
        if i:  # the first is a warm-up
            times.append(time.perf_counter() - start)
        if len(times) >= 2 and time.perf_counter() - started > 0.25:
            break
    return per_timing * 2 * n**3 / max(min(times), 1e-9) / 1e12


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_peak(cfg: Config, device: torch.device) -> Peak:
    """This run's peak per device: logging.peak_tflops if set, else the table's for this GPU, else measured."""
    if cfg.logging.peak_tflops is not None:
        return Peak(cfg.logging.peak_tflops, "config")
    if device.type == "cuda":
        known = known_peak_tflops(torch.cuda.get_device_name(device), matmul_kind(cfg, device))
        if known is not None:
            return Peak(known, "table")
    return Peak(measure_matmul_tflops(device, compute_dtype(cfg.train.precision)), "measured")
