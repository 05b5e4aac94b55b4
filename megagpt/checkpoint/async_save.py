"""Asynchronous save (checkpoint.async_save): the training loop pays only for copying its state out of the way;
a background thread writes it; the ranks agree at step boundaries that every writer has finished, and only then
does rank 0 publish the checkpoint. Every guarantee of the synchronous save (checkpoint/save.py) holds.

One save, on every rank:

    save step       start(): copy this rank's pieces (weights, fp32 main weights, Adam's moments) into host buffers
                    reused from save to save (pinned when the state is on a GPU), take its random states and, on
                    rank 0, the metadata of this step (data position, Adam's step, loss scaler); then a writer
                    thread serialises them into step_N.tmp-TAG/rank_R.pt, hashing while writing, and fsyncs.
    step boundaries local_status() joins the stop flags' all-reduce over the host (gloo) group (run_control.py):
                    "still writing" and "failed" cost two more numbers in an all-reduce that happens anyway, with
                    no wait for the GPU's queue and none for the writers. agreed(): once no rank is still writing,
                    either every rank raises the failing rank's error, or the sizes and sha256s are gathered
                    (host group) and rank 0 publishes (metadata last, rename, `latest`, prune).
    next save, stop wait(): join this rank's writer (how long it waited is logged), then agree as above. At most
    or end of run    one save is in flight, and a run never ends or stops with one unpublished.

The writer thread issues no collective (it would race the training stream's): every collective is on the main
thread, at a step boundary every rank reaches in the same order. A crash or kill -9 while a writer runs leaves only
the temporary folder: `latest` and the checkpoints before it are untouched. A thread rather than a process:
serialising, hashing and writing release the GIL for their large blocks, so the training thread keeps running,
and a process would need the state in shared memory (bench/checkpoint_stall.py measures both; docs/benchmarks.md).
"""

from __future__ import annotations

import dataclasses
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import megagpt.checkpoint.save as sync_save
from megagpt.checkpoint.format import CheckpointError, CheckpointMetadata, rank_file
from megagpt.checkpoint.paths import step_folder, temporary_folder
from megagpt.checkpoint.rank_state import random_states, rank_pieces
from megagpt.log import get_logger
from megagpt.parallel.comm import all_reduce, broadcast_text

CPU = torch.device("cpu")


class HostBuffers:
    """Host copies of one rank's pieces, reused from save to save (a rank saves the same pieces each time). On a
    GPU they are pinned, so the copies are asynchronous DMA; one synchronisation ends the copy-out."""

    def __init__(self):
        self.buffers: list[torch.Tensor] = []
        self.used = 0
        self.from_gpu = False

    def start(self) -> None:
        self.used, self.from_gpu = 0, False

    def copy(self, data: torch.Tensor) -> torch.Tensor:
        """data (1-D) copied into the next buffer, made when missing or of another size or dtype."""
        if self.used == len(self.buffers):
            self.buffers.append(self._new(data))
        elif self.buffers[self.used].shape != data.shape or self.buffers[self.used].dtype != data.dtype:
            self.buffers[self.used] = self._new(data)
        buffer = self.buffers[self.used]
        self.used += 1
        self.from_gpu |= data.is_cuda
        return buffer.copy_(data, non_blocking=data.is_cuda)

    @staticmethod
    def _new(data: torch.Tensor) -> torch.Tensor:
        return torch.empty(data.shape, dtype=data.dtype, device=CPU, pin_memory=data.is_cuda)

    def finish(self) -> None:
        """Wait for the copies (GPU), and let go of buffers this save did not use."""
        if self.from_gpu:
            torch.cuda.current_stream().synchronize()
        del self.buffers[self.used :]

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers[: self.used])


@dataclass
class InFlightSave:
    """One save whose rank file is being written in the background on this rank."""

    step: int
    final: Path
    tmp: Path
    path: Path  # this rank's file in tmp
    metadata: CheckpointMetadata | None  # rank 0: this step's metadata, without files and index yet
    pruning: sync_save.Pruning
    started: float = field(default_factory=time.perf_counter)
    thread: threading.Thread | None = None
    record: dict | None = None  # the written file's {"bytes", "sha256"}
    error: BaseException | None = None

    def write(self, pieces: list[dict], rng: dict) -> None:
        """The writer thread: serialise, hash while writing, fsync (save.write_files). No collectives here."""
        try:
            self.record = sync_save.write_files(pieces, rng, self.path)
        except BaseException as e:  # reported to every rank at the next step boundary, never lost with the thread
            self.error = e

    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()


class AsyncSaver:
    """One rank's asynchronous saves: the host buffers, the save in flight, and the agreement that publishes it.
    Every method that communicates is called by every rank at the same step boundary (run_control.py)."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.buffers = HostBuffers()
        self.in_flight: InFlightSave | None = None
        self.waits: list[float] = []  # seconds each wait() held the training loop (logged too)

    def start(self, trainer, root: Path, run_tag: str, pruning: sync_save.Pruning) -> None:
        """Copy this step's state out and start writing it in the background. The caller has waited for any
        save before (wait())."""
        assert self.in_flight is None, "a save is still in flight"
        ctx, step = self.ctx, trainer.state.step
        final, tmp = root / step_folder(step), temporary_folder(root, step, run_tag)
        t0 = time.perf_counter()
        sync_save.prepare_temporary_folder(ctx.rank, root, tmp, ctx.host)
        self.buffers.start()
        pieces = rank_pieces(trainer, self.buffers.copy)
        self.buffers.finish()
        metadata = sync_save.training_metadata(trainer, {}, []) if ctx.rank == 0 else None
        save = InFlightSave(step, final, tmp, tmp / rank_file(ctx.rank), metadata, pruning)
        save.thread = threading.Thread(
            target=save.write, args=(pieces, random_states(trainer)), name="megagpt-checkpoint-writer", daemon=True
        )
        save.thread.start()
        self.in_flight = save
        get_logger().info(
            f"checkpoint {final}: {self.buffers.nbytes() / 2**20:.1f} MiB copied out in "
            f"{time.perf_counter() - t0:.2f}s, writing in the background"
        )

    def local_status(self) -> list[float]:
        """This rank's part of the step boundary's agreement (max over ranks): [still writing, failed], where
        failed is world_size - rank for a failed writer (so the max names the lowest failing rank), else 0."""
        save = self.in_flight
        if save is None or save.running():
            return [float(save is not None), 0.0]
        return [0.0, float(self.ctx.world_group.size - self.ctx.rank) if save.error is not None else 0.0]

    def agreed(self, status: list[float]) -> None:
        """Act on the agreed status (the max of every rank's local_status): nothing while any rank still writes;
        else publish, or raise the failing rank's error on every rank."""
        writing, failed = status
        if self.in_flight is None or writing > 0:
            return
        save, self.in_flight = self.in_flight, None
        if failed > 0:
            raise self._failure(save, self.ctx.world_group.size - int(failed))
        files = sync_save.gather_file_records(save.record, self.ctx.host, CPU)
        if self.ctx.rank == 0:
            index = sync_save.collect_indexes(save.tmp, files)
            metadata = dataclasses.replace(save.metadata, files=files, index=index)
            sync_save.publish_and_prune(save.tmp, save.final, metadata, save.pruning)
        get_logger().info(f"saved checkpoint {save.final} in {time.perf_counter() - save.started:.1f}s (async)")

    def _failure(self, save: InFlightSave, failed_rank: int) -> CheckpointError:
        """The error every rank raises, one sentence: which rank could not write which file, and why."""
        mine = ""
        if self.ctx.rank == failed_rank:
            mine = sync_save.failure_cause(save.error, failed_rank, save.path)
            get_logger().error(f"the checkpoint writer failed: {save.error!r}")
        why = broadcast_text(mine, failed_rank, self.ctx.host, CPU)
        if self.ctx.rank == 0:  # every writer has finished: nothing writes into tmp any more
            shutil.rmtree(save.tmp, ignore_errors=True)
        return CheckpointError(sync_save.save_failure(save.final, save.final.parent, why))

    def wait(self) -> None:
        """Finish the save in flight (every rank calls it at the same point): join this rank's writer, agree,
        publish or raise. Logs how long the training loop waited for the writers (this rank's and the others')."""
        save = self.in_flight
        if save is None:
            return
        t0 = time.perf_counter()
        save.thread.join()
        status = torch.tensor(self.local_status())
        all_reduce(status, self.ctx.host, op="max")  # every writer has finished: the max is [0, failed]
        waited = time.perf_counter() - t0
        self.waits.append(waited)
        get_logger().info(f"waited {waited:.2f}s for the writers of checkpoint {save.final} to finish")
        self.agreed(status.tolist())
