"""Making a written checkpoint visible, atomically, and deleting old ones.

A checkpoint is built in a temporary folder (paths.temporary_folder). publish_checkpoint then writes its
metadata.json (last, with each rank file's sha256), renames the folder into place and moves `latest`: a writer
killed at any point leaves `latest` and the checkpoints before it untouched. prune keeps the newest
checkpoint.keep; BackgroundPruner does that off the training thread.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import torch

from megagpt.checkpoint.format import METADATA, CheckpointMetadata, HashingWriter
from megagpt.checkpoint.paths import LATEST, complete_checkpoints
from megagpt.log import get_logger


def write_rank_file(payload: dict, path: Path) -> dict:
    """Write a rank file durably (into path.partial, fsynced, renamed); returns its {"bytes", "sha256"}, hashed
    while writing."""
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        hashing = HashingWriter(f)
        torch.save(payload, hashing)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
    return hashing.record()


def write_text_atomically(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
    fsync_folder(path.parent)


def fsync_folder(path: Path) -> None:
    """Make renames in a folder durable (best effort: not every filesystem lets a folder be fsynced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish_checkpoint(tmp: Path, final: Path, metadata: CheckpointMetadata) -> Path:
    """Finish the checkpoint built in tmp (its rank files written and listed in metadata): write metadata.json,
    rename the folder to final and point final's checkpoint.dir's `latest` at it. Returns final."""
    write_text_atomically(tmp / METADATA, metadata.to_json())
    rename_into_place(tmp, final)
    write_text_atomically(final.parent / LATEST, final.name + "\n")
    return final


def rename_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished folder into place. A checkpoint of the same step already there is moved aside to
    step_N.old first (found by latest_checkpoint should a crash fall between the two renames) and deleted after."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_folder(final.parent)
    if old.exists():
        delete_checkpoint(old)


def delete_checkpoint(path: Path) -> None:
    (path / METADATA).unlink(missing_ok=True)  # first: a half-deleted folder must not look complete
    shutil.rmtree(path, ignore_errors=True)


def prune(root: Path, keep: int, current: Path, clear_stale: bool = True, run_tag: str | None = None) -> None:
    """Keep the newest `keep` published checkpoints (by publish time, so that after resuming from an older one
    the checkpoints of the abandoned run go first, never the one just written). With clear_stale (the run holds
    the folder's lock, so no other run is saving there) also delete the temporaries of killed saves."""
    for old in complete_checkpoints(root)[:-keep]:
        if old != current:
            delete_checkpoint(old)
    if clear_stale:  # this run's own temporaries are its saves in progress
        for stale in root.glob("step_*.tmp*"):
            if run_tag is None or not stale.name.endswith(f".tmp-{run_tag}"):
                shutil.rmtree(stale, ignore_errors=True)


class BackgroundPruner:
    """Rank 0's deletion of old checkpoints, in a thread: deleting a 175B checkpoint from a parallel file system
    can take minutes, and every other rank would wait that long in the save's closing barrier (or their next
    collective), past NCCL's watchdog. One prune at a time: while one still runs, the next save leaves its
    prune to the save after (never waiting in rank 0's part of a save); the end of the run waits for it."""

    def __init__(self):
        self.thread: threading.Thread | None = None
        self.deferred: tuple | None = None  # a prune skipped while another ran: done by wait() if no save does

    def start(self, root: Path, keep: int, current: Path, clear_stale: bool = True, run_tag: str | None = None):
        args = (root, keep, current, clear_stale, run_tag)
        if self.thread is not None and self.thread.is_alive():
            get_logger().info(f"deleting old checkpoints in {root} is still under way; the next save prunes")
            self.deferred = args
            return
        self.deferred = None
        self.thread = threading.Thread(target=self._prune, args=args, name="megagpt-prune")
        self.thread.start()

    @staticmethod
    def _prune(root: Path, keep: int, current: Path, clear_stale: bool, run_tag: str | None) -> None:
        try:
            prune(root, keep, current, clear_stale, run_tag)
        except OSError as e:  # the run goes on; the next save's prune tries again
            get_logger().warning(f"deleting old checkpoints in {root} failed: {e}")

    def wait(self) -> None:
        """Finish the prune under way, and one that was put off meanwhile (at the end of the run)."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.deferred is not None:
            args, self.deferred = self.deferred, None
            self._prune(*args)
