"""This rank's model, built from a config and a parallel context: its pipeline chunks, each a GPT holding a run of
layers, on the context's device in the compute dtype. Training, resharding, the dry run and the tests build it
the same way.

    chunks = build_model(cfg, ctx)            # a ModuleList of vpp chunks
    buckets = build_grad_buckets(cfg, ctx, chunks)   # their data-parallel gradient buckets (and ZeRO sharding)
"""

from __future__ import annotations

import random

import numpy as np
import torch

from megagpt.config import Config
from megagpt.model.facts import compute_dtype
from megagpt.model.gpt import GPT
from megagpt.parallel.context import ParallelContext
from megagpt.parallel.data_parallel import GradBuckets
from megagpt.parallel.pipeline import ZERO_BUBBLE, stage_layers, virtual_stage
from megagpt.parallel.random import TensorParallelRNG
from megagpt.parallel.weight_grads import enable_split_backward


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(cfg: Config, ctx: ParallelContext) -> torch.nn.ModuleList:
    """This rank's model chunks (vpp of them, each a run of layers; see parallel/pipeline.py), in the compute
    dtype. The same seed gives the same full model whatever the layout and precision: each part's weights come
    from its own seed, drawn in fp32."""
    pp, vpp, pp_rank = ctx.topology.pp, cfg.parallel.vpp, ctx.pp_group.index
    # Dropout streams differ between pipeline stages (Megatron's seed + 100 * stage), so no two stages' layers
    # draw the same masks; the weights come from init_seed and do not depend on the stage.
    dropout_seed = cfg.train.seed + 100 * pp_rank
    seed_everything(dropout_seed)
    rng = TensorParallelRNG(dropout_seed, ctx.tp_group.index, ctx.device)
    chunks = torch.nn.ModuleList()
    for chunk in range(vpp):
        stage = virtual_stage(pp, pp_rank, chunk)
        chunks.append(
            GPT(
                cfg.model,
                ctx.tp_group,
                layers=stage_layers(cfg.model.num_layers, pp, vpp, pp_rank, chunk),
                pre_process=stage == 0,
                post_process=stage == pp * vpp - 1,
                sequence_parallel=cfg.parallel.sequence_parallel,
                rng=rng,
                init_seed=cfg.train.seed,
                recompute=cfg.parallel.recompute,
            )
        )
    if cfg.parallel.pp_schedule in ZERO_BUBBLE:
        enable_split_backward(chunks)  # backward as B (input gradients) and W (weight gradients)
    return chunks.to(device=ctx.device, dtype=compute_dtype(cfg.train.precision))


def zero_units(chunks: torch.nn.ModuleList) -> list[list[tuple[torch.nn.Module, list[torch.nn.Parameter]]]]:
    """ZeRO-3's gather units per chunk, in forward order: the chunk's root (embeddings, final LayerNorm, the tied
    output layer: what is not in a transformer layer), then each transformer layer."""
    units = []
    for chunk in chunks:
        blocks = list(chunk.blocks.values())
        in_blocks = {id(p) for block in blocks for p in block.parameters()}
        root = [p for p in chunk.parameters() if id(p) not in in_blocks]
        units.append([(chunk, root)] + [(block, list(block.parameters())) for block in blocks])
    return units


def build_grad_buckets(cfg: Config, ctx: ParallelContext, chunks: torch.nn.ModuleList) -> GradBuckets:
    """The gradient buckets of this rank's chunks for parallel.zero (with zero >= 1 they take the parameters into
    their flat buffers: build the optimizer after them)."""
    zero = cfg.parallel.zero
    return GradBuckets(
        chunks.parameters(),
        ctx.dp_group,
        bucket_bytes=cfg.parallel.grad_bucket_mb * 2**20,
        zero=zero,
        units=zero_units(chunks) if zero == 3 else None,
        accumulate=cfg.parallel.zero_accumulate,
    )
