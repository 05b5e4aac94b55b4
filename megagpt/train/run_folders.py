"""A run's hold on its folders: checkpoint.dir and logging.dir belong to one run at a time, and no run destroys
another's work.

Before anything is written, rank 0:
- creates both folders and takes an exclusive lock in each (`.megagpt.lock`, flock, holding "pid N on host H")
  for the whole run, so a second run on the same folders stops at once with a sentence naming the holder; a
  file system without locks (Lustre mounted without flock) gets a warning and no lock;
- refuses a run that would start over in a checkpoint.dir that already holds checkpoints (its saves and prunes
  would replace and delete the earlier run's): resume it with checkpoint.load=auto, or choose a new folder.
Every rank then raises rank 0's sentence, if there is one, so no rank is left waiting.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from megagpt.config import Config
from megagpt.errors import UserError
from megagpt.log import get_logger
from megagpt.parallel.comm import broadcast_text

LOCK_FILE = ".megagpt.lock"


class FolderInUseError(UserError):
    """A run's folder is held by another run, or holds another run's checkpoints."""


class RunFolders:
    """What rank 0 holds for the run (nothing on other ranks); release() at the end."""

    def __init__(self):
        self.files = []
        self.created: list[Path] = []  # folders this run made: removed again if it wrote nothing into them
        self.locked = True  # False where the file system has no locks: then no stale temporaries are cleared

    def lock(self, folder: Path, key: str) -> None:
        if folder.exists() and not folder.is_dir():
            raise UserError(f"{key}={folder} is a file, not a folder; choose a folder for {key}")
        try:
            if not folder.exists():
                folder.mkdir(parents=True)
                self.created.append(folder)
            f = open(folder / LOCK_FILE, "a+")
        except OSError as e:
            raise UserError(f"cannot write {key}={folder} ({e.strerror or e}); choose a writable folder") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise FolderInUseError(
                f"{key}={folder} is in use by {holder}: another run writes there; wait for it to end, or choose "
                f"another folder"
            ) from None
        except OSError as e:
            get_logger().warning(
                f"cannot lock {folder / LOCK_FILE} ({e.strerror or e}): the file system has no file locks, so "
                f"nothing stops a second run from writing into {key}={folder} at the same time"
            )
            self.locked = False
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on host {socket.gethostname()}")
        f.flush()
        self.files.append(f)

    def release(self) -> None:
        """Drop the locks; a folder this run created and left empty (a run that failed to start) goes too."""
        for f in self.files:
            f.close()  # closing drops the flock
        self.files.clear()
        for folder in reversed(self.created):
            if [p.name for p in folder.iterdir()] == [LOCK_FILE]:
                (folder / LOCK_FILE).unlink()
                folder.rmdir()
        self.created.clear()


def hold_run_folders(cfg: Config, ctx, resume_from: Path | None) -> RunFolders:
    """Rank 0 locks logging.dir and checkpoint.dir and checks that this run may write there; every rank raises
    the same sentence when it may not."""
    from megagpt.checkpoint.paths import complete_checkpoints

    folders = RunFolders()
    error = ""
    if ctx.rank == 0:
        try:
            wanted = {Path(cfg.logging.dir).resolve(): "logging.dir"}
            if cfg.checkpoint.dir is not None:
                wanted.setdefault(Path(cfg.checkpoint.dir).resolve(), "checkpoint.dir")
            for folder, key in wanted.items():
                folders.lock(folder, key)
            if cfg.checkpoint.dir is not None:
                _check_not_starting_over(Path(cfg.checkpoint.dir), resume_from, complete_checkpoints)
        except UserError as e:
            folders.release()
            error = str(e)
    agreed = broadcast_text(error, 0, ctx.world_group, ctx.device)
    if agreed:
        raise FolderInUseError(agreed if ctx.rank == 0 else f"rank 0 refused to start: {agreed}")
    return folders


def _check_not_starting_over(checkpoint_dir: Path, resume_from: Path | None, complete_checkpoints) -> None:
    """A checkpoint.dir with checkpoints belongs to the run that wrote them; only resuming from it may go on
    writing there (saving over its steps and pruning its older checkpoints)."""
    existing = complete_checkpoints(checkpoint_dir)
    if not existing:
        return
    if resume_from is not None and resume_from.resolve().parent == checkpoint_dir.resolve():
        return
    loaded = f"the run loads {resume_from}" if resume_from is not None else "checkpoint.load is unset"
    raise FolderInUseError(
        f"checkpoint.dir={checkpoint_dir} already holds {len(existing)} checkpoint(s) of an earlier run (newest "
        f"{existing[-1].name}) and {loaded}: saving there would replace and prune them; resume that run with "
        f"checkpoint.load=auto, or choose a new checkpoint.dir"
    )
