"""Assemble a run from a validated config: datasets, model, optimizer, run folder, trainer."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch

from megagpt.config import Config, dump_config
from megagpt.data.gpt_dataset import build_datasets
from megagpt.log import get_logger
from megagpt.model.gpt import GPT
from megagpt.parallel.context import ParallelContext
from megagpt.train.metrics import MetricsWriter
from megagpt.train.optimizer import build_optimizer
from megagpt.train.schedules import total_train_samples
from megagpt.train.trainer import Trainer, TrainState


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
    return train, valid


def pretrain(cfg: Config, ctx: ParallelContext) -> TrainState:
    log = get_logger()
    train_data, valid_data = build_data(cfg)

    seed_everything(cfg.train.seed)
    model = GPT(cfg.model, ctx.tp_group).to(ctx.device)
    optimizer = build_optimizer(model, cfg.optim)
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        f"model: {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, {cfg.model.num_heads} heads, "
        f"seq {cfg.model.seq_length}, attention {cfg.model.attention_pattern} (window {cfg.model.local_window}); "
        f"{n_params / 1e6:.2f}M parameters (vocab padded to {model.padded_vocab_size}); device {ctx.device}, "
        f"precision {cfg.train.precision}"
    )

    metrics = None
    if ctx.is_logging_rank:
        run_dir = Path(cfg.logging.dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")
        metrics = MetricsWriter(run_dir, cfg.logging.tensorboard, cfg.train.iters)
        log.info(f"run folder {run_dir}: config.yaml, metrics.jsonl" + (", TensorBoard" if metrics.tb else ""))

    trainer = Trainer(cfg, ctx, model, optimizer, train_data, valid_data, metrics)
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
