"""Facts about a model that follow from its config, each derived in one place: which attention each layer uses,
how many parameters the model (or one tensor-parallel rank's layer) has, and the torch dtype of a precision.

The model (gpt.py), the planner (estimate.py) and the Hugging Face mapping (hf.py) all read them from here, so
they cannot drift apart. This module imports only the config's dataclasses and helpers, never the layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megagpt.config import ModelConfig, max_positions

# train.precision -> the dtype the model computes in.
COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def compute_dtype(precision: str) -> torch.dtype:
    return COMPUTE_DTYPES[precision]


def layer_kind(pattern: Sequence[str], layer: int) -> str:
    """Layer `layer`'s attention kind: the pattern cycled over the layers ([dense, local] -> dense, local, ...),
    the convention of Hugging Face GPT-Neo's attention_types."""
    return pattern[layer % len(pattern)]


def cycle_pattern(pattern: Sequence[str], num_layers: int) -> list[str]:
    """The attention kind of each of num_layers layers."""
    return [layer_kind(pattern, layer) for layer in range(num_layers)]


def layer_kinds(model: ModelConfig) -> list[str]:
    """Per layer, "dense" or "local"."""
    return cycle_pattern(model.attention_pattern, model.num_layers)


def layer_window(model: ModelConfig, layer: int) -> int | None:
    """None for a dense layer, the band width (model.local_window) for a local one."""
    return model.local_window if layer_kind(model.attention_pattern, layer) == "local" else None


def layer_parameters(model: ModelConfig, tp: int = 1) -> int:
    """One transformer layer's parameters on one tensor-parallel rank (tp=1: the whole layer)."""
    h = model.hidden_size
    qkv = 3 * h * h // tp + (3 * h // tp if model.qkv_bias else 0)
    proj = h * h // tp + h  # row-parallel: the bias is whole on every rank
    fc = 4 * h * h // tp + 4 * h // tp
    fc2 = 4 * h * h // tp + h
    return qkv + proj + fc + fc2 + 4 * h  # + two LayerNorms


def num_parameters(model: ModelConfig, vocab_rows: int | None = None) -> int:
    """Parameters of the whole model (all tp ranks together, the tied embedding once); vocab_rows defaults to the
    real vocabulary (pass padded_vocab_size(model, tp) for the rows megagpt builds)."""
    h = model.hidden_size
    vocab_rows = model.vocab_size if vocab_rows is None else vocab_rows
    embeddings = vocab_rows * h + max_positions(model) * h
    return embeddings + model.num_layers * layer_parameters(model) + 2 * h  # + the final LayerNorm
