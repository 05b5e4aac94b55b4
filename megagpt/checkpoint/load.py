"""Resuming from a checkpoint (checkpoint.load = auto | PATH; paths.resolve_load says which).

With the same layout everything is restored, so every later step computes exactly what an uninterrupted run
computes. With another layout (tp, pp, vpp, dp, zero) the weights and the Adam moments and fp32 main weights are
re-split for it; the random states, which belong to a layout, are re-seeded from train.seed and the step (dropout
masks then differ from the uninterrupted run's; losses with dropout off do not). A config whose model differs from
the checkpoint's (layers, hidden, heads, vocabulary, positions, biases, local layers) is refused with the
differences listed.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from megagpt.checkpoint.format import MOMENTS, CheckpointError, data_rules_of
from megagpt.checkpoint.rank_state import copy_weights, layout_of, param_shards, restore_random_states
from megagpt.checkpoint.reader import SavedCheckpoint, full_state
from megagpt.config import Config
from megagpt.log import get_logger
from megagpt.parallel.comm import all_reduce
from megagpt.train.schedules import total_train_samples

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
    ctx, cfg = trainer.ctx, trainer.cfg
    start = time.perf_counter()
    saved = SavedCheckpoint(path)
    meta = saved.meta
    differences = model_differences(meta.model, cfg)
    if differences:
        raise CheckpointError(
            f"checkpoint {saved.path} was saved for another model: "
            + "; ".join(differences)
            + "; load it with the config it was trained with"
        )
    has_state = saved.has("exp_avg")
    load_weights_and_optimizer(trainer, saved, has_state)
    if trainer.scaler is not None and meta.loss_scaler:
        trainer.scaler.load_state_dict(meta.loss_scaler)
    trainer.state.load_state_dict({"step": saved.step, "consumed_samples": meta.consumed_samples})
    if meta.train_samples not in (None, total_train_samples(cfg.train)):
        get_logger().warning(
            f"checkpoint {saved.path} was trained for {meta.train_samples} samples, this config for "
            f"{total_train_samples(cfg.train)} (train.iters or the batch changed): the data is shuffled for the "
            f"total, so the samples after step {saved.step} differ from those the original run would have read"
        )
    _warn_if_the_data_rules_changed(saved, cfg)
    same_layout = meta.layout == layout_of(cfg, ctx)
    payload = saved.rank_payload(ctx.rank) if same_layout else None
    restore_random_states(trainer, payload["rng"] if payload else None, cfg.train.seed)
    log = get_logger()
    how = "same layout" if same_layout else f"resharded from {meta.layout}"
    log.info(f"loaded checkpoint {saved.path} (step {saved.step}, {how}) in {time.perf_counter() - start:.1f}s")
    if not has_state:
        log.info(f"checkpoint {saved.path} holds no optimizer state: Adam starts from zero moments")
    return saved


def _warn_if_the_data_rules_changed(saved: SavedCheckpoint, cfg) -> None:
    """A run that continues with other split or sample-order rules than it trained with reads other samples from
    here on (and may validate on data it trained on): say so, and how to keep the original's."""
    if cfg.data.synthetic or saved.meta.consumed_samples == 0:
        return
    trained = saved.meta.trained_data_rules()
    now = data_rules_of(cfg)
    changed = [f"data.{key}={trained[key]} then, {now[key]} now" for key in now if trained[key] != now[key]]
    if changed:
        get_logger().warning(
            f"checkpoint {saved.path} was trained with other data rules ({'; '.join(changed)}): the splits and the "
            f"order of samples after step {saved.step} differ from the original run's; set those keys back to "
            "continue it as it was (checkpoints from before data.megatron_compat used false)"
        )


def load_weights_and_optimizer(trainer, saved: SavedCheckpoint, has_state: bool) -> None:
    """Each parameter's weight, then the optimizer's pieces of it (fp32 main weights, and Adam's moments where the
    checkpoint has them), cut for this rank's layout; one parameter's full tensors in memory at a time."""
    optimizer = trainer.optimizer
    template = optimizer.state_dict()
    pieces_of: dict[torch.nn.Parameter, list[dict]] = {}
    for piece in template["pieces"]:
        pieces_of.setdefault(piece["param"], []).append(piece)
    _load_pieces(trainer, saved, has_state, pieces_of)
    if has_state:
        optimizer.load_state_dict({"step": saved.meta.adam_step})


def _load_pieces(trainer, saved: SavedCheckpoint, has_state: bool, pieces_of: dict) -> None:
    optimizer, vocab = trainer.optimizer, trainer.cfg.model.vocab_size
    # ZeRO-3 keeps only this rank's slice of each weight (buckets.store_param): no parameter is whole here.
    for param, shard, weight in copy_weights(saved, param_shards(trainer), vocab, trainer.buckets.store_param):
        pieces = pieces_of.get(param, [])
        moments = {kind: full_state(saved, kind, shard, vocab) for kind in MOMENTS} if pieces and has_state else {}
        updates = []
        for piece in pieces:
            begin, end = piece["start"], piece["end"]
            update = {"param": param, "start": begin}
            if "main" in piece:  # an fp32 model's main weights are its parameters, loaded above
                update["main"] = shard.cut(weight, begin, end).float()
            for kind, full in moments.items():
                if full is None:
                    raise CheckpointError(f"checkpoint {saved.path} has no {kind} for {shard.name}")
                update[kind] = shard.cut(full, begin, end)
            updates.append(update)
        optimizer.load_state_dict({"pieces": updates})
