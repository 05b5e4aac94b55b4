"""Typed configuration: one frozen dataclass per section, loaded from YAML plus `section.key=value` overrides.

    cfg = load_config("configs/gpt3-1.3b.yaml", ["train.iters=100", "parallel.tp=2"])
    validate(cfg, world_size=8)

A YAML file may start from a named preset (`preset: gpt3-1.3b`, see megagpt/presets.py); its own sections
then override the preset, and command-line overrides override both. Every key, type and value is checked
before anything runs, and each problem is reported as one sentence naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from megagpt.data.spec import is_set, parse_blend, parse_split
from megagpt.errors import ConfigError, UserError
from megagpt.presets import preset_sections


def option(default: Any, help: str):
    """A config field with a default and its one-line description (shown in errors and --help)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ModelConfig:
    num_layers: int = option(12, "number of transformer layers")
    hidden_size: int = option(768, "model width d_model")
    num_heads: int = option(12, "attention heads; must divide hidden_size")
    seq_length: int = option(2048, "tokens per training sample (context length)")
    max_position_embeddings: int | None = option(None, "rows of the learned position table; null means seq_length")
    vocab_size: int = option(50257, "real vocabulary size (GPT-2 BPE: 50257)")
    make_vocab_size_divisible_by: int = option(128, "pad the embedding rows to a multiple of this (times tp)")
    attention_pattern: list[str] = option(["dense", "local"], "per-layer attention kinds, cycled over the layers")
    local_window: int = option(256, "a local layer's token i sees keys j with i - local_window < j <= i")
    attention_backend: Literal["auto", "sdpa", "blocked", "flex", "fused_softmax"] = option(
        "auto", "how attention is computed (megagpt/model/attention.py); auto picks per device and layer kind"
    )
    fused_kernels: Literal["auto", "on", "off"] = option(
        "auto", "megagpt's CUDA softmax and layer norm kernels: auto uses them where they build and fit, on insists"
    )
    dropout: float = option(0.1, "dropout on embeddings, attention probabilities and residual branches")
    qkv_bias: bool = option(True, "bias on the query/key/value projection")
    layernorm_epsilon: float = option(1e-5, "LayerNorm epsilon")
    init_std: float = option(
        0.02, "std of the normal init; residual output projections use init_std/sqrt(2*num_layers)"
    )


@dataclass(frozen=True)
class ParallelConfig:
    tp: int = option(1, "tensor-parallel degree (splits heads and MLP inside a node)")
    pp: int = option(1, "pipeline-parallel degree (splits layers into stages)")
    vpp: int = option(1, "model chunks per pipeline rank (interleaved schedule)")
    pp_schedule: Literal["auto", "1f1b", "interleaved", "zb-h1", "zb-h2"] = option(
        "auto",
        "pipeline schedule: auto (1f1b, or interleaved when vpp > 1), 1f1b, interleaved, or the zero-bubble "
        "zb-h1 (1F1B's activation memory) and zb-h2 (up to 2 pp - 1 micro-batches held), which split backward "
        "into input and weight gradients; zb-h2 waits longer than 1f1b from 2 pp micro-batches on (a warning says "
        "so): prefer zb-h1",
    )
    sequence_parallel: bool = option(False, "shard LayerNorm/dropout regions along the sequence across tp")
    zero: int = option(
        0,
        "ZeRO stage over dp: 0 (none), 1 (optimizer state sharded), 2 (and gradients), 3 (and parameters, "
        "gathered per layer around its forward and backward)",
    )
    zero_accumulate: Literal["slice", "bucket"] = option(
        "slice",
        "zero 2 and 3 with several micro-batches: slice reduce-scatters each micro-batch's gradients into the rank's "
        "slice (full buffers only while a bucket fills); bucket accumulates in full buffers kept through the "
        "step and reduce-scatters once (zero 1's traffic and gradient memory during the step)",
    )
    recompute: Literal["none", "selective", "full"] = option("none", "activation recomputation")
    grad_bucket_mb: float = option(25.0, "size of the data-parallel gradient buckets reduced during backward")
    timeout_s: float = option(600.0, "every collective and pipeline send/receive fails after this many seconds")


@dataclass(frozen=True)
class TrainConfig:
    iters: int = option(100, "optimizer steps to run")
    global_batch_size: int = option(8, "samples per optimizer step, summed over data-parallel ranks")
    micro_batch_size: int = option(1, "samples per forward/backward on one rank")
    batch_rampup: list[int] | None = option(
        None, "[start, increment, samples]: grow the global batch from start by increment over that many samples"
    )
    seed: int = option(1234, "seed for init, dropout and data order")
    precision: Literal["fp32", "bf16", "fp16"] = option(
        "fp32", "compute dtype of the model; the optimizer keeps fp32 main weights and fp32 gradients"
    )
    allow_tf32: bool = option(
        True, "fp32 matmuls on GPU in TF32 (Ampere or newer), as Megatron and torchtitan do; no effect on CPU runs"
    )
    loss_scale: float | None = option(None, "fp16: a fixed loss scale; null means the dynamic scaler below")
    initial_loss_scale: float = option(2.0**32, "fp16: the dynamic loss scale to start from")
    min_loss_scale: float = option(1.0, "fp16: the dynamic loss scale never goes below this")
    loss_scale_window: int = option(1000, "fp16: double the scale after this many steps without overflow")
    loss_scale_backoff: float = option(0.5, "fp16: multiply the scale by this on overflow (after hysteresis)")
    hysteresis: int = option(2, "fp16: overflows tolerated before the scale is lowered (refilled on growth)")
    max_consecutive_skips: int = option(
        50, "fp16: stop training after this many steps in a row were skipped for overflowing gradients"
    )
    device: Literal["auto", "cpu", "cuda"] = option("auto", "auto picks cuda when a GPU is present")
    eval_interval: int = option(0, "evaluate on the validation split every this many steps (0: only at the end)")
    eval_iters: int = option(0, "global batches per evaluation (0: no evaluation)")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = option(6.0e-4, "peak learning rate")
    min_lr: float = option(6.0e-5, "learning rate at the end of the cosine decay")
    warmup_iters: int = option(0, "linear warm-up steps from 0 to lr")
    decay_iters: int | None = option(None, "step at which the cosine decay reaches min_lr; null means train.iters")
    weight_decay: float = option(0.1, "AdamW weight decay (not applied to biases and norms)")
    clip_grad: float = option(1.0, "clip the global gradient norm to this (0: no clipping)")
    beta1: float = option(0.9, "Adam beta1")
    beta2: float = option(0.95, "Adam beta2")
    eps: float = option(1e-8, "Adam epsilon")


@dataclass(frozen=True)
class DataConfig:
    path: str | list | None = option(
        None,
        "dataset prefix (P for P.bin/P.idx), a blend [weight1, prefix1, weight2, prefix2, ...], a list of prefixes "
        "weighted by size, or Megatron's --data-path as one string '0.3 P1 0.7 P2'",
    )
    split: str = option("969,30,1", "train,valid,test proportions of the sequences (Megatron's --split)")
    train_path: str | list | None = option(
        None, "training data of its own, used whole (Megatron's --train-data-path); instead of data.path"
    )
    valid_path: str | list | None = option(
        None, "validation data of its own, used whole (Megatron's --valid-data-path); instead of data.path"
    )
    test_path: str | list | None = option(
        None, "test data of its own, used whole (Megatron's --test-data-path); instead of data.path"
    )
    megatron_compat: bool = option(
        True,
        "Megatron Core's split boundaries, split unit, blend sizes and path syntax; false: megagpt's earlier rules",
    )
    synthetic: bool = option(False, "deterministic random tokens instead of data.path (tests, benchmarks)")
    cache_dir: str | None = option(None, "where sample-index caches go; null means beside each dataset")


@dataclass(frozen=True)
class CheckpointConfig:
    dir: str | None = option(None, "where checkpoints are saved (also at the end of training and on a stop signal)")
    save_interval: int = option(0, "save every this many steps (0: only at the end and on a stop)")
    load: str | None = option(None, "resume from: auto (the latest in checkpoint.dir, if any), or a checkpoint path")
    keep: int = option(2, "keep this many newest checkpoints in checkpoint.dir, deleting older ones")
    exit_after_minutes: float | None = option(
        None, "save and stop at the first step boundary after this many minutes (jobs with a wall-clock limit)"
    )
    async_save: bool = option(
        False,
        "copy the state to host memory at a save and write it in the background; published once every rank's "
        "writer has finished (a stop or the end of training waits for it)",
    )


@dataclass(frozen=True)
class LoggingConfig:
    dir: str = option("runs/megagpt", "run folder: config.yaml, metrics.jsonl, TensorBoard events")
    log_interval: int = option(10, "log a line and a metrics row every this many steps")
    tensorboard: bool = option(True, "write TensorBoard scalars into logging.dir")
    memory_report: bool = option(
        True, "log each rank's memory after the first step (on CPU that step runs slower, under an allocation tracker)"
    )
    peak_tflops: float | None = option(
        None,
        "the device's peak TFLOP/s that MFU divides by; null: a known GPU's dense peak in the compute dtype, or on "
        "CPU (and unknown GPUs) a matmul measured at startup",
    )
    wandb_project: str | None = option(
        None, "log the rows and the config to this Weights & Biases project (rank 0; pip install 'megagpt[wandb]')"
    )
    wandb_run_name: str | None = option(None, "the W&B run's name; null: W&B picks one")
    wandb_mode: Literal["auto", "online", "offline"] = option(
        "auto",
        "online syncs to W&B as it trains, offline only writes logging.dir/wandb (wandb sync uploads it); auto: "
        "W&B's own setting (WANDB_MODE), online by default",
    )
    profile: str | int | None = option(
        None,
        "run torch.profiler over these steps, e.g. '5-7' or 5 (as numbered in the logs), writing one Chrome trace "
        "per rank into logging.dir/traces; null: off",
    )
    profile_ranks: list[int] | Literal["all"] = option(
        "all", "the global ranks that write a trace when logging.profile is set: all, or a list such as [0, 4]"
    )
    memory_snapshot: bool = option(
        False,
        "CUDA only, with logging.profile: record the allocator's history from the first step and dump it at the "
        "profiled window's end into logging.dir/traces (for pytorch.org/memory_viz)",
    )


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# section name -> its dataclass, in the order they appear in Config
SECTIONS: dict[str, type] = {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}


# ----------------------------------------------------------------------------------------------------------------
# Loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(
                    f"key '{key}' appears twice in one mapping (lines {seen[key] + 1} and "
                    f"{key_node.start_mark.line + 1}); PyYAML would keep the last silently, so keep one"
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (optionally starting from `preset:`), apply `section.key=value` overrides, check types."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {path} is a folder; pass a YAML file to --config (configs/ holds some)")
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass an existing YAML file to --config")
        try:
            raw = yaml.load(path.read_bytes().decode("utf-8"), Loader=_UniqueKeyLoader) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"config file {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); save it "
                f"as UTF-8"
            ) from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        except ConfigError as e:
            raise ConfigError(f"config file {path}: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, not {type(raw).__name__}")
    return config_from_dict(raw, overrides)


def config_from_dict(raw: dict, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a Config from nested dicts, a `preset` key and overrides; unknown keys and wrong types are errors."""
    raw = dict(raw)
    merged: dict[str, dict] = {}
    preset = raw.pop("preset", None)
    if preset is not None:
        _merge(merged, preset_sections(preset))
    for section, values in raw.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section '{section}'; allowed: preset, {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{section}' must be a mapping of keys, not {values!r}")
        _merge(merged, {section: values})
    for item in overrides:
        section, key, value = _parse_override(item)
        merged.setdefault(section, {})[key] = value
    # Report every unknown key and wrong type at once, not just the first.
    problems: list[str] = []
    sections = {name: _build_section(name, cls, merged.get(name, {}), problems) for name, cls in SECTIONS.items()}
    if problems:
        raise ConfigError(" ".join(f"{msg}." for msg in problems) if len(problems) > 1 else problems[0])
    return Config(**sections)


def _merge(into: dict, new: dict) -> None:
    for section, values in new.items():
        into.setdefault(section, {}).update(values)


class _Raw(str):
    """An override value as typed on the command line; parsed against the field's type later."""


def _parse_override(item: str) -> tuple[str, str, Any]:
    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise ConfigError(f"override '{item}' must look like section.key=value, e.g. train.iters=100")
    dotted, value = item.split("=", 1)
    section, key = dotted.split(".", 1)
    if section not in SECTIONS:
        raise ConfigError(f"override '{item}' names unknown section '{section}'; allowed: {', '.join(SECTIONS)}")
    return section, key, _Raw(value)


def _build_section(name: str, cls: type, values: dict, problems: list[str]):
    """The section's dataclass from its values; each unknown key or wrong type is appended to problems."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            problems.append(f"unknown config key '{name}.{key}'; {name} allows: {', '.join(sorted(known))}")
            continue
        try:
            kwargs[key] = _coerce(value, hints[key], f"{name}.{key}")
        except ConfigError as e:
            problems.append(str(e))
    return cls(**kwargs)


def _type_name(typ) -> str:
    origin = typing.get_origin(typ)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(typ))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(typ))
    if typ is type(None):
        return "null"
    if origin is list:
        args = typing.get_args(typ)
        return f"a list of {args[0].__name__}" if args else "a list"
    return typ.__name__ if hasattr(typ, "__name__") else str(typ)


def _coerce(value: Any, typ, key: str):
    """Return value as type typ, or raise ConfigError naming the key and the allowed type."""
    if isinstance(value, _Raw):
        # A command-line string: str fields take it verbatim, everything else is parsed as YAML ("100", "[1,2]").
        if typ is str or (typing.get_origin(typ) is Literal and str(value) in typing.get_args(typ)):
            return str(value)
        try:
            value = yaml.safe_load(str(value))
        except yaml.YAMLError:
            value = str(value)
    ok, result = _try_coerce(value, typ)
    if not ok:
        raise ConfigError(f"config key '{key}' got {value!r}, but it must be {_type_name(typ)}")
    return result


def _try_coerce(value: Any, typ) -> tuple[bool, Any]:
    origin = typing.get_origin(typ)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(typ):
            ok, result = _try_coerce(value, arg)
            if ok:
                return True, result
        return False, None
    if origin is Literal:
        return (value in typing.get_args(typ)), value
    if origin is list or typ is list:
        if not isinstance(value, list):
            return False, None
        (item_type,) = typing.get_args(typ) or (Any,)
        if item_type is Any:
            return True, list(value)
        items = [_try_coerce(v, item_type) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    if typ is type(None):
        return value is None, None
    if typ is bool:
        return isinstance(value, bool), value
    if typ is int:
        return (isinstance(value, int) and not isinstance(value, bool)), value
    if typ is float:
        # YAML 1.1 reads "6e-4" (no dot) as a string; accept any string float() understands.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):
            try:
                return True, float(value)
            except ValueError:
                return False, None
        return False, None
    if typ is str:
        return isinstance(value, str), value
    raise TypeError(f"unsupported config field type {typ}")


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML; load_config() of that file gives the same Config back."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# ----------------------------------------------------------------------------------------------------------------
# Validation, before any process group or tensor exists: one function per section for the rules inside it, then
# _cross_section_problems, the one place for rules that tie sections together (layout, device, schedule, data).


def data_parallel_size(cfg: Config, world_size: int) -> int:
    return world_size // (cfg.parallel.tp * cfg.parallel.pp)


def validate(cfg: Config, world_size: int = 1) -> None:
    """Raise one ConfigError listing every offending value (each as a sentence with the fix)."""
    problems = [
        *_model_problems(cfg.model),
        *_parallel_problems(cfg.parallel),
        *_train_problems(cfg.train),
        *_optim_problems(cfg.optim),
        *_data_problems(cfg.data),
        *_checkpoint_problems(cfg.checkpoint),
        *_logging_problems(cfg.logging),
        *_cross_section_problems(cfg, world_size),
    ]
    if problems:
        raise ConfigError("invalid config: " + " ".join(f"({i}) {msg}." for i, msg in enumerate(problems, 1)))


class _Problems(list):
    """The messages of the checks that failed, in the order they were made."""

    def check(self, condition: bool, message: str) -> None:
        if not condition:
            self.append(message)


def _model_problems(m: ModelConfig) -> list[str]:
    problems = _Problems()
    for key in ("num_layers", "hidden_size", "num_heads", "seq_length", "vocab_size", "local_window"):
        problems.check(getattr(m, key) >= 1, f"model.{key}={getattr(m, key)} must be at least 1")
    problems.check(m.make_vocab_size_divisible_by >= 1, "model.make_vocab_size_divisible_by must be at least 1")
    if m.num_heads >= 1:
        problems.check(
            m.hidden_size % m.num_heads == 0,
            f"model.num_heads={m.num_heads} does not divide model.hidden_size={m.hidden_size}; "
            f"pick a head count that divides it",
        )
    positions = max_positions(m)
    problems.check(
        m.seq_length <= positions,
        f"model.seq_length={m.seq_length} is above the position table (model.max_position_embeddings={positions}); "
        f"raise max_position_embeddings or shorten seq_length",
    )
    problems.check(len(m.attention_pattern) >= 1, "model.attention_pattern must list at least one of: dense, local")
    for kind in m.attention_pattern:
        problems.check(
            kind in ("dense", "local"), f"model.attention_pattern holds '{kind}'; allowed kinds: dense, local"
        )
    problems.check(0.0 <= m.dropout < 1.0, f"model.dropout={m.dropout} must be in [0, 1)")
    problems.check(
        m.attention_backend != "flex" or m.dropout == 0.0,
        f"model.attention_backend=flex has no attention dropout but model.dropout={m.dropout}; "
        f"set model.dropout=0 or use attention_backend=auto",
    )
    problems.check(m.layernorm_epsilon > 0, "model.layernorm_epsilon must be positive")
    problems.check(m.init_std > 0, "model.init_std must be positive")
    return problems


def _parallel_problems(p: ParallelConfig) -> list[str]:
    problems = _Problems()
    for key in ("tp", "pp", "vpp"):
        problems.check(getattr(p, key) >= 1, f"parallel.{key}={getattr(p, key)} must be at least 1")
    problems.check(p.zero in (0, 1, 2, 3), f"parallel.zero={p.zero} must be 0, 1, 2 or 3")
    problems.check(p.grad_bucket_mb > 0, f"parallel.grad_bucket_mb={p.grad_bucket_mb} must be positive")
    problems.check(p.timeout_s > 0, f"parallel.timeout_s={p.timeout_s} must be positive")
    if p.pp >= 1 and p.vpp >= 1:
        problems.check(
            p.vpp == 1 or p.pp > 1, f"parallel.vpp={p.vpp} interleaves pipeline stages, so it needs parallel.pp > 1"
        )
        problems.extend(_schedule_problems(p))
    return problems


def _schedule_problems(p: ParallelConfig) -> list[str]:
    """parallel.pp_schedule against the layout: each schedule runs on the chunk layout it was written for."""
    problems = _Problems()
    name = p.pp_schedule
    problems.check(
        name != "1f1b" or p.vpp == 1,
        f"parallel.pp_schedule=1f1b runs one model chunk per rank, but parallel.vpp={p.vpp}; "
        f"set parallel.vpp=1 or parallel.pp_schedule=interleaved",
    )
    problems.check(
        name != "interleaved" or p.vpp > 1,
        "parallel.pp_schedule=interleaved needs several model chunks per rank; set parallel.vpp to 2 or more",
    )
    if name.startswith("zb-"):
        problems.check(
            p.vpp == 1,
            f"parallel.pp_schedule={name} runs one model chunk per rank, but parallel.vpp={p.vpp}; set parallel.vpp=1",
        )
        problems.check(
            p.pp > 1,
            f"parallel.pp_schedule={name} fills the pipeline's bubble, but parallel.pp=1 has none; "
            f"use parallel.pp > 1 or parallel.pp_schedule=auto",
        )
        problems.check(
            p.zero <= 1,
            f"parallel.pp_schedule={name} is not built for parallel.zero={p.zero} (its weight passes would need the "
            f"sharded parameters gathered again); use parallel.zero 0 or 1, or parallel.pp_schedule=auto",
        )
    return problems


def _train_problems(t: TrainConfig) -> list[str]:
    problems = _Problems()
    for key in ("iters", "global_batch_size", "micro_batch_size"):
        problems.check(getattr(t, key) >= 1, f"train.{key}={getattr(t, key)} must be at least 1")
    problems.check(
        t.loss_scale is None or t.precision == "fp16",
        f"train.loss_scale={t.loss_scale} only applies to train.precision=fp16 (got {t.precision}); unset it",
    )
    if t.precision == "fp16":
        problems.extend(_fp16_problems(t))
    problems.check(t.eval_interval >= 0, "train.eval_interval must be 0 or more")
    problems.check(t.eval_iters >= 0, "train.eval_iters must be 0 or more")
    return problems


def _fp16_problems(t: TrainConfig) -> list[str]:
    problems = _Problems()
    problems.check(
        t.loss_scale is None or t.loss_scale > 0, f"train.loss_scale={t.loss_scale} must be positive or null"
    )
    problems.check(t.initial_loss_scale > 0, f"train.initial_loss_scale={t.initial_loss_scale} must be positive")
    problems.check(
        0 < t.min_loss_scale <= t.initial_loss_scale,
        f"train.min_loss_scale={t.min_loss_scale} must be positive and at most train.initial_loss_scale",
    )
    problems.check(t.loss_scale_window >= 1, "train.loss_scale_window must be at least 1")
    problems.check(0 < t.loss_scale_backoff < 1, f"train.loss_scale_backoff={t.loss_scale_backoff} must be in (0, 1)")
    problems.check(t.hysteresis >= 1, "train.hysteresis must be at least 1")
    problems.check(t.max_consecutive_skips >= 1, "train.max_consecutive_skips must be at least 1")
    return problems


def _optim_problems(o: OptimConfig) -> list[str]:
    problems = _Problems()
    problems.check(o.lr > 0, f"optim.lr={o.lr} must be positive")
    problems.check(0 <= o.min_lr <= o.lr, f"optim.min_lr={o.min_lr} must be between 0 and optim.lr={o.lr}")
    problems.check(o.warmup_iters >= 0, "optim.warmup_iters must be 0 or more")
    problems.check(o.weight_decay >= 0, "optim.weight_decay must be 0 or more")
    problems.check(o.clip_grad >= 0, "optim.clip_grad must be 0 (off) or positive")
    for key in ("beta1", "beta2"):
        problems.check(0 <= getattr(o, key) < 1, f"optim.{key}={getattr(o, key)} must be in [0, 1)")
    problems.check(o.eps > 0, "optim.eps must be positive")
    return problems


def _split_paths(d: DataConfig) -> dict:
    """data.train_path / valid_path / test_path by split name."""
    return {name: getattr(d, f"{name}_path") for name in ("train", "valid", "test")}


def _data_problems(d: DataConfig) -> list[str]:
    problems = _Problems()
    split_paths = _split_paths(d)
    per_split = any(is_set(p) for p in split_paths.values())
    problems.check(
        not (d.synthetic and d.path is not None),
        f"data.path={d.path} is set but data.synthetic=true would train on random tokens and ignore it (the "
        f"tiny presets turn synthetic on); set data.synthetic=false to train on data.path, or drop data.path",
    )
    problems.check(
        not (d.synthetic and per_split),
        "data.train_path / valid_path / test_path are set but data.synthetic=true would ignore them; set "
        "data.synthetic=false, or drop them",
    )
    problems.check(
        not (is_set(d.path) and per_split),
        "data.path and data.train_path / valid_path / test_path are both set; give one or the other (as Megatron's "
        "--data-path and --train-data-path)",
    )
    if not d.synthetic and per_split:
        problems.check(is_set(split_paths["train"]), "data.valid_path / test_path are set but data.train_path is not")
        for name, value in split_paths.items():
            if is_set(value):
                problems.extend(_user_error(parse_blend, value, d.megatron_compat, f"data.{name}_path"))
    elif not d.synthetic:
        problems.check(
            d.path is not None,
            "data.path is not set; give a dataset prefix (tools/preprocess_data.py makes one) "
            "or set data.synthetic=true",
        )
        if d.path is not None:
            problems.extend(_user_error(parse_blend, d.path, d.megatron_compat))
    problems.extend(_user_error(parse_split, d.split))
    return problems


def _checkpoint_problems(c: CheckpointConfig) -> list[str]:
    problems = _Problems()
    problems.check(c.save_interval >= 0, f"checkpoint.save_interval={c.save_interval} must be 0 (off) or positive")
    problems.check(c.keep >= 1, f"checkpoint.keep={c.keep} must be at least 1")
    for key, value in (
        ("save_interval", c.save_interval or None),
        ("load=auto", c.load == "auto" or None),
        ("exit_after_minutes", c.exit_after_minutes),
        ("async_save", c.async_save or None),
    ):
        problems.check(value is None or c.dir is not None, f"checkpoint.{key} needs checkpoint.dir; set where to save")
    problems.check(
        c.exit_after_minutes is None or c.exit_after_minutes > 0,
        f"checkpoint.exit_after_minutes={c.exit_after_minutes} must be positive",
    )
    return problems


def _logging_problems(lg: LoggingConfig) -> list[str]:
    problems = _Problems()
    problems.check(lg.log_interval >= 1, "logging.log_interval must be at least 1")
    problems.check(
        lg.peak_tflops is None or lg.peak_tflops > 0,
        f"logging.peak_tflops={lg.peak_tflops} must be a positive TFLOP/s, or null to look it up or measure it",
    )
    if lg.wandb_project:
        problems.check(
            importlib.util.find_spec("wandb") is not None,
            f"logging.wandb_project={lg.wandb_project} needs Weights & Biases, which is not installed; run "
            f"pip install 'megagpt[wandb]' or unset logging.wandb_project",
        )
    else:
        problems.check(
            lg.wandb_run_name is None, "logging.wandb_run_name is set without logging.wandb_project; set the project"
        )
        problems.check(
            lg.wandb_mode == "auto",
            f"logging.wandb_mode={lg.wandb_mode} is set without logging.wandb_project; set the project",
        )
    problems.extend(_user_error(profile_steps, lg))
    if lg.profile_ranks != "all":
        problems.check(
            len(lg.profile_ranks) > 0 and len(set(lg.profile_ranks)) == len(lg.profile_ranks),
            f"logging.profile_ranks={lg.profile_ranks} must list each rank once (or be all)",
        )
    problems.check(
        not lg.memory_snapshot or lg.profile is not None,
        "logging.memory_snapshot is dumped at the end of the profiled steps; set logging.profile too, e.g. "
        "logging.profile=5-7",
    )
    return problems


def profile_steps(lg: LoggingConfig) -> tuple[int, int] | None:
    """The first and last step logging.profile asks for (steps numbered from 1, as logged), or None when off."""
    if lg.profile is None:
        return None
    text = str(lg.profile).strip()
    first, dash, last = text.partition("-")
    try:
        start, end = int(first), int(last) if dash else int(first)
    except ValueError:
        start = end = 0
    if not 1 <= start <= end:
        raise UserError(
            f"logging.profile={lg.profile!r} must be a step or a range of steps such as '5-7' (first <= last, "
            f"steps counted from 1)"
        )
    return start, end


def _cross_section_problems(cfg: Config, world_size: int) -> list[str]:
    """The rules that read more than one section: the layout against the model and the batch, the device the
    kernels need, the decay against train.iters, evaluation against the data split."""
    problems = _Problems()
    problems.extend(_layout_problems(cfg, world_size))
    problems.extend(_device_problems(cfg.model, cfg.train))
    problems.extend(_profile_problems(cfg.logging, cfg.train, world_size))
    o, t, d = cfg.optim, cfg.train, cfg.data
    decay = o.decay_iters if o.decay_iters is not None else t.iters
    problems.check(
        decay >= o.warmup_iters,
        f"optim.decay_iters={decay} is below optim.warmup_iters={o.warmup_iters}; decay must end after warm-up",
    )
    per_split = any(is_set(p) for p in _split_paths(d).values())
    if t.eval_iters > 0 and not d.synthetic and per_split:
        problems.check(
            is_set(d.valid_path),
            f"train.eval_iters={t.eval_iters} needs validation data, but data.valid_path is not set; set it or "
            "set train.eval_iters=0",
        )
    elif t.eval_iters > 0 and not d.synthetic and not _user_error(parse_split, d.split):
        problems.check(
            parse_split(d.split)[1] > 0,
            f"train.eval_iters={t.eval_iters} needs a validation split, but data.split='{d.split}' "
            f"gives it no documents; give it a share or set train.eval_iters=0",
        )
    return problems


def _layout_problems(cfg: Config, world_size: int) -> list[str]:
    """The parallel layout against the world size, the model's shape and the batch. A degree below 1 is reported by
    _parallel_problems; the checks that would divide by it are skipped."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    problems = _Problems()
    if p.tp >= 1 and p.pp >= 1:
        problems.check(
            world_size % (p.tp * p.pp) == 0,
            f"world size {world_size} is not divisible by parallel.tp * parallel.pp = {p.tp * p.pp}; "
            f"launch a multiple of {p.tp * p.pp} processes",
        )
    if p.tp >= 1 and m.num_heads >= 1:
        problems.check(
            m.num_heads % p.tp == 0,
            f"parallel.tp={p.tp} does not divide model.num_heads={m.num_heads}; each tensor-parallel rank needs "
            f"whole heads, so pick a tp that divides {m.num_heads}",
        )
    if p.sequence_parallel and p.tp >= 1:
        problems.check(
            m.seq_length % p.tp == 0,
            f"parallel.sequence_parallel shards the sequence, but parallel.tp={p.tp} does not divide "
            f"model.seq_length={m.seq_length}",
        )
    if p.pp >= 1 and p.vpp >= 1:
        stages = p.pp * p.vpp
        problems.check(
            m.num_layers % stages == 0,
            f"model.num_layers={m.num_layers} does not split into parallel.pp * parallel.vpp = {p.pp} * {p.vpp} = "
            f"{stages} equal stages; use a layer count that {stages} divides",
        )
    dp = data_parallel_size(cfg, world_size) if p.tp >= 1 and p.pp >= 1 else 1
    if t.micro_batch_size >= 1 and dp >= 1:
        problems.extend(_batch_layout_problems(t, p, dp))
    return problems


def _batch_layout_problems(t: TrainConfig, p: ParallelConfig, dp: int) -> list[str]:
    """The global batch (and its ramp-up) in whole micro-batches per dp rank, in groups of pp when interleaved."""
    problems = _Problems()
    if p.pp >= 1 and p.vpp > 1:
        unit = t.micro_batch_size * dp * p.pp
        batches = [t.global_batch_size] + (list(t.batch_rampup[:2]) if t.batch_rampup else [])
        problems.check(
            all(b % unit == 0 for b in batches),
            f"the interleaved schedule (parallel.vpp={p.vpp}) needs micro-batches per step in multiples of "
            f"parallel.pp={p.pp}: make train.global_batch_size (and batch_rampup start and increment) "
            f"multiples of micro_batch_size * dp * pp = {unit}",
        )
    problems.check(
        t.global_batch_size % (t.micro_batch_size * dp) == 0,
        f"train.global_batch_size={t.global_batch_size} is not divisible by micro_batch_size * dp = "
        f"{t.micro_batch_size} * {dp}; make it a multiple of {t.micro_batch_size * dp}",
    )
    if t.batch_rampup is not None:
        problems.extend(_rampup_problems(t.batch_rampup, t.global_batch_size, t.micro_batch_size * dp))
    return problems


def _device_problems(m: ModelConfig, t: TrainConfig) -> list[str]:
    """The CUDA-only features against the device the run will use (probed only when one is asked for)."""
    if m.attention_backend != "flex" and m.fused_kernels != "on":
        return []
    on_cuda = _runs_on_cuda(t)
    problems = _Problems()
    problems.check(
        m.fused_kernels != "on" or on_cuda,
        f"model.fused_kernels=on needs CUDA (the kernels are CUDA C++) but train.device={t.device} runs on "
        f"the CPU; use model.fused_kernels=auto or off",
    )
    problems.check(
        m.attention_backend != "flex" or on_cuda,
        f"model.attention_backend=flex trains only on CUDA (FlexAttention has no backward on CPU) but "
        f"train.device={t.device} runs on the CPU; set train.device=cuda or use attention_backend=auto",
    )
    return problems


def _runs_on_cuda(t: TrainConfig) -> bool:
    """Whether the run will use CUDA (probed only for the checks that need to know)."""
    import torch  # only here: the rest of validation needs no torch

    return t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())


def _profile_problems(lg: LoggingConfig, t: TrainConfig, world_size: int) -> list[str]:
    """The profiled window against the run's length, its ranks against the world, the snapshot against the device."""
    problems = _Problems()
    if lg.profile is not None and not _user_error(profile_steps, lg):
        end = profile_steps(lg)[1]
        problems.check(
            end <= t.iters,
            f"logging.profile={lg.profile!r} ends at step {end}, after the last step train.iters={t.iters}; "
            f"profile steps the run takes",
        )
    if lg.profile_ranks != "all":
        outside = sorted(r for r in set(lg.profile_ranks) if not 0 <= r < world_size)
        problems.check(
            not outside,
            f"logging.profile_ranks names ranks {outside} outside the world of {world_size} (ranks 0 to "
            f"{world_size - 1})",
        )
    if lg.memory_snapshot:
        problems.check(
            _runs_on_cuda(t),
            f"logging.memory_snapshot records the CUDA allocator, but train.device={t.device} runs on the CPU; "
            f"turn it off or train on a GPU",
        )
    return problems


def max_positions(model: ModelConfig) -> int:
    return model.max_position_embeddings if model.max_position_embeddings is not None else model.seq_length


def padded_vocab_size(model: ModelConfig, tp: int = 1) -> int:
    """Embedding rows: vocab_size rounded up to a multiple of make_vocab_size_divisible_by * tp (Megatron's rule)."""
    multiple = model.make_vocab_size_divisible_by * tp
    return int(math.ceil(model.vocab_size / multiple) * multiple)


def _user_error(parse, value, *args) -> list[str]:
    """[] when parse(value, *args) succeeds, else its one-sentence message (without the final period)."""
    try:
        parse(value, *args)
    except UserError as e:
        return [str(e).rstrip(".")]
    return []


def _rampup_problems(rampup: list[int], global_batch: int, unit: int) -> list[str]:
    if len(rampup) != 3:
        return [f"train.batch_rampup={rampup} must be [start, increment, samples]"]
    start, increment, samples = rampup
    problems = []
    if not (1 <= start <= global_batch) or increment < 1 or samples < 0:
        problems.append(
            f"train.batch_rampup={rampup} needs 1 <= start <= global_batch_size={global_batch}, increment >= 1 "
            f"and samples >= 0"
        )
    elif (global_batch - start) % increment != 0:
        problems.append(
            f"train.batch_rampup: global_batch_size - start = {global_batch - start} is not a multiple of "
            f"increment {increment}"
        )
    if start % unit != 0 or increment % unit != 0:
        problems.append(
            f"train.batch_rampup start {start} and increment {increment} must be multiples of "
            f"micro_batch_size * dp = {unit}"
        )
    return problems
