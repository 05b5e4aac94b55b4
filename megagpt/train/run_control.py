"""During training: when to save a checkpoint, and when to stop.

Saving: every checkpoint.save_interval steps, at the end, and when a stop is requested (checkpoint/save.py; with
checkpoint.async_save, written in the background and published at a later step boundary: checkpoint/async_save.py).

Preemption: SIGTERM or SIGUSR1 (what Slurm sends before a kill), or checkpoint.exit_after_minutes passing, makes
every rank save at the end of the current step and stop; the run resumes with checkpoint.load=auto.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import torch

from megagpt.checkpoint.async_save import AsyncSaver
from megagpt.checkpoint.paths import process_tag
from megagpt.checkpoint.publish import BackgroundPruner
from megagpt.checkpoint.save import Pruning, save_checkpoint
from megagpt.config import Config
from megagpt.log import get_logger
from megagpt.parallel.comm import all_reduce, broadcast_text

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequests:
    """Whether the run must stop at this step boundary: a stop signal arrived on any rank, or the time limit
    (exit_after_minutes, None for none) has passed since this object was made."""

    def __init__(self, exit_after_minutes: float | None, host_group):
        self.exit_after_minutes = exit_after_minutes
        self.host_group = host_group  # gloo, CPU tensors: agreeing needs no wait for the GPU's queue
        self.started = time.monotonic()
        self.signal_received: str | None = None
        self._previous_handlers = {}

    def install_signal_handlers(self) -> None:
        try:
            for sig in STOP_SIGNALS:
                self._previous_handlers[sig] = signal.signal(sig, self._on_signal)
        except ValueError:  # not the main thread (an embedding application): no signals, time limits still work
            get_logger().warning("training runs outside the main thread: SIGTERM / SIGUSR1 will not save a checkpoint")

    def uninstall_signal_handlers(self) -> None:
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)  # None: installed from C
        self._previous_handlers.clear()

    def _on_signal(self, signum, frame) -> None:
        self.signal_received = signal.Signals(signum).name

    def stop_reason(self, more: list[float] = ()) -> tuple[str | None, list[float]]:
        """Why the run must stop now, agreed by every rank: a signal any rank got, or the time limit; and the max
        over ranks of `more`, further flags agreed in the same all-reduce (the asynchronous save's status).
        Agreed each step over the host group (gloo, CPU tensors): no wait for the GPU's queue."""
        limit = self.exit_after_minutes
        over_time = limit is not None and time.monotonic() - self.started >= limit * 60
        flags = torch.tensor([float(self.signal_received is not None), float(over_time), *more])
        all_reduce(flags, self.host_group, op="max")
        agreed_more = flags[2:].tolist()  # a CPU tensor: no wait for the GPU
        if flags[0] > 0:
            return self.signal_received or "a stop signal on another rank", agreed_more
        if flags[1] > 0:
            return f"checkpoint.exit_after_minutes={limit}", agreed_more
        return None, agreed_more


class Checkpointer:
    """Saves every checkpoint.save_interval steps and at the end, and stops the run cleanly when a stop signal
    arrives or checkpoint.exit_after_minutes has passed (every rank agrees, at a step boundary)."""

    def __init__(self, cfg: Config, ctx, clear_stale: bool = True):
        self.cfg, self.ctx = cfg, ctx
        self.clear_stale = clear_stale  # the run holds checkpoint.dir's lock (run_folders.py)
        # Rank 0's host and pid name this run's temporaries, so they never collide with another run's.
        self.run_tag = broadcast_text(process_tag(), 0, ctx.world_group, ctx.device)
        self.settings = cfg.checkpoint
        self.saved_step = -1
        self.stops = StopRequests(cfg.checkpoint.exit_after_minutes, ctx.host)
        self.pruner = BackgroundPruner()
        self.async_saver = AsyncSaver(ctx) if cfg.checkpoint.async_save else None

    def after_step(self, trainer, before_save=None) -> bool:
        """Save when due; True when the run must stop after this step. before_save() runs first when a save
        follows (the trainer's check that the steps since its last row had finite losses). With async_save, the
        save in flight is published here once every rank's writer has finished (or its failure raised)."""
        step = trainer.state.step
        writer_status = self.async_saver.local_status() if self.async_saver is not None else []
        reason, writer_status = self.stops.stop_reason(writer_status)
        if self.async_saver is not None:
            self.async_saver.agreed(writer_status)
        due = self.settings.save_interval > 0 and step % self.settings.save_interval == 0
        if due or reason:
            if before_save is not None:
                before_save()
            self.save(trainer)
        if reason:
            self.finish_saving()
            get_logger().info(
                f"stopping after step {step} ({reason}): checkpoint saved, resume with checkpoint.load=auto"
            )
            return True
        return False

    def at_end(self, trainer) -> None:
        self.save(trainer)
        self.finish_saving()

    def finish_saving(self) -> None:
        """Before the run ends or stops: the save in flight published, old checkpoints deleted."""
        if self.async_saver is not None:
            self.async_saver.wait()
        self.pruner.wait()

    def save(self, trainer) -> None:
        if self.saved_step == trainer.state.step:
            return
        s = self.settings
        if self.async_saver is None:
            save_checkpoint(trainer, s.dir, s.keep, self.pruner, self.run_tag, self.clear_stale)
        else:
            self.async_saver.wait()  # at most one save in flight
            pruning = Pruning(Path(s.dir), s.keep, self.pruner, self.clear_stale, self.run_tag)
            self.async_saver.start(trainer, Path(s.dir), self.run_tag, pruning)
        self.saved_step = trainer.state.step
