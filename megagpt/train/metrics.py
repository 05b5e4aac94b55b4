"""Where a run's numbers go: a console line, logging.dir/metrics.jsonl and TensorBoard scalars."""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path

from megagpt.log import get_logger


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf  # a damaged line is dropped


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


class MetricsWriter:
    """Writes one JSON object per logged step; only the logging rank creates one."""

    def __init__(self, run_dir: Path, tensorboard: bool, total_steps: int, resume_step: int | None = None):
        """resume_step: a run resumed from a checkpoint of that step continues metrics.jsonl, dropping the rows
        of later steps (written by an earlier run after its last checkpoint); otherwise the file starts anew."""
        self.total_steps = total_steps
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
        if self.tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(
                        f"train/{key}" if not key.startswith("val") else f"valid/{key}", value, row["step"]
                    )
            self.tb.flush()
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
