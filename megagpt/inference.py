"""A model loaded from a checkpoint for inference (generation, evaluation, conversion tests), on this process's
share of a tensor-parallel layout.

    model, cfg = load_for_inference("runs/ck", ParallelContext.single_process())

The checkpoint may come from any layout: its tensors are re-split for this one (checkpoint/format.py). The
model is built on the meta device and filled from the checkpoint, so no random init is spent, and runs with
dropout off. Pipeline parallelism is not used here: each rank holds every layer of its tensor-parallel share.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from megagpt.checkpoint.paths import open_checkpoint
from megagpt.checkpoint.rank_state import copy_weights, shards_of
from megagpt.checkpoint.reader import SavedCheckpoint
from megagpt.config import Config, config_from_dict
from megagpt.data.batches import read_batch
from megagpt.launch import discover_launch, resolve_device, set_cpu_threads
from megagpt.log import setup_logging
from megagpt.model.facts import compute_dtype
from megagpt.model.gpt import GPT
from megagpt.parallel.comm import shutdown
from megagpt.parallel.context import ParallelContext
from megagpt.parallel.params import copy_spec
from megagpt.parallel.random import TensorParallelRNG
from megagpt.parallel.topology import Topology


def inference_config(saved: SavedCheckpoint, ctx: ParallelContext, precision: str = "fp32") -> Config:
    model = {**saved.meta.model, "dropout": 0.0}
    if ctx.device.type != "cuda":
        model["fused_kernels"] = "auto"  # a checkpoint trained with kernels "on" still runs on the CPU
    return config_from_dict(
        {
            "model": model,
            "parallel": {"tp": ctx.tp_group.size},
            "train": {"precision": precision, "device": ctx.device.type, "seed": saved.meta.seed},
            "data": {"synthetic": True},
        }
    )


def load_for_inference(path: str | Path, ctx: ParallelContext, precision: str = "fp32") -> tuple[GPT, Config]:
    saved = open_checkpoint(path)
    cfg = inference_config(saved, ctx, precision)
    tp = ctx.tp_group
    rng = TensorParallelRNG(cfg.train.seed, tp.index, ctx.device) if tp.size > 1 else None
    with torch.device("meta"):
        model = GPT(cfg.model, tp, rng=rng, init_seed=0)
    # to_empty makes new Parameter objects off the meta device: carry each parameter's ParamSpec over.
    planned = dict(model.named_parameters())
    model = model.to_empty(device=ctx.device).to(compute_dtype(precision))
    for name, param in model.named_parameters():
        copy_spec(planned[name], param)
    for _ in copy_weights(saved, shards_of([model], tp), cfg.model.vocab_size):
        pass
    return model.eval(), cfg


@contextmanager
def inference_context(device: str = "auto") -> Iterator[ParallelContext]:
    """This process's context for a tool run with plain python (one process) or under torchrun, where the
    world is one tensor-parallel group (tp = the number of processes); the process group, if one was made, is
    destroyed on the way out, error or not.

        with inference_context(args.device) as ctx:
            model, cfg = load_for_inference(args.load, ctx)
    """
    launch = discover_launch()
    setup_logging(launch.rank)
    where = resolve_device(device, launch.local_rank, launch.local_world_size, launch.source)
    if where.type == "cpu":
        set_cpu_threads(launch.local_world_size)
    if launch.world_size == 1:
        yield ParallelContext.single_process(where)
        return
    launch.export_rendezvous()
    ctx = ParallelContext.initialize(Topology(launch.world_size, 1, 1), launch.rank, where)
    finished = False
    try:
        yield ctx
        finished = True
    finally:
        shutdown(ctx.world_group, finished)


@torch.no_grad()
def mean_loss(model: GPT, dataset, micro_batch: int, max_samples: int | None = None) -> tuple[float, int]:
    """(mean next-token loss per token, tokens scored) over the dataset's samples in order."""
    count = len(dataset) if max_samples is None else min(max_samples, len(dataset))
    total, tokens = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, count, micro_batch):
        batch = read_batch(dataset, start, min(micro_batch, count - start), model.vocab_size).to(device)
        n = batch[:, 1:].numel()
        total += model(batch[:, :-1], batch[:, 1:]).item() * n
        tokens += n
    return total / max(tokens, 1), tokens
