"""Reshard a checkpoint offline: rewrite it for another layout (tp, pp, vpp, dp, zero), without processes.

For every rank of the new layout, the model chunks that rank would hold are built on the meta device (names,
shapes and tensor-parallel splits, no memory), with the gradient buckets that fix its ZeRO-1 slices; each of its
tensors is then cut out of the full tensor the source checkpoint assembles (checkpoint/reader.py), and the
rank's file written. Loading the result needs no resharding; its random states are re-seeded on load, as after
any change of layout.

    python tools/reshard.py --load runs/ck/step_00000100 --out runs/ck_tp1 --tp 1 --pp 1 --dp 1
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from megagpt.checkpoint.format import MOMENTS, CheckpointError, layout_record
from megagpt.checkpoint.offline import OfflineCheckpointWriter
from megagpt.checkpoint.paths import open_checkpoint
from megagpt.checkpoint.rank_state import shards_of, writes_state, writes_weight
from megagpt.checkpoint.reader import SavedCheckpoint, full_state, full_weight
from megagpt.config import config_from_dict, validate
from megagpt.errors import UserError
from megagpt.log import get_logger
from megagpt.model.build import build_grad_buckets, build_model
from megagpt.parallel.context import ParallelContext
from megagpt.parallel.data_parallel import GradBuckets
from megagpt.parallel.topology import Topology


def target_config(saved: SavedCheckpoint, tp: int, pp: int, vpp: int, dp: int, zero: int):
    """The checkpoint's model with the new layout; the rest only needs to pass validation."""
    # Only the parameters matter: how attention is computed and which kernels run do not change them, and a
    # batch of dp * pp micro-batches passes the interleaved schedule's checks.
    model = {**saved.meta.model, "fused_kernels": "off", "attention_backend": "auto"}
    raw = {
        "model": model,
        "parallel": {"tp": tp, "pp": pp, "vpp": vpp, "zero": zero},
        "train": {
            "precision": saved.meta.precision,
            "seed": saved.meta.seed,
            "device": "cpu",
            "global_batch_size": dp * pp,
            "micro_batch_size": 1,
        },
        "data": {"synthetic": True},
    }
    cfg = config_from_dict(raw)
    validate(cfg, tp * pp * dp)
    return cfg


def reshard_checkpoint(
    source: str | Path, out: str | Path, tp: int, pp: int, vpp: int = 1, dp: int = 1, zero: int = 0
) -> Path:
    """Write `source` (a checkpoint folder, or a checkpoint.dir: its latest) for the layout (tp, pp, vpp, dp, zero)
    as out/step_N (and out/latest); returns the folder."""

    saved = open_checkpoint(source)
    out = Path(out)
    if out.resolve() in (saved.path.parent.resolve(), saved.path.resolve()):
        raise UserError(f"--out {out} is where the source checkpoint lives; write the resharded one elsewhere")
    cfg = target_config(saved, tp, pp, vpp, dp, zero)
    topology = Topology(tp, dp, pp)
    writer = OfflineCheckpointWriter(out, saved.step)
    for rank in range(topology.world_size):
        ctx = ParallelContext.planned(topology, rank)
        with torch.device("meta"):  # names, shapes and splits; no memory
            model_chunks = build_model(cfg, ctx)
        buckets = build_grad_buckets(cfg, ctx, model_chunks)
        writer.add_rank(rank, pieces_for_rank(saved, cfg, ctx, model_chunks, buckets))
    layout = layout_record(tp, pp, dp, vpp, zero)
    resharded_from = {"path": str(saved.path), "layout": saved.meta.layout}
    final = writer.finish(dataclasses.replace(saved.meta, layout=layout, resharded_from=resharded_from))
    get_logger().info(f"resharded {saved.path} ({saved.meta.layout}) into {final} ({layout})")
    return final


def pieces_for_rank(saved: SavedCheckpoint, cfg, ctx, model_chunks, buckets: GradBuckets) -> list[dict]:
    """What rank ctx.rank of the new layout would write: its weights, and its pieces of the optimizer state
    (the slices the buckets give it) where the source has optimizer state."""
    vocab, zero = cfg.model.vocab_size, cfg.parallel.zero >= 1
    shards = shards_of(model_chunks, ctx.tp_group)
    tp_index, dp_index = ctx.tp_group.index, ctx.dp_group.index
    pieces = []
    for param, shard in shards.items():
        if writes_weight(param, shard, tp_index, dp_index):
            weight = required(full_weight(saved, shard, vocab), saved, "weight", shard)
            pieces.append(shard.piece("weight", shard.cut(weight).to(param.dtype)))
    has_state = saved.has("exp_avg")
    copies_back = cfg.train.precision != "fp32"
    for param, start, end in buckets.owned_pieces():
        shard = shards[param]
        if not (has_state and writes_state(param, shard, tp_index, dp_index, zero)):
            continue
        for kind in MOMENTS:
            full = required(full_state(saved, kind, shard, vocab), saved, kind, shard)
            pieces.append(shard.piece(kind, shard.cut(full, start, end), start))
        if copies_back:
            main = required(full_weight(saved, shard, vocab), saved, "weight", shard)
            pieces.append(shard.piece("main", shard.cut(main, start, end).float(), start))
    return pieces


def required(full, saved: SavedCheckpoint, kind: str, shard):
    """A full tensor of the source checkpoint; a missing one is an error naming it."""
    if full is None:
        raise CheckpointError(f"checkpoint {saved.path} has no {kind} for {shard.name}")
    return full


def check_layout_args(tp: int, pp: int, vpp: int, dp: int, zero: int) -> None:
    for name, value in (("--tp", tp), ("--pp", pp), ("--vpp", vpp), ("--dp", dp)):
        if value < 1:
            raise UserError(f"{name}={value} must be at least 1")
    if zero not in (0, 1, 2, 3):
        raise UserError(f"--zero={zero} must be 0, 1, 2 or 3")
