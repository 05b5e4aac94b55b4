"""Where a run's numbers go: a console line, logging.dir/metrics.jsonl and TensorBoard scalars."""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path

from megagpt.log import get_logger


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


class MetricsWriter:
    """Writes one JSON object per logged step; only the logging rank creates one."""

    def __init__(self, run_dir: Path, tensorboard: bool, total_steps: int):
        self.total_steps = total_steps
        self.jsonl = open(run_dir / "metrics.jsonl", "w")
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
        eta = elapsed / step * (self.total_steps - step) if step else 0.0
        parts += [f"elapsed {_clock(elapsed)}", f"eta {_clock(eta)}"]
        return " | ".join(parts)

    def close(self) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
