"""Named presets: the GPT-3 paper's eight sizes (Brown et al. 2020, Table 2.1) and the tiny CPU sizes.

A YAML config names one with `preset: gpt3-1.3b`; its sections then override the preset's values. Presets are
plain data below config.py (which resolves them): this module imports nothing of megagpt but leaf modules.

The paper's schedule, as the presets encode it:
  - context 2048, Adam betas (0.9, 0.95), eps 1e-8, weight decay 0.1, gradient clipping at 1.0;
  - 300B training tokens; linear warm-up over the first 375M tokens; cosine decay to 10% of the peak
    learning rate over 260B tokens;
  - batch size ramped up linearly from 32k tokens (16 sequences) to the full batch over the first few
    billion tokens. The paper says "4-12 billion tokens, depending on the model size" without a table;
    we use 4B up to 1.3B, 8B for 2.7B to 13B and 12B for 175B (Megatron-LM's 175B example uses 12B too).
Iteration counts are planned through the ramp-up (megagpt/batch_rampup.py): train.iters is the step at which
300B tokens have been consumed, warmup_iters the step at 375M tokens, decay_iters the step at 260B tokens.

Two of the table's rows contradict themselves, and we follow the reading that matches the stated size:
  - 13B uses d_model 5120, not 5140: 40 heads do not divide 5140 (a typo), and 5120 gives 13B parameters.
  - XL 1.3B lists 24 heads of d_head 128, which is 3072, not its d_model 2048. We keep d_model 2048 (it sets
    the parameter count) and d_head 128, so 16 heads, as Megatron-LM's 1.3B recipe does.
"""

from __future__ import annotations

from megagpt.batch_rampup import steps_to_consume
from megagpt.errors import ConfigError

SEQ = 2048
TRAIN_TOKENS = 300e9
WARMUP_TOKENS = 375e6
DECAY_TOKENS = 260e9
RAMPUP_START = 16  # sequences: 32k tokens

# name: (paper parameter count, layers, d_model, heads, batch in sequences, peak lr, ramp-up tokens)
GPT3_SIZES: dict[str, tuple[float, int, int, int, int, float, float]] = {
    "gpt3-125m": (125e6, 12, 768, 12, 256, 6.0e-4, 4e9),
    "gpt3-350m": (350e6, 24, 1024, 16, 256, 3.0e-4, 4e9),
    "gpt3-760m": (760e6, 24, 1536, 16, 256, 2.5e-4, 4e9),
    "gpt3-1.3b": (1.3e9, 24, 2048, 16, 512, 2.0e-4, 4e9),
    "gpt3-2.7b": (2.7e9, 32, 2560, 32, 512, 1.6e-4, 8e9),
    "gpt3-6.7b": (6.7e9, 32, 4096, 32, 1024, 1.2e-4, 8e9),
    "gpt3-13b": (13.0e9, 40, 5120, 40, 1024, 1.0e-4, 8e9),
    "gpt3-175b": (175.0e9, 96, 12288, 96, 1536, 0.6e-4, 12e9),
}


def _gpt3_preset(layers: int, hidden: int, heads: int, batch: int, lr: float, rampup_tokens: float) -> dict:
    rampup = [RAMPUP_START, RAMPUP_START, round(rampup_tokens / SEQ)]

    def steps_for(tokens: float) -> int:
        return steps_to_consume(tokens / SEQ, batch, rampup)

    return {
        "model": {
            "num_layers": layers,
            "hidden_size": hidden,
            "num_heads": heads,
            "seq_length": SEQ,
            "vocab_size": 50257,
            "attention_pattern": ["dense", "local"],
            "local_window": 256,
            "dropout": 0.1,
            # No q/k/v biases, as GPT-Neo (EleutherAI's open GPT-3 replica): Hugging Face's model for local layers
            # cannot represent a query bias, and without it every preset exports (a deliberate departure from
            # GPT-2's biased projections).
            "qkv_bias": False,
        },
        "train": {
            "iters": steps_for(TRAIN_TOKENS),
            "global_batch_size": batch,
            "micro_batch_size": 1,
            "batch_rampup": rampup,
            "precision": "bf16",
            "eval_interval": 1000,
            "eval_iters": 10,
        },
        "optim": {
            "lr": lr,
            "min_lr": lr / 10,
            "warmup_iters": steps_for(WARMUP_TOKENS),
            "decay_iters": steps_for(DECAY_TOKENS),
            "weight_decay": 0.1,
            "clip_grad": 1.0,
            "beta1": 0.9,
            "beta2": 0.95,
            "eps": 1e-8,
        },
    }


PRESETS: dict[str, dict] = {name: _gpt3_preset(*size[1:]) for name, size in GPT3_SIZES.items()}

# Tiny models for CPU tests and the demo. Real GPT-2 vocabulary, GPT-3's dense/local alternation.
PRESETS["tiny-cpu"] = {
    "model": {
        "num_layers": 4,
        "hidden_size": 64,
        "num_heads": 4,
        "seq_length": 64,
        "attention_pattern": ["dense", "local"],
        "local_window": 16,
        "dropout": 0.0,
    },
    "train": {
        "iters": 20,
        "global_batch_size": 8,
        "micro_batch_size": 2,
        "eval_interval": 10,
        "eval_iters": 1,
        "precision": "fp32",
        "device": "cpu",
    },
    "optim": {"lr": 1e-3, "min_lr": 1e-4, "warmup_iters": 2},
    "data": {"synthetic": True},
    "logging": {"log_interval": 1},
}
PRESETS["demo-cpu"] = {
    "model": {
        "num_layers": 4,
        "hidden_size": 128,
        "num_heads": 4,
        "seq_length": 128,
        "attention_pattern": ["dense", "local"],
        "local_window": 32,
        "dropout": 0.0,
    },
    "train": {
        "iters": 200,
        "global_batch_size": 16,
        "micro_batch_size": 4,
        "eval_interval": 50,
        "eval_iters": 4,
        "precision": "fp32",
        "device": "cpu",
    },
    "optim": {"lr": 2e-3, "min_lr": 2e-4, "warmup_iters": 30, "weight_decay": 0.1},
    "data": {"split": "95,5,0"},
    "logging": {"log_interval": 25},
}


def preset_sections(name: str) -> dict:
    """The section dicts of a preset (copies, so callers may change them)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}'; allowed: {', '.join(PRESETS)}")
    return {section: dict(values) for section, values in PRESETS[name].items()}
