"""Where checkpoints live in a checkpoint.dir, and which one a path means.

    checkpoint.dir/
      latest               the name of the newest complete checkpoint, replaced (atomically) only after it is whole
      step_00000100/       one checkpoint (checkpoint/format.py)
      step_00000200.tmp-H-P/ a save in progress (H, P: host and pid of the writer: process_tag()), or one a killed
                           job left behind (the next save of a run holding the folder's lock clears it)

Every tool and the trainer take "a checkpoint" the same way: a checkpoint folder (step_N), or a checkpoint.dir
whose latest is meant (checkpoint_folder, open_checkpoint).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from megagpt.checkpoint.format import METADATA, CheckpointError
from megagpt.checkpoint.reader import SavedCheckpoint
from megagpt.config import Config
from megagpt.parallel.comm import broadcast_text

LATEST = "latest"


def step_folder(step: int) -> str:
    return f"step_{step:08d}"


def process_tag() -> str:
    """HOST-PID: names a writer's temporaries (step_N.tmp-HOST-PID) so that no two writers share one."""
    return f"{socket.gethostname()}-{os.getpid()}"


def temporary_folder(root: Path, step: int, tag: str) -> Path:
    """Where a writer tagged `tag` (process_tag() of the run's rank 0) builds step's checkpoint before publishing."""
    return root / f"{step_folder(step)}.tmp-{tag}"


def complete_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoint folders under root, in the order they were published (metadata.json is written
    last), oldest first. A step_N.old counts only where its step_N is gone (a crash inside publish)."""
    found = []
    for p in root.glob("step_*"):
        if not p.is_dir() or not (p / METADATA).exists() or p.suffix not in ("", ".old"):
            continue
        if p.suffix == ".old" and p.with_suffix("").exists():
            continue
        found.append(p)
    return sorted(found, key=lambda p: (p / METADATA).stat().st_mtime_ns)


def latest_checkpoint(root: Path, required: bool) -> Path | None:
    """The checkpoint `latest` names (or the step_N.old a crash inside publish left), else the newest complete one."""
    latest = root / LATEST
    if latest.exists():
        named = root / latest.read_text().strip()
        for candidate in (named, named.with_name(named.name + ".old")):
            if (candidate / METADATA).exists():
                return candidate
    complete = complete_checkpoints(root) if root.is_dir() else []
    if complete:
        return complete[-1]
    if required:
        raise CheckpointError(f"{root} holds no complete checkpoint; check checkpoint.load")
    return None


def checkpoint_folder(path: str | Path) -> Path:
    """The checkpoint a path means: a checkpoint folder itself, or the latest of a checkpoint.dir (a folder with
    `latest` or step_* folders). Anything else is returned as it is, for SavedCheckpoint to say what is wrong."""
    path = Path(path)
    if (path / METADATA).exists():
        return path
    if (path / LATEST).exists() or any(path.glob("step_*")):
        return latest_checkpoint(path, required=True)
    return path


def open_checkpoint(path: str | Path) -> SavedCheckpoint:
    """A checkpoint folder, or a checkpoint.dir (its latest), opened for reading."""
    return SavedCheckpoint(checkpoint_folder(path))


def resolve_load(cfg: Config, ctx=None) -> Path | None:
    """checkpoint.load: None (start fresh), "auto" (the latest complete checkpoint in checkpoint.dir, if any), or a
    path: a checkpoint folder, or a checkpoint.dir whose latest is taken. Rank 0 decides and tells the others, so
    every rank loads the same checkpoint even where their views of a shared filesystem lag."""
    if ctx is None or ctx.world_group.size == 1:
        return _resolve_load(cfg)
    choice = str(_resolve_load(cfg) or "") if ctx.rank == 0 else ""
    chosen = broadcast_text(choice, 0, ctx.world_group, ctx.device)
    return Path(chosen) if chosen else None


def _resolve_load(cfg: Config) -> Path | None:
    c = cfg.checkpoint
    if c.load is None:
        return None
    if c.load == "auto":
        return latest_checkpoint(Path(c.dir), required=False)
    return checkpoint_folder(c.load)
