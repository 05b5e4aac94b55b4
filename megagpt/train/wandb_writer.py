"""Weights & Biases, optional: the logging rank sends each logged row's scalars and, once, the resolved config.

wandb is an optional extra (pip install 'megagpt[wandb]'); it is imported only when logging.wandb_project is set,
so megagpt imports and trains without it, and config validation names the pip command when it is asked for but
missing. The run's local files go into logging.dir/wandb (offline mode keeps them there for `wandb sync`). A run
resumed from a checkpoint continues the W&B run of its logging.dir (whose id logging.dir/wandb_run_id keeps).
"""

from __future__ import annotations

from pathlib import Path

from megagpt.config import Config
from megagpt.errors import UserError


class WandbWriter:
    def __init__(self, cfg: Config, run_dir: Path, resume: bool = False):
        try:
            import wandb  # optional: only runs that ask for W&B need it
        except ImportError:
            raise UserError(
                f"logging.wandb_project={cfg.logging.wandb_project} needs Weights & Biases, which is not installed; "
                f"run pip install 'megagpt[wandb]'"
            ) from None
        lg = cfg.logging
        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if resume and id_file.exists() else None
        try:
            self.run = wandb.init(
                project=lg.wandb_project,
                name=lg.wandb_run_name,
                mode=None if lg.wandb_mode == "auto" else lg.wandb_mode,
                dir=str(run_dir),
                config=cfg.to_dict(),
                id=run_id,
                resume="allow" if run_id else None,
            )
        except wandb.errors.Error as e:
            raise UserError(
                f"Weights & Biases did not start ({e}); run wandb login, or set logging.wandb_mode=offline"
            ) from None
        id_file.write_text(self.run.id + "\n")

    def log(self, scalars: dict, step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


def open_wandb(cfg: Config, run_dir: Path, resume: bool) -> WandbWriter | None:
    """The W&B writer when logging.wandb_project is set (on the logging rank), else None."""
    return WandbWriter(cfg, run_dir, resume) if cfg.logging.wandb_project else None
