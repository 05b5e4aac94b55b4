"""Saving and resuming training: atomic sharded checkpoints, exact resume, loading into another layout, preemption.

    checkpoint.dir/
      latest               the name of the newest complete checkpoint, replaced (atomically) only after it is whole
      step_00000100/       one checkpoint (train/checkpoint_format.py: metadata.json and one file per rank)
      step_00000200.tmp-H-P/ a save in progress (H, P: host and pid of the run's rank 0), or one a killed job left
                           behind (the next save of a run holding the folder's lock clears it)
      .megagpt.lock        held by the run writing here (train/run_folders.py)

Saving (every checkpoint.save_interval steps, at the end, and when a stop is requested): every rank writes its
file into the .tmp folder; rank 0 then writes metadata.json with each file's sha256, renames the folder into
place, moves `latest`, and deletes all but the newest checkpoint.keep. A rank killed halfway leaves only a .tmp
folder: `latest` and the checkpoints before it are untouched.

What a rank writes: its share of the model weights and of the optimizer state as layout-free chunks (each tensor
once: dp rank 0 writes weights, and optimizer state unless ZeRO-1 splits it over dp; tp rank 0 writes what tp
replicates), and its random states (python, numpy, torch, the tensor-parallel dropout stream). The metadata holds
the step, consumed samples (the data position), Adam's step count and the loss scaler; the LR schedule is a
function of the step.

Resuming (checkpoint.load = auto | PATH) with the same layout restores everything, so every later step computes
exactly what an uninterrupted run computes. With another layout (tp, pp, vpp, dp, zero) the weights and the Adam
moments and fp32 main weights are re-split for it; the random states, which belong to a layout, are re-seeded
from train.seed and the step (dropout masks then differ from the uninterrupted run's; losses with dropout off do
not). A config whose model differs from the checkpoint's (layers, hidden, heads, vocabulary, positions, biases)
is refused with the differences listed.

Preemption: SIGTERM or SIGUSR1 (what Slurm sends before a kill), or checkpoint.exit_after_minutes passing, makes
every rank save at the end of the current step and stop; the run resumes with checkpoint.load=auto.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import torch

from megagpt.config import Config
from megagpt.errors import UserError
from megagpt.log import get_logger
from megagpt.parallel.comm import all_gather, all_reduce, barrier, broadcast_text
from megagpt.parallel.params import spec_of
from megagpt.train.checkpoint_format import (
    FORMAT,
    METADATA,
    CheckpointError,
    SavedCheckpoint,
    TensorShard,
    chunk_index,
    fit_vocab_rows,
    rank_file,
    sha256_of,
)
from megagpt.train.schedules import total_train_samples

LATEST = "latest"
MODEL_KEYS = (
    "num_layers",
    "hidden_size",
    "num_heads",
    "vocab_size",
    "max_position_embeddings",
    "seq_length",
    "qkv_bias",
    "attention_pattern",  # which layers are local, and how far they see: both change what the weights compute
    "local_window",
)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def step_folder(step: int) -> str:
    return f"step_{step:08d}"


def process_tag() -> str:
    """HOST-PID: names a writer's temporaries (step_N.tmp-HOST-PID) so that no two writers share one."""
    return f"{socket.gethostname()}-{os.getpid()}"


# ----------------------------------------------------------------------------------------------------------------
# What a rank holds, as TensorShards


def param_shards(trainer) -> dict[torch.nn.Parameter, TensorShard]:
    """Every parameter of this rank's model chunks with its global name and tensor-parallel split."""
    return shards_of(trainer.chunks, trainer.ctx.tp_group)


def shards_of(chunks, tp_group) -> dict[torch.nn.Parameter, TensorShard]:
    shards = {}
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            shards[param] = TensorShard.of(name, param, tp_group.index, tp_group.size)
    return shards


def writes_weight(param, shard: TensorShard, tp_index: int, dp_index: int) -> bool:
    """Each tensor is written once: dp rank 0 writes the weights, tp rank 0 what tp replicates, and the last
    stage's copy of the tied token embedding is left to the first stage (they are equal)."""
    replica = spec_of(param).embedding_copy
    return dp_index == 0 and (shard.dim >= 0 or tp_index == 0) and not replica


def writes_state(param, shard: TensorShard, tp_index: int, dp_index: int, zero: bool) -> bool:
    """Optimizer state: as the weights, except that with ZeRO-1 each dp rank writes its own slices."""
    replica = spec_of(param).embedding_copy
    return (dp_index == 0 or zero) and (shard.dim >= 0 or tp_index == 0) and not replica


def rank_chunks(trainer) -> list[dict]:
    """This rank's share of the weights and optimizer state, as chunks."""
    ctx, optimizer = trainer.ctx, trainer.optimizer
    tp_index, dp_index, zero = ctx.tp_group.index, ctx.dp_group.index, trainer.buckets.shard
    shards = param_shards(trainer)
    chunks = [
        shard.chunk("weight", param)
        for param, shard in shards.items()
        if writes_weight(param, shard, tp_index, dp_index)
    ]
    for param, start, _, main in optimizer.pieces:
        shard = shards[param]
        if writes_state(param, shard, tp_index, dp_index, zero):
            state = optimizer.adam.state[main]
            chunks += [shard.chunk(kind, state[kind], start) for kind in ("exp_avg", "exp_avg_sq")]
            if optimizer.copies_back:
                chunks.append(shard.chunk("main", main, start))
    return chunks


def random_states(trainer) -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    device = trainer.ctx.device
    states = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "device": device.type,  # the tp stream's state is a CPU or a CUDA generator's
    }
    rng = trainer.chunks[0].rng
    states["tp"] = rng.tp_state.clone() if rng is not None else None
    return states


def restore_random_states(trainer, states: dict | None, seed: int) -> None:
    """The saved states, or (after loading into another layout) fresh ones derived from the seed and the step."""
    device = trainer.ctx.device
    rng = trainer.chunks[0].rng
    if states is not None and states.get("device") != device.type:
        states = None  # saved on another kind of device: its generator states do not fit this one
    if states is None:
        fresh = seed + 1_000_003 * trainer.state.step + 100 * trainer.ctx.pp_group.index
        random.seed(fresh)
        np.random.seed(fresh % 2**32)
        torch.manual_seed(fresh)
        if rng is not None:
            rng.__init__(fresh, trainer.ctx.tp_group.index, device)
        return
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and states["cuda"] is not None:
        torch.cuda.set_rng_state(states["cuda"], device)
    if rng is not None and states["tp"] is not None:
        rng.tp_state = states["tp"].clone()


def layout_of(cfg: Config, ctx) -> dict:
    t = ctx.topology
    return {
        "tp": t.tp,
        "pp": t.pp,
        "dp": t.dp,
        "vpp": cfg.parallel.vpp,
        "zero": cfg.parallel.zero,
        "world_size": t.world_size,
    }


# ----------------------------------------------------------------------------------------------------------------
# Saving


def save_checkpoint(
    trainer, root: str | Path, keep: int, pruner: BackgroundPruner | None = None, run_tag: str = "", clear_stale=True
) -> Path:
    """Write this step's checkpoint under root (every rank calls it); returns its folder. It is written into
    step_N.tmp-RUN_TAG (a name no other run uses) and renamed into place. Rank 0 then deletes the checkpoints
    beyond the newest `keep` (and, with clear_stale, temporaries killed saves left): in the pruner's thread when
    given one, else before returning."""
    ctx, cfg = trainer.ctx, trainer.cfg
    root = Path(root)
    step = trainer.state.step
    final, tmp = root / step_folder(step), root / f"{step_folder(step)}.tmp-{run_tag}"
    start = time.perf_counter()
    if ctx.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier(ctx.world_group)

    path = tmp / rank_file(ctx.rank)
    chunks = rank_chunks(trainer)
    error = None
    try:
        write_rank_file({"format": FORMAT, "chunks": chunks, "rng": random_states(trainer)}, path)
        write_text_atomically(index_file(path), json.dumps(chunk_index(chunks, path.name)))
    except (OSError, RuntimeError) as e:  # a full disk, a quota; torch.save reports them as RuntimeError
        error = e
    # Every rank learns whether any could not write, so none is left waiting in the gather below.
    failed = torch.tensor([float(error is not None)], device=ctx.device)
    all_reduce(failed, ctx.world_group, op="max")
    if failed.item() > 0:
        if ctx.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        barrier(ctx.world_group)
        raise CheckpointError(save_failure(final, root, error, ctx.rank))
    digest = sha256_of(path)
    # Each rank's sha256 (as 8 signed 32-bit words) and size, gathered to rank 0 for the metadata.
    mine = torch.tensor([int(digest[i : i + 8], 16) - 2**31 for i in range(0, 64, 8)] + [path.stat().st_size])
    everyone = all_gather(mine.unsqueeze(0).to(ctx.device), 0, ctx.world_group).cpu()

    if ctx.rank == 0:
        files, index = {}, []
        for rank, row in enumerate(everyone.tolist()):
            sha = "".join(f"{value + 2**31:08x}" for value in row[:8])
            files[rank_file(rank)] = {"bytes": row[8], "sha256": sha}
            sidecar = index_file(tmp / rank_file(rank))
            index += json.loads(sidecar.read_text())
            sidecar.unlink()
        scaler = trainer.scaler.state_dict() if trainer.scaler is not None else None
        adam_steps = [float(s["step"]) for s in trainer.optimizer.adam.state.values()]
        metadata = {
            "format": FORMAT,
            "step": step,
            "consumed_samples": trainer.state.consumed_samples,
            "train_samples": total_train_samples(cfg.train),  # the shuffle depends on it
            "adam_step": adam_steps[0] if adam_steps else 0.0,
            "layout": layout_of(cfg, ctx),
            "precision": cfg.train.precision,
            "seed": cfg.train.seed,
            "model": cfg.to_dict()["model"],
            "loss_scaler": scaler,
            "files": files,
            "index": index,
        }
        write_text_atomically(tmp / METADATA, json.dumps(metadata, indent=1))
        publish(tmp, final)
        write_text_atomically(root / LATEST, final.name + "\n")
        if pruner is not None:
            pruner.start(root, keep, final, clear_stale, run_tag)
        else:
            prune(root, keep, final, clear_stale, run_tag)
    barrier(ctx.world_group)
    get_logger().info(f"saved checkpoint {final} in {time.perf_counter() - start:.1f}s")
    return final


def save_failure(final: Path, root: Path, error: Exception | None, rank: int) -> str:
    """Which checkpoint could not be written and why, and which one is intact."""
    if error is None:
        why = "another rank could not write its file (its log says why)"
    else:
        cause = error
        while cause.__cause__ is not None or cause.__context__ is not None:  # the OSError under torch's wrapper
            cause = cause.__cause__ or cause.__context__
        why = f"rank {rank} could not write its file: {getattr(cause, 'strerror', None) or str(cause).splitlines()[0]}"
    try:
        free = f"; {shutil.disk_usage(root).free / 2**30:.1f} GiB are free there"
    except OSError:
        free = ""
    intact = latest_checkpoint(root, required=False)
    kept = f"the newest intact checkpoint is {intact}" if intact else "no earlier checkpoint exists there"
    return (
        f"checkpoint {final} could not be saved ({why}{free}); its partial files were removed and {kept}; free "
        f"space or point checkpoint.dir elsewhere, then resume with checkpoint.load=auto"
    )


def index_file(path: Path) -> Path:
    return path.with_name(path.name + ".index.json")


def write_rank_file(payload: dict, path: Path) -> None:
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


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


def publish(tmp: Path, final: Path) -> None:
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


class OfflineCheckpointWriter:
    """Writes a checkpoint folder from one process, rank file by rank file (tools: resharding, conversion), with
    the same atomic publish and `latest` as a training run's save."""

    def __init__(self, root: str | Path, step: int):
        self.root = Path(root)
        existing = complete_checkpoints(self.root) if self.root.is_dir() else []
        if existing:  # a training run's folder: publishing here would repoint its latest (and may replace a step)
            raise UserError(
                f"{self.root} already holds {len(existing)} checkpoint(s) (newest {existing[-1].name}); write into a "
                f"new or empty folder"
            )
        self.final = self.root / step_folder(step)
        self.tmp = self.root / f"{step_folder(step)}.tmp-{process_tag()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.files: dict[str, dict] = {}
        self.index: list[list] = []

    def add_rank(self, rank: int, chunks: list[dict]) -> None:
        path = self.tmp / rank_file(rank)
        write_rank_file({"format": FORMAT, "chunks": chunks, "rng": None}, path)  # rng None: seeded on load
        self.files[path.name] = {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
        self.index += chunk_index(chunks, path.name)

    def finish(self, metadata: dict) -> Path:
        metadata = {**metadata, "format": FORMAT, "files": self.files, "index": self.index}
        write_text_atomically(self.tmp / METADATA, json.dumps(metadata, indent=1))
        publish(self.tmp, self.final)
        write_text_atomically(self.root / LATEST, self.final.name + "\n")
        return self.final


# ----------------------------------------------------------------------------------------------------------------
# Loading


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
    path = Path(c.load)
    if (path / METADATA).exists():
        return path
    if (path / LATEST).exists() or any(path.glob("step_*")):
        return latest_checkpoint(path, required=True)
    return path  # SavedCheckpoint says what is wrong with it


def latest_checkpoint(root: Path, required: bool) -> Path | None:
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


def model_differences(saved: dict, cfg: Config) -> list[str]:
    model = cfg.to_dict()["model"]
    return [
        f"model.{key}: checkpoint {saved.get(key)!r}, config {model.get(key)!r}"
        for key in MODEL_KEYS
        if saved.get(key) != model.get(key)
    ]


def load_checkpoint(trainer, path: str | Path) -> SavedCheckpoint:
    """Restore a checkpoint into this rank's model, optimizer and training state (every rank calls it). A rank
    that cannot load makes every rank raise, not leaves the others waiting."""
    ctx = trainer.ctx
    error, saved = None, None
    try:
        saved = _load(trainer, path)
    except CheckpointError as e:
        error = e
    failed = torch.tensor([float(error is not None)], device=ctx.device)
    all_reduce(failed, ctx.world_group, op="max")
    if error is not None:
        raise error
    if failed.item() > 0:
        raise CheckpointError(f"another rank could not load checkpoint {path} (its log says why)")
    return saved


def _load(trainer, path: str | Path) -> SavedCheckpoint:
    ctx, cfg, optimizer = trainer.ctx, trainer.cfg, trainer.optimizer
    start = time.perf_counter()
    saved = SavedCheckpoint(path)
    differences = model_differences(saved.meta["model"], cfg)
    if differences:
        raise CheckpointError(
            f"checkpoint {saved.path} was saved for another model: "
            + "; ".join(differences)
            + "; load it with the config it was trained with"
        )
    same_layout = saved.meta["layout"] == layout_of(cfg, ctx)
    shards = param_shards(trainer)
    vocab = cfg.model.vocab_size
    pieces_of: dict[torch.nn.Parameter, list] = {}
    for param, start_, end, main in optimizer.pieces:
        pieces_of.setdefault(param, []).append((start_, end, main))
    has_state = saved.has("exp_avg")

    with torch.no_grad():
        for param, shard, weight in copy_weights(saved, shards, vocab):
            pieces = pieces_of.get(param, [])
            moments = {k: full_for(saved, k, shard, vocab) for k in ("exp_avg", "exp_avg_sq")} if pieces else {}
            for start_, end, main in pieces:
                if optimizer.copies_back:  # an fp32 model's main weights are its parameters, loaded above
                    main.copy_(shard.cut(weight, start_, end).float())
                if has_state:
                    state = optimizer.adam.state[main]
                    for kind, full in moments.items():
                        if full is None:
                            raise CheckpointError(f"checkpoint {saved.path} has no {kind} for {shard.name}")
                        state[kind].copy_(shard.cut(full, start_, end))
        if has_state:
            for state in optimizer.adam.state.values():
                state["step"].fill_(saved.meta["adam_step"])
    if trainer.scaler is not None and saved.meta.get("loss_scaler"):
        trainer.scaler.load_state_dict(saved.meta["loss_scaler"])
    trainer.state.step = saved.step
    trainer.state.consumed_samples = int(saved.meta["consumed_samples"])
    if saved.meta.get("train_samples") not in (None, total_train_samples(cfg.train)):
        get_logger().warning(
            f"checkpoint {saved.path} was trained for {saved.meta['train_samples']} samples, this config for "
            f"{total_train_samples(cfg.train)} (train.iters or the batch changed): the data is shuffled for the "
            f"total, so the samples after step {saved.step} differ from those the original run would have read"
        )
    payload = saved.rank_payload(ctx.rank) if same_layout else None
    restore_random_states(trainer, payload["rng"] if payload else None, cfg.train.seed)
    log = get_logger()
    how = "same layout" if same_layout else f"resharded from {saved.meta['layout']}"
    log.info(f"loaded checkpoint {saved.path} (step {saved.step}, {how}) in {time.perf_counter() - start:.1f}s")
    if not has_state:
        log.info(f"checkpoint {saved.path} holds no optimizer state: Adam starts from zero moments")
    return saved


def copy_weights(saved: SavedCheckpoint, shards: dict, vocab_size: int):
    """Load each parameter's shard of the checkpoint's weights into it; yields (param, shard, full weight).
    The fp32 main weight, where the saving run had one, is the weight (a bf16 model's weight is its rounding),
    so a bf16 checkpoint loads into an fp32 model at full precision."""
    with torch.no_grad():
        for param, shard in shards.items():
            weight = full_for(saved, "main", shard, vocab_size)
            weight = weight if weight is not None else full_for(saved, "weight", shard, vocab_size)
            if weight is None:
                raise CheckpointError(f"checkpoint {saved.path} has no weights for {shard.name}")
            param.copy_(shard.cut(weight).view_as(param).to(param.dtype))
            yield param, shard, weight


def full_for(saved: SavedCheckpoint, kind: str, shard: TensorShard, vocab_size: int) -> torch.Tensor | None:
    full = saved.full(kind, shard.name)
    if full is not None and shard.name.endswith("wte.weight"):
        full = fit_vocab_rows(full, shard, vocab_size)
    return full


# ----------------------------------------------------------------------------------------------------------------
# During training: when to save, when to stop


class Checkpointer:
    """Saves every checkpoint.save_interval steps and at the end, and stops the run cleanly when a stop signal
    arrives or checkpoint.exit_after_minutes has passed (every rank agrees, at a step boundary)."""

    def __init__(self, cfg: Config, ctx, clear_stale: bool = True):
        self.cfg, self.ctx = cfg, ctx
        self.clear_stale = clear_stale  # the run holds checkpoint.dir's lock (run_folders.py)
        # Rank 0's host and pid name this run's temporaries, so they never collide with another run's.
        self.run_tag = broadcast_text(process_tag(), 0, ctx.world_group, ctx.device)
        self.c = cfg.checkpoint
        self.saved_step = -1
        self.started = time.monotonic()
        self.signal_received: str | None = None
        self._previous_handlers = {}
        self.pruner = BackgroundPruner()

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

    def stop_reason(self) -> str | None:
        """Why the run must stop now, agreed by every rank: a signal any rank got, or the time limit.
        Agreed each step over the host group (gloo, CPU tensors): no wait for the GPU's queue."""
        limit = self.c.exit_after_minutes
        over_time = limit is not None and time.monotonic() - self.started >= limit * 60
        flags = torch.tensor([float(self.signal_received is not None), float(over_time)])
        all_reduce(flags, self.ctx.host, op="max")
        if flags[0] > 0:
            return self.signal_received or "a stop signal on another rank"
        if flags[1] > 0:
            return f"checkpoint.exit_after_minutes={limit}"
        return None

    def after_step(self, trainer, before_save=None) -> bool:
        """Save when due; True when the run must stop after this step. before_save() runs first when a save
        follows (the trainer's check that the steps since its last row had finite losses)."""
        step = trainer.state.step
        reason = self.stop_reason()
        due = self.c.save_interval > 0 and step % self.c.save_interval == 0
        if due or reason:
            if before_save is not None:
                before_save()
            self.save(trainer)
        if reason:
            self.pruner.wait()
            get_logger().info(
                f"stopping after step {step} ({reason}): checkpoint saved, resume with checkpoint.load=auto"
            )
            return True
        return False

    def at_end(self, trainer) -> None:
        self.save(trainer)
        self.pruner.wait()

    def save(self, trainer) -> None:
        if self.saved_step != trainer.state.step:
            save_checkpoint(trainer, self.c.dir, self.c.keep, self.pruner, self.run_tag, self.clear_stale)
            self.saved_step = trainer.state.step
