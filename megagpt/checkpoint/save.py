"""Saving a training run's checkpoint: every rank writes its file, rank 0 publishes the folder.

Every rank writes its pieces and random states (checkpoint/rank_state.py) into the step's temporary folder; rank 0
then gathers each file's sha256, writes metadata.json with them, renames the folder into place, moves `latest`,
and deletes all but the newest checkpoint.keep (checkpoint/publish.py). A rank killed halfway leaves only a .tmp
folder: `latest` and the checkpoints before it are untouched. A rank that cannot write (a full disk) makes every
rank raise one error naming the checkpoint and the intact one before it.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from megagpt.checkpoint.format import (
    CheckpointError,
    CheckpointMetadata,
    data_rules_of,
    piece_index,
    rank_file,
    rank_file_payload,
)
from megagpt.checkpoint.paths import latest_checkpoint, step_folder, temporary_folder
from megagpt.checkpoint.publish import (
    BackgroundPruner,
    prune,
    publish_checkpoint,
    write_rank_file,
    write_text_atomically,
)
from megagpt.checkpoint.rank_state import layout_of, random_states, rank_pieces
from megagpt.log import get_logger
from megagpt.parallel.comm import all_gather, all_reduce, barrier
from megagpt.train.schedules import total_train_samples


def save_checkpoint(
    trainer, root: str | Path, keep: int, pruner: BackgroundPruner | None = None, run_tag: str = "", clear_stale=True
) -> Path:
    """Write this step's checkpoint under root (every rank calls it); returns its folder. It is written into
    step_N.tmp-RUN_TAG (a name no other run uses) and renamed into place. Rank 0 then deletes the checkpoints
    beyond the newest `keep` (and, with clear_stale, temporaries killed saves left): in the pruner's thread when
    given one, else before returning."""
    ctx = trainer.ctx
    root = Path(root)
    step = trainer.state.step
    final, tmp = root / step_folder(step), temporary_folder(root, step, run_tag)
    start = time.perf_counter()
    prepare_temporary_folder(ctx.rank, root, tmp, ctx.world_group)

    path = tmp / rank_file(ctx.rank)
    record = write_own_file(trainer, path, final)
    files = gather_file_records(record, ctx.world_group, ctx.device)
    if ctx.rank == 0:
        metadata = training_metadata(trainer, files, collect_indexes(tmp, files))
        publish_and_prune(tmp, final, metadata, Pruning(root, keep, pruner, clear_stale, run_tag))
    barrier(ctx.world_group)
    get_logger().info(f"saved checkpoint {final} in {time.perf_counter() - start:.1f}s")
    return final


@dataclass(frozen=True)
class Pruning:
    """What rank 0 deletes after a publish: all but the newest `keep` in root (and, with clear_stale, the
    temporaries of killed saves other than run_tag's), in the pruner's thread when there is one."""

    root: Path
    keep: int
    pruner: BackgroundPruner | None = None
    clear_stale: bool = True
    run_tag: str = ""


def prepare_temporary_folder(rank: int, root: Path, tmp: Path, group) -> None:
    """Rank 0 makes the save's temporary folder (empty); every rank waits for it before writing into it."""
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier(group)


def publish_and_prune(tmp: Path, final: Path, metadata: CheckpointMetadata, pruning: Pruning) -> None:
    """Rank 0, once every rank's file is written: publish tmp as final (publish.py), then prune."""
    publish_checkpoint(tmp, final, metadata)
    p = pruning
    if p.pruner is not None:
        p.pruner.start(p.root, p.keep, final, p.clear_stale, p.run_tag)
    else:
        prune(p.root, p.keep, final, p.clear_stale, p.run_tag)


def write_files(pieces: list[dict], rng: dict | None, path: Path) -> dict:
    """This rank's file, and the index of its pieces beside it (rank 0 collects them into metadata.json);
    returns the file's {"bytes", "sha256"}, hashed while writing. The asynchronous save's writer calls it too."""
    record = write_rank_file(rank_file_payload(pieces, rng), path)
    write_text_atomically(index_file(path), json.dumps(piece_index(pieces, path.name)))
    return record


def write_own_file(trainer, path: Path, final: Path) -> dict:
    """Write this rank's file (and the index of its pieces beside it, for rank 0); returns its record. Every rank
    learns whether any could not write, so none is left waiting in the gather that follows: then all raise, and
    the folder goes."""
    ctx = trainer.ctx
    error, record = None, {}
    try:
        record = write_files(rank_pieces(trainer), random_states(trainer), path)
    except (OSError, RuntimeError) as e:  # a full disk, a quota; torch.save reports them as RuntimeError
        error = e
    failed = torch.tensor([float(error is not None)], device=ctx.device)
    all_reduce(failed, ctx.world_group, op="max")
    if failed.item() > 0:
        if ctx.rank == 0:
            shutil.rmtree(path.parent, ignore_errors=True)
        barrier(ctx.world_group)
        why = failure_cause(error, ctx.rank, path) if error is not None else None
        raise CheckpointError(save_failure(final, final.parent, why))
    return record


def gather_file_records(record: dict, group, device: torch.device) -> dict[str, dict]:
    """Every rank's {"bytes", "sha256"} of its file (record: this rank's), by file name, on the group's first rank
    (empty elsewhere)."""
    digest = record["sha256"]
    # Each rank's sha256 (as 8 signed 32-bit words) and size, gathered to rank 0 for the metadata.
    mine = torch.tensor([int(digest[i : i + 8], 16) - 2**31 for i in range(0, 64, 8)] + [record["bytes"]])
    everyone = all_gather(mine.unsqueeze(0).to(device), 0, group).cpu()
    if group.index != 0:
        return {}
    files = {}
    for rank, row in enumerate(everyone.tolist()):
        sha = "".join(f"{value + 2**31:08x}" for value in row[:8])
        files[rank_file(rank)] = {"bytes": row[8], "sha256": sha}
    return files


def collect_indexes(tmp: Path, files: dict[str, dict]) -> list[list]:
    """The index of every rank file's pieces, from the sidecar each rank wrote (removed once read)."""
    index = []
    for name in files:
        sidecar = index_file(tmp / name)
        index += json.loads(sidecar.read_text())
        sidecar.unlink()
    return index


def training_metadata(trainer, files: dict[str, dict], index: list[list]) -> CheckpointMetadata:
    cfg = trainer.cfg
    position = trainer.state.state_dict()
    return CheckpointMetadata(
        step=position["step"],
        consumed_samples=position["consumed_samples"],
        train_samples=total_train_samples(cfg.train),  # the shuffle depends on it
        data_rules=data_rules_of(cfg),
        adam_step=trainer.optimizer.state_dict()["step"],
        layout=layout_of(cfg, trainer.ctx),
        precision=cfg.train.precision,
        seed=cfg.train.seed,
        model=cfg.to_dict()["model"],
        loss_scaler=trainer.scaler.state_dict() if trainer.scaler is not None else None,
        files=files,
        index=index,
    )


def failure_cause(error: Exception, rank: int, path: Path) -> str:
    """Why a rank could not write its file, in words: "rank R could not write its file: No space left on device:
    PATH"."""
    cause = error
    while cause.__cause__ is not None or cause.__context__ is not None:  # the OSError under torch's wrapper
        cause = cause.__cause__ or cause.__context__
    reason = getattr(cause, "strerror", None) or (str(cause).splitlines() or [type(cause).__name__])[0]
    return f"rank {rank} could not write its file: {reason}: {path}"


def save_failure(final: Path, root: Path, why: str | None) -> str:
    """Which checkpoint could not be saved and why (failure_cause; None: another rank's), and which is intact."""
    why = why or "another rank could not write its file (its log says why)"
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
