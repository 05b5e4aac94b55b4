"""Run a pretraining job from a validated config: datasets, model, optimizer, run folder and trainer are assembled
here, then trained (pretrain). launcher/pretrain.py (megagpt/cli/train.py) calls it after validation."""

from __future__ import annotations

import datetime
import hashlib
import math
from pathlib import Path

import torch
import yaml

from megagpt.checkpoint.load import load_checkpoint
from megagpt.checkpoint.paths import resolve_load
from megagpt.checkpoint.reader import SavedCheckpoint
from megagpt.config import Config, dump_config
from megagpt.data.batches import read_batch
from megagpt.data.gpt_dataset import build_datasets
from megagpt.errors import UserError
from megagpt.kernels import cuda_kernels
from megagpt.kernels.build import KernelBuildError
from megagpt.log import get_logger
from megagpt.model.build import build_grad_buckets, build_model
from megagpt.model.facts import compute_dtype
from megagpt.parallel.comm import all_gather, barrier
from megagpt.parallel.context import ParallelContext
from megagpt.parallel.pipeline import PipelineExecutor, slower_schedule_warning
from megagpt.train.loss_scaler import LossScaler
from megagpt.train.metrics import MetricsWriter
from megagpt.train.optimizer import MainParamOptimizer
from megagpt.train.run_control import Checkpointer
from megagpt.train.run_folders import RunFolders, hold_run_folders
from megagpt.train.schedules import micro_batches_per_replica, total_train_samples
from megagpt.train.trainer import Trainer, TrainState
from megagpt.train.wandb_writer import open_wandb


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
        megatron_compat=cfg.data.megatron_compat,
        split_paths=(cfg.data.train_path, cfg.data.valid_path, cfg.data.test_path),
    )
    # A dataset tokenized with another vocabulary shows in its first samples; fail before the run folder exists.
    for dataset in (train, valid):
        if dataset is not None:
            read_batch(dataset, 0, min(len(dataset), 16), cfg.model.vocab_size)
    return train, valid


def keep_earlier_run(run_dir: Path) -> None:
    """A run that starts afresh in a logging.dir an earlier run wrote into moves that run's metrics.jsonl and
    config.yaml aside (metrics.STAMP.jsonl, config.STAMP.yaml, stamped with when it last wrote) instead of
    overwriting them."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists() or metrics.stat().st_size == 0:
        return
    stamp = datetime.datetime.fromtimestamp(metrics.stat().st_mtime).strftime("%Y%m%d-%H%M%S")
    for path in (metrics, run_dir / "config.yaml"):
        if path.exists():
            aside = path.with_name(f"{path.stem}.{stamp}{path.suffix}")
            path.rename(aside)
            get_logger().info(f"an earlier run's {path.name} in {run_dir} is kept as {aside.name}")


def open_run_folder(cfg: Config, resume_step: int | None = None) -> MetricsWriter:
    """logging.dir with the resolved config.yaml, and the writer of metrics.jsonl and TensorBoard events."""
    run_dir = Path(cfg.logging.dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            keep_earlier_run(run_dir)
        dump_config(cfg, run_dir / "config.yaml")
        wandb = open_wandb(cfg, run_dir, resume=resume_step is not None)
        return MetricsWriter(run_dir, cfg.logging.tensorboard, cfg.train.iters, resume_step, wandb)
    except OSError as e:
        raise UserError(f"cannot write logging.dir={run_dir} ({e.strerror or e}); choose a writable folder") from None


def build_executor(cfg: Config, ctx: ParallelContext, chunks: torch.nn.ModuleList) -> PipelineExecutor:
    tp = ctx.tp_group.size
    seq = cfg.model.seq_length // tp if cfg.parallel.sequence_parallel and tp > 1 else cfg.model.seq_length
    return PipelineExecutor(
        chunks,
        ctx.pp_group.index,
        ctx.pp_group.ranks,
        hidden_shape=(cfg.train.micro_batch_size, seq, cfg.model.hidden_size),
        device=ctx.device,
        timeout=datetime.timedelta(seconds=cfg.parallel.timeout_s),
        dtype=compute_dtype(cfg.train.precision),
        schedule=cfg.parallel.pp_schedule,
    )


def build_loss_scaler(cfg: Config) -> LossScaler | None:
    """fp16's loss scaler (dynamic unless train.loss_scale fixes it); None for fp32 and bf16, which need none."""
    t = cfg.train
    if t.precision != "fp16":
        return None
    return LossScaler(
        t.loss_scale if t.loss_scale is not None else t.initial_loss_scale,
        dynamic=t.loss_scale is None,
        min_scale=t.min_loss_scale,
        growth_interval=t.loss_scale_window,
        backoff=t.loss_scale_backoff,
        hysteresis=t.hysteresis,
        max_consecutive_skips=t.max_consecutive_skips,
    )


def build_trainer(cfg: Config, ctx: ParallelContext, train_data, valid_data, metrics, checkpointer=None) -> Trainer:
    chunks = build_model(cfg, ctx)
    grads = build_grad_buckets(cfg, ctx, chunks)
    # After the buckets: with zero >= 1 they hold the parameters in flat buffers, and the pieces view those.
    optimizer = MainParamOptimizer(grads, cfg.optim, ctx, build_loss_scaler(cfg))
    executor = build_executor(cfg, ctx, chunks)
    return Trainer(cfg, ctx, chunks, executor, optimizer, grads, train_data, valid_data, metrics, checkpointer)


def prepare_fused_kernels(cfg: Config, ctx: ParallelContext) -> None:
    """Build (or load) the CUDA kernels before the first step, so no rank compiles inside a step while its peers
    wait in a collective. One rank per machine builds; the others wait on the build lock (kernels/build.py).
    With model.fused_kernels=on a failed build stops the run here; with auto the layers fall back to torch."""
    if ctx.device.type != "cuda" or cfg.model.fused_kernels == "off":
        return
    try:
        cuda_kernels()
    except KernelBuildError as e:
        if cfg.model.fused_kernels == "on":
            raise
        get_logger().warning(f"fused kernels unavailable, using torch's softmax and layer norm: {e}")
    barrier(ctx.world_group)


def configure_tf32(allow: bool) -> None:
    """fp32 matmuls on GPU in TF32 or not (train.allow_tf32), through torch's one public switch: setting the
    newer per-backend fp32_precision flags alone makes torch's own readers of the legacy flags (Inductor's
    autotuning, torch.utils.benchmark) raise on a "mix of legacy and new APIs". Called for CUDA runs only."""
    torch.set_float32_matmul_precision("high" if allow else "highest")


def ensure_same_config(cfg: Config, ctx: ParallelContext) -> None:
    """Every rank must run the same config: a shape or layout that differs between ranks would otherwise show up
    as a mismatched transfer deep inside a step. Compare a digest of the resolved config across the world."""
    digest = hashlib.sha256(yaml.safe_dump(cfg.to_dict(), sort_keys=True).encode()).digest()[:8]
    mine = torch.tensor([int.from_bytes(digest, "little", signed=True)], dtype=torch.int64)
    everyone = all_gather(mine.to(ctx.device), 0, ctx.world_group).cpu()  # NCCL gathers device tensors only
    differing = [rank for rank, value in enumerate(everyone.tolist()) if value != everyone[0].item()]
    if differing:
        raise UserError(
            f"ranks {differing} run a different config than rank 0 (rank {ctx.rank} holds digest {digest.hex()}); "
            f"launch every rank with the same --config and overrides"
        )


def pretrain(cfg: Config, ctx: ParallelContext) -> TrainState:
    ensure_same_config(cfg, ctx)
    if ctx.device.type == "cuda":
        configure_tf32(cfg.train.allow_tf32)
    resume_from = resolve_load(cfg, ctx)
    folders = hold_run_folders(cfg, ctx, resume_from)  # before anything is written; released at the end
    try:
        return _pretrain(cfg, ctx, resume_from, folders)
    finally:
        folders.release()


def _pretrain(cfg: Config, ctx: ParallelContext, resume_from: Path | None, folders: RunFolders) -> TrainState:
    log = get_logger()
    # The first rank builds the sample-index caches; the others then load them instead of racing to write.
    if ctx.rank == 0:
        train_data, valid_data = build_data(cfg)
    barrier(ctx.world_group)
    if ctx.rank != 0:
        train_data, valid_data = build_data(cfg)

    prepare_fused_kernels(cfg, ctx)
    resume_step = SavedCheckpoint(resume_from).step if resume_from is not None else None
    metrics = open_run_folder(cfg, resume_step) if ctx.is_logging_rank else None
    checkpointer = Checkpointer(cfg, ctx, clear_stale=folders.locked) if cfg.checkpoint.dir else None
    trainer = build_trainer(cfg, ctx, train_data, valid_data, metrics, checkpointer)
    if resume_from is not None:
        load_checkpoint(trainer, resume_from)
        if checkpointer is not None and resume_from.parent.resolve() == Path(cfg.checkpoint.dir).resolve():
            checkpointer.saved_step = trainer.state.step  # already on disk there
    elif cfg.checkpoint.load == "auto":
        log.info(f"checkpoint.load=auto: no checkpoint in {cfg.checkpoint.dir} yet, starting from step 0")
    chunks = trainer.chunks
    n_params = sum(p.numel() for p in chunks.parameters())
    tp, dp, pp = ctx.topology.tp, ctx.topology.dp, ctx.topology.pp
    log.info(
        f"model: {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, {cfg.model.num_heads} heads, "
        f"seq {cfg.model.seq_length}, attention {cfg.model.attention_pattern} (window {cfg.model.local_window}); "
        f"{n_params / 1e6:.2f}M parameters on this rank (vocab padded to {chunks[0].padded_vocab_size}); "
        f"layout tp={tp} dp={dp} pp={pp} vpp={cfg.parallel.vpp}, layers {[list(c.layers) for c in chunks]}, "
        f"sequence parallel {chunks[0].sequence_parallel}; {len(trainer.buckets.buckets)} gradient buckets; "
        f"zero {cfg.parallel.zero}, recompute {cfg.parallel.recompute}; device {ctx.device}, precision "
        f"{cfg.train.precision}" + (f" (loss scale {trainer.scaler.scale:g})" if trainer.scaler else "")
    )
    if metrics is not None:
        extras = (", TensorBoard" if metrics.tb else "") + (", Weights & Biases" if metrics.wandb else "")
        log.info(f"run folder {cfg.logging.dir}: config.yaml, metrics.jsonl" + extras)
    if ctx.rank == 0:  # a schedule that waits longer than 1F1B here (zb-h2 past 2 pp micro-batches) is named
        micro_batches = micro_batches_per_replica(cfg.train, dp)
        slower = slower_schedule_warning(cfg.parallel.pp_schedule, pp, cfg.parallel.vpp, micro_batches)
        if slower:
            log.warning(slower)
    if ctx.rank == 0 and cfg.model.qkv_bias and "local" in cfg.model.attention_pattern:
        log.warning(
            "this model will not export to Hugging Face: GPT-Neo (its model for local attention layers) has no query "
            "bias; train with model.qkv_bias=false to keep tools/convert_to_hf.py open"
        )

    if checkpointer is not None:
        checkpointer.stops.install_signal_handlers()  # SIGTERM / SIGUSR1: save at the next step boundary and stop
    try:
        state = trainer.train()
    finally:
        if checkpointer is not None:
            checkpointer.stops.uninstall_signal_handlers()
        if metrics is not None:
            metrics.close()
    final = [row for row in state.history if "val_loss" in row]
    if final:
        val = final[-1]["val_loss"]
        log.info(f"done: {state.step} steps, final validation loss {val:.4f} (perplexity {math.exp(val):.1f})")
    else:
        log.info(f"done: {state.step} steps")
    return state
