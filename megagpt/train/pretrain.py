"""Assemble a run from a validated config: datasets, model, optimizer, run folder, trainer."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch

from megagpt.config import Config, dump_config
from megagpt.data.gpt_dataset import build_datasets
from megagpt.errors import UserError
from megagpt.log import get_logger
from megagpt.model.gpt import GPT
from megagpt.parallel.comm import barrier
from megagpt.parallel.context import Group, ParallelContext
from megagpt.parallel.data_parallel import GradBuckets
from megagpt.parallel.random import TensorParallelRNG
from megagpt.train.metrics import MetricsWriter
from megagpt.train.optimizer import build_optimizer
from megagpt.train.schedules import total_train_samples
from megagpt.train.trainer import Trainer, TrainState, read_batch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_data(cfg: Config):
    """(train, valid) datasets sized for this run; data problems raise DataError before anything is written."""
    valid_samples = cfg.train.eval_iters * cfg.train.global_batch_size
    train, valid, _ = build_datasets(
        path=cfg.data.path,
        split=cfg.data.split,
        seq_length=cfg.model.seq_length,
        seed=cfg.train.seed,
        num_samples=(total_train_samples(cfg.train), valid_samples, 0),
        cache_dir=cfg.data.cache_dir,
        synthetic=cfg.data.synthetic,
        vocab_size=cfg.model.vocab_size,
    )
    # A dataset tokenized with another vocabulary shows in its first samples; fail before the run folder exists.
    for dataset in (train, valid):
        if dataset is not None:
            read_batch(dataset, 0, min(len(dataset), 16), cfg.model.vocab_size)
    return train, valid


def open_run_folder(cfg: Config) -> MetricsWriter:
    """logging.dir with the resolved config.yaml, and the writer of metrics.jsonl and TensorBoard events."""
    run_dir = Path(cfg.logging.dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")
        return MetricsWriter(run_dir, cfg.logging.tensorboard, cfg.train.iters)
    except OSError as e:
        raise UserError(f"cannot write logging.dir={run_dir} ({e.strerror or e}); choose a writable folder") from None


def world_group(ctx: ParallelContext) -> Group:
    return Group(
        tuple(range(ctx.topology.world_size)),
        ctx.rank,
        handle=None if ctx.topology.world_size == 1 else torch.distributed.group.WORLD,
    )


def build_model(cfg: Config, ctx: ParallelContext) -> GPT:
    """This rank's shard of the model; the same seed gives the same full model whatever the layout."""
    seed_everything(cfg.train.seed)
    rng = TensorParallelRNG(cfg.train.seed, ctx.tp_group.index, ctx.device)
    model = GPT(cfg.model, ctx.tp_group, sequence_parallel=cfg.parallel.sequence_parallel, rng=rng)
    return model.to(ctx.device)


def pretrain(cfg: Config, ctx: ParallelContext) -> TrainState:
    log = get_logger()
    # The first rank builds the sample-index caches; the others then load them instead of racing to write.
    everyone = world_group(ctx)
    if ctx.rank == 0:
        train_data, valid_data = build_data(cfg)
    barrier(everyone)
    if ctx.rank != 0:
        train_data, valid_data = build_data(cfg)

    model = build_model(cfg, ctx)
    optimizer = build_optimizer(model, cfg.optim)
    grads = GradBuckets(model.parameters(), ctx.dp_group, bucket_bytes=cfg.parallel.grad_bucket_mb * 2**20)
    n_params = sum(p.numel() for p in model.parameters())
    tp, dp, pp = ctx.topology.tp, ctx.topology.dp, ctx.topology.pp
    log.info(
        f"model: {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, {cfg.model.num_heads} heads, "
        f"seq {cfg.model.seq_length}, attention {cfg.model.attention_pattern} (window {cfg.model.local_window}); "
        f"{n_params / 1e6:.2f}M parameters on this rank (vocab padded to {model.padded_vocab_size}); "
        f"layout tp={tp} dp={dp} pp={pp}, sequence parallel {model.sequence_parallel}; {len(grads.buckets)} "
        f"gradient buckets; device {ctx.device}, precision {cfg.train.precision}"
    )

    metrics = None
    if ctx.is_logging_rank:
        metrics = open_run_folder(cfg)
        log.info(f"run folder {cfg.logging.dir}: config.yaml, metrics.jsonl" + (", TensorBoard" if metrics.tb else ""))

    trainer = Trainer(cfg, ctx, model, optimizer, grads, train_data, valid_data, metrics)
    try:
        state = trainer.train()
    finally:
        if metrics is not None:
            metrics.close()
    final = [row for row in state.history if "val_loss" in row]
    if final:
        val = final[-1]["val_loss"]
        log.info(f"done: {state.step} steps, final validation loss {val:.4f} (perplexity {math.exp(val):.1f})")
    else:
        log.info(f"done: {state.step} steps")
    return state
