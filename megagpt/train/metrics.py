"""Where a run's numbers go: a console line, logging.dir/metrics.jsonl, TensorBoard scalars and, when asked for,
Weights & Biases; and the performance fields of a logged row (StepPerformance, memory_fields).

Performance is computed on logging steps only, from the window of steps since the last row and its wall-clock
time (which ends in the row's loss read, so it holds the device's work): step time, tokens/s, and TFLOP/s per
device, MFU and HFU with the planner's FLOP count (estimate.py: model FLOPs, and hardware FLOPs adding what
recomputation repeats) over the device's peak (train/peaks.py). Nothing here reads a tensor back.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import resource
from pathlib import Path

import torch

from megagpt.config import Config
from megagpt.estimate import hardware_flops_per_step, model_flops_per_step
from megagpt.log import get_logger
from megagpt.train.peaks import Peak
from megagpt.train.wandb_writer import WandbWriter

GIB = 2**30
# Scalars TensorBoard also plots against consumed tokens (train_by_tokens/..., valid_by_tokens/...): with a batch
# ramp-up, steps are unequal, and tokens are what runs of different batch schedules have in common.
BY_TOKENS = ("loss", "lr", "grad_norm", "mfu", "tokens_per_s_per_device", "val_loss")


class StepPerformance:
    """The performance fields of a logged row, for a window of steps of `samples` sequences in `seconds`.

    The FLOPs are those of the steps' actual batches (a ramp-up's smaller ones included), shared by the
    `world_size` devices; per-device numbers assume the ranks run alike (the logging rank's window is timed)."""

    def __init__(self, cfg: Config, world_size: int, peak: Peak):
        self.cfg = cfg
        self.world_size = world_size
        self.peak = peak

    def fields(self, samples: int, steps: int, seconds: float) -> dict:
        tokens_per_s = samples * self.cfg.model.seq_length / seconds
        per_device = seconds * self.world_size  # device-seconds of the window
        model_tflops = model_flops_per_step(self.cfg, samples) / per_device / 1e12
        hardware_tflops = hardware_flops_per_step(self.cfg, samples) / per_device / 1e12
        return {
            "step_time_ms": seconds / steps * 1e3,
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_device": tokens_per_s / self.world_size,
            "tflops_per_device": model_tflops,
            "mfu": model_tflops / self.peak.tflops,
            "hfu": hardware_tflops / self.peak.tflops,
            "peak_tflops": self.peak.tflops,
            "peak_source": self.peak.source,
        }


def resident_set_bytes() -> int:
    """This process's resident set size now (Linux), or its peak where /proc is absent (macOS: ru_maxrss bytes)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if os.uname().sysname == "Darwin" else peak * 1024


def memory_fields(device: torch.device) -> dict:
    """Host memory, and on a GPU the allocator's peak since the last row (then reset) and what it reserves now.
    The allocator's statistics live on the host: reading them waits for nothing."""
    fields = {"rss_gib": resident_set_bytes() / GIB}
    if device.type == "cuda":
        fields["mem_max_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        fields["mem_reserved_gib"] = torch.cuda.memory_reserved(device) / GIB
        torch.cuda.reset_peak_memory_stats(device)
    return fields


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf  # a damaged line is dropped


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


class MetricsWriter:
    """Writes one JSON object per logged step; only the logging rank creates one."""

    def __init__(
        self,
        run_dir: Path,
        tensorboard: bool,
        total_steps: int,
        resume_step: int | None = None,
        wandb: WandbWriter | None = None,
    ):
        """resume_step: a run resumed from a checkpoint of that step continues metrics.jsonl, dropping the rows
        of later steps (written by an earlier run after its last checkpoint); otherwise the file starts anew.
        wandb: also send every row's scalars to Weights & Biases."""
        self.total_steps = total_steps
        self.wandb = wandb
        self.first_step = resume_step or 0  # elapsed_s counts from this run's start, after this step
        path = run_dir / "metrics.jsonl"
        kept = []
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines() if _step_of(line) <= resume_step]
        self.jsonl = open(path, "w")
        self.jsonl.writelines(line + "\n" for line in kept)
        self.jsonl.flush()
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow import; only when asked for

            self.tb = SummaryWriter(log_dir=str(run_dir))

    def write(self, row: dict) -> None:
        # Strict JSON: a skipped fp16 step's inf/NaN gradient norm (or loss) is written as null.
        finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
        self.jsonl.write(json.dumps(finite, allow_nan=False) + "\n")
        self.jsonl.flush()
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        if self.tb is not None:
            for key, value in scalars.items():
                section = "valid" if key.startswith("val") else "train"
                self.tb.add_scalar(f"{section}/{key}", value, row["step"])
                if key in BY_TOKENS and "consumed_tokens" in row:
                    self.tb.add_scalar(f"{section}_by_tokens/{key}", value, row["consumed_tokens"])
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, row["step"])
        get_logger().info(self.console_line(row))

    def console_line(self, row: dict) -> str:
        step = row["step"]
        parts = [f"step {step}/{self.total_steps}"]
        if "loss" in row:
            parts += [
                f"loss {row['loss']:.4f}",
                f"lr {row['lr']:.3e}",
                f"grad norm {row['grad_norm']:.3f}",
                f"{row['tokens_per_s']:,.0f} tok/s",
            ]
        if "step_time_ms" in row:
            parts.append(performance_text(row))
        if "loss_scale" in row:
            parts.append(f"loss scale {row['loss_scale']:g} (skipped {row['skipped_steps']})")
        if "val_loss" in row:
            parts.append(f"val loss {row['val_loss']:.4f} (ppl {row['val_ppl']:.1f})")
        elapsed = row["elapsed_s"]
        done = step - self.first_step  # steps this run took in `elapsed`
        eta = elapsed / done * (self.total_steps - step) if done > 0 else 0.0
        parts += [f"elapsed {_clock(elapsed)}", f"eta {_clock(eta)}"]
        return " | ".join(parts)

    def close(self) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.close()


def performance_text(row: dict) -> str:
    """The console's performance part: step time, per-device throughput, MFU (HFU where recomputation makes it
    differ), the peak's source when it is not the table's, and memory."""
    text = f"{row['step_time_ms']:,.1f} ms/step | {row['tflops_per_device']:.3g} TFLOP/s/device | MFU {row['mfu']:.1%}"
    notes = [f"HFU {row['hfu']:.1%}"] if not math.isclose(row["hfu"], row["mfu"]) else []
    if row["peak_source"] != "table":
        notes.append(f"peak {row['peak_tflops']:.3g} TFLOP/s {row['peak_source']}")
    text += f" ({', '.join(notes)})" if notes else ""
    if "mem_max_allocated_gib" in row:
        text += f" | mem {row['mem_max_allocated_gib']:.2f}/{row['mem_reserved_gib']:.2f} GiB"
    return text + f" | rss {row['rss_gib']:.2f} GiB"
