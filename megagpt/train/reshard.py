"""Reshard a checkpoint offline: rewrite it for another layout (tp, pp, vpp, dp, zero), without processes.

For every rank of the new layout, the model chunks that rank would hold are built on the meta device (names,
shapes and tensor-parallel splits, no memory), with the gradient buckets that fix its ZeRO-1 slices; each of its
tensors is then cut out of the full tensor the source checkpoint assembles (train/checkpoint_format.py), and the
rank's file written. Loading the result needs no resharding; its random states are re-seeded on load, as after
any change of layout.

    python tools/reshard.py --load runs/ck/step_00000100 --out runs/ck_tp1 --tp 1 --pp 1 --dp 1
"""

from __future__ import annotations

from pathlib import Path

import torch

from megagpt.config import config_from_dict, validate
from megagpt.errors import UserError
from megagpt.log import get_logger
from megagpt.parallel.context import ParallelContext
from megagpt.parallel.data_parallel import GradBuckets
from megagpt.parallel.topology import Topology
from megagpt.train.checkpoint import OfflineCheckpointWriter, full_for, writes_state, writes_weight
from megagpt.train.checkpoint_format import CheckpointError, SavedCheckpoint, TensorShard


def target_config(saved: SavedCheckpoint, tp: int, pp: int, vpp: int, dp: int, zero: int):
    """The checkpoint's model with the new layout; the rest only needs to pass validation."""
    # Only the parameters matter: how attention is computed and which kernels run do not change them, and a
    # batch of dp * pp micro-batches passes the interleaved schedule's checks.
    model = {**saved.meta["model"], "fused_kernels": "off", "attention_backend": "auto"}
    raw = {
        "model": model,
        "parallel": {"tp": tp, "pp": pp, "vpp": vpp, "zero": zero},
        "train": {
            "precision": saved.meta["precision"],
            "seed": saved.meta["seed"],
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
    """Write `source` for the layout (tp, pp, vpp, dp, zero) as out/step_N (and out/latest); returns the folder."""
    from megagpt.model.build import build_model

    saved = SavedCheckpoint(source)
    out = Path(out)
    if out.resolve() in (saved.path.parent.resolve(), saved.path.resolve()):
        raise UserError(f"--out {out} is where the source checkpoint lives; write the resharded one elsewhere")
    cfg = target_config(saved, tp, pp, vpp, dp, zero)
    topology = Topology(tp, dp, pp)
    vocab = cfg.model.vocab_size
    writer = OfflineCheckpointWriter(out, saved.step)
    has_state = saved.has("exp_avg")
    copies_back = cfg.train.precision != "fp32"
    for rank in range(topology.world_size):
        ctx = ParallelContext.planned(topology, rank)
        with torch.device("meta"):  # names, shapes and splits; no memory
            chunks_of_rank = build_model(cfg, ctx)
        buckets = GradBuckets(
            chunks_of_rank.parameters(), ctx.dp_group, bucket_bytes=cfg.parallel.grad_bucket_mb * 2**20, shard=zero == 1
        )
        shards = {
            param: TensorShard.of(name, param, ctx.tp_group.index, tp)
            for chunk in chunks_of_rank
            for name, param in chunk.named_parameters()
        }
        tp_index, dp_index = ctx.tp_group.index, ctx.dp_group.index
        chunks = []
        for param, shard in shards.items():
            if writes_weight(param, shard, tp_index, dp_index):
                weight = tensor(saved, "main", shard, vocab, required=False)
                weight = weight if weight is not None else tensor(saved, "weight", shard, vocab)
                chunks.append(shard.chunk("weight", shard.cut(weight).to(param.dtype)))
        for param, start, end in buckets.owned_pieces():
            shard = shards[param]
            if not (has_state and writes_state(param, shard, tp_index, dp_index, zero == 1)):
                continue
            for kind in ("exp_avg", "exp_avg_sq"):
                chunks.append(shard.chunk(kind, shard.cut(tensor(saved, kind, shard, vocab), start, end), start))
            if copies_back:
                main = tensor(saved, "main", shard, vocab, required=False)
                main = main if main is not None else tensor(saved, "weight", shard, vocab)
                chunks.append(shard.chunk("main", shard.cut(main, start, end).float(), start))
        writer.add_rank(rank, chunks)
    layout = {"tp": tp, "pp": pp, "dp": dp, "vpp": vpp, "zero": zero, "world_size": topology.world_size}
    resharded_from = {"path": str(saved.path), "layout": saved.meta["layout"]}
    final = writer.finish({**saved.meta, "layout": layout, "resharded_from": resharded_from})
    get_logger().info(f"resharded {saved.path} ({saved.meta['layout']}) into {final} ({layout})")
    return final


def tensor(saved: SavedCheckpoint, kind: str, shard: TensorShard, vocab: int, required: bool = True):
    """A full tensor of the source checkpoint; a missing one is an error when required, else None."""
    full = full_for(saved, kind, shard, vocab)
    if full is None and required:
        raise CheckpointError(f"checkpoint {saved.path} has no {kind} for {shard.name}")
    return full


def check_layout_args(tp: int, pp: int, vpp: int, dp: int, zero: int) -> None:
    for name, value in (("--tp", tp), ("--pp", pp), ("--vpp", vpp), ("--dp", dp)):
        if value < 1:
            raise UserError(f"{name}={value} must be at least 1")
    if zero not in (0, 1):
        raise UserError(f"--zero={zero} must be 0 or 1")
