"""What one rank puts into a checkpoint and takes back out: its share of the weights and of the optimizer state
as layout-free pieces (copy_weights: the weights back, cut for any layout), and its random states.

Each tensor is written once: dp rank 0 writes the weights (ZeRO-3: every dp rank its slices of them), and the
optimizer state unless ZeRO splits it over dp (then every dp rank writes its own slices); tp rank 0 writes what
tp replicates; the last stage's copy of the tied token embedding is left to the first stage (they are equal).
The components are read through their state_dict(): the optimizer's pieces, the tensor-parallel RNG's stream;
nothing here reaches into them.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from megagpt.checkpoint.format import MOMENTS, CheckpointError, TensorShard, layout_record
from megagpt.checkpoint.reader import SavedCheckpoint, full_weight
from megagpt.config import Config
from megagpt.parallel.params import spec_of


def shards_of(chunks, tp_group) -> dict[torch.nn.Parameter, TensorShard]:
    """Every parameter of these model chunks with its global name and tensor-parallel split."""
    shards = {}
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            shards[param] = TensorShard.of(name, param, tp_group.index, tp_group.size)
    return shards


def param_shards(trainer) -> dict[torch.nn.Parameter, TensorShard]:
    """shards_of this rank's model chunks."""
    return shards_of(trainer.chunks, trainer.ctx.tp_group)


def writes_weight(param, shard: TensorShard, tp_index: int, dp_index: int) -> bool:
    """Each tensor is written once: dp rank 0 writes the weights, tp rank 0 what tp replicates, and the last
    stage's copy of the tied token embedding is left to the first stage (they are equal)."""
    replica = spec_of(param).embedding_copy
    return dp_index == 0 and (shard.dim >= 0 or tp_index == 0) and not replica


def writes_state(param, shard: TensorShard, tp_index: int, dp_index: int, zero: bool) -> bool:
    """Optimizer state: as the weights, except that with ZeRO (any level) each dp rank writes its own slices."""
    replica = spec_of(param).embedding_copy
    return (dp_index == 0 or zero) and (shard.dim >= 0 or tp_index == 0) and not replica


def rank_pieces(trainer, copy_out=None) -> list[dict]:
    """This rank's share of the weights and optimizer state, as pieces (their data copied to host memory by
    copy_out, see TensorShard.piece). Under ZeRO-3 the whole weights exist only around a layer's use, so each dp
    rank writes its slices of them, as it does its optimizer state."""
    tp_index, dp_index = trainer.ctx.tp_group.index, trainer.ctx.dp_group.index
    shards = param_shards(trainer)
    buckets = trainer.buckets
    if buckets.shard_params:
        pieces = [
            shards[param].piece("weight", buckets.param_piece(param, start, end), start, copy_out)
            for param, start, end in buckets.owned_pieces()
            if writes_state(param, shards[param], tp_index, dp_index, True)
        ]
    else:
        pieces = [
            shard.piece("weight", param, copy_out=copy_out)
            for param, shard in shards.items()
            if writes_weight(param, shard, tp_index, dp_index)
        ]
    optimizer = trainer.optimizer.state_dict()
    for state in optimizer["pieces"]:
        param, start = state["param"], state["start"]
        shard = shards[param]
        if writes_state(param, shard, tp_index, dp_index, optimizer["sharded"]):
            pieces += [shard.piece(kind, state[kind], start, copy_out) for kind in MOMENTS]
            if "main" in state:  # the fp32 main weight, where it is a copy of a bf16/fp16 model's weight
                pieces.append(shard.piece("main", state["main"], start, copy_out))
    return pieces


def copy_weights(saved: SavedCheckpoint, shards: dict, vocab_size: int, store=None):
    """Load each parameter's shard of the checkpoint's weights into it; yields (param, shard, full weight).
    The fp32 main weight, where the saving run had one, is the weight (a bf16 model's weight is its rounding),
    so a bf16 checkpoint loads into an fp32 model at full precision. store(param, value) writes the value
    (GradBuckets.store_param, which keeps a ZeRO-3 rank's slice only); the parameter itself when None."""
    with torch.no_grad():
        for param, shard in shards.items():
            weight = full_weight(saved, shard, vocab_size)
            if weight is None:
                raise CheckpointError(f"checkpoint {saved.path} has no weights for {shard.name}")
            value = shard.cut(weight).view_as(param).to(param.dtype)
            if store is None:
                param.copy_(value)
            else:
                store(param, value)
            yield param, shard, weight


def layout_of(cfg: Config, ctx) -> dict:
    t = ctx.topology
    return layout_record(t.tp, t.pp, t.dp, cfg.parallel.vpp, cfg.parallel.zero)


# ----------------------------------------------------------------------------------------------------------------
# Random states: python, numpy, torch (and CUDA), and the model's tensor-parallel dropout stream


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
    states["tp"] = rng.state_dict()["tp_state"] if rng is not None else None
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
            rng.reseed(fresh)
        return
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and states["cuda"] is not None:
        torch.cuda.set_rng_state(states["cuda"], device)
    if rng is not None and states["tp"] is not None:
        rng.load_state_dict({"tp_state": states["tp"]})
