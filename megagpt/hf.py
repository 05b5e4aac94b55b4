"""Hugging Face transformers <-> megagpt, tensor by tensor, with every difference between the models mapped exactly.

    megagpt                      GPT2LMHeadModel (all layers dense)       GPTNeoForCausalLM (dense and local layers)
    wte.weight (padded rows)     transformer.wte.weight (real vocab)      transformer.wte.weight
    wpe.weight                   transformer.wpe.weight                   transformer.wpe.weight
    blocks.L.ln_1 / ln_2         transformer.h.L.ln_1 / ln_2              transformer.h.L.ln_1 / ln_2
    blocks.L.attn.qkv            transformer.h.L.attn.c_attn              transformer.h.L.attn.attention.{q,k,v}_proj
    blocks.L.attn.proj           transformer.h.L.attn.c_proj              transformer.h.L.attn.attention.out_proj
    blocks.L.mlp.fc / proj       transformer.h.L.mlp.c_fc / c_proj        transformer.h.L.mlp.c_fc / c_proj
    ln_f                         transformer.ln_f                         transformer.ln_f
    (output layer: tied to wte in all three)

What differs, and how it is mapped:
- q/k/v layout: megagpt's fused projection is laid out per head, [q | k | v] for head 0, then head 1, ...
  (Megatron's, so a tensor-parallel slice holds whole heads); GPT-2's c_attn is [all q | all k | all v].
- GPT-2's Conv1D stores weights as (in, out), the transpose of nn.Linear's (out, in); GPT-Neo uses nn.Linear.
- GPT-Neo does not scale attention scores by 1/sqrt(head_dim): the factor is folded into its q_proj (and back out).
- GPT-Neo has no q/k/v biases. A key bias adds q . b_k to all of a query's scores, which softmax ignores: dropped
  exactly. A value bias adds b_v to every attention output (probabilities sum to 1): folded into out_proj's bias
  as W_o b_v. A query bias changes the scores and cannot be represented: refused (train with model.qkv_bias=false).
- megagpt pads the vocabulary (model.make_vocab_size_divisible_by); the padding rows are trimmed, and added back
  as zeros on the way in.
- Local layers: GPT-Neo's attention_types of "global" / "local" layers and its window_size are megagpt's
  attention_pattern of dense / local and local_window; both let token i see keys j with i - window < j <= i.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from megagpt.config import padded_vocab_size
from megagpt.errors import UserError
from megagpt.model.facts import cycle_pattern

GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")  # the tanh-approximated GELU megagpt's MLP uses
SUPPORTED = ("gpt2", "gpt_neo")
GPT2_VOCAB, GPT2_EOT = 50257, 50256


class ConversionError(UserError):
    """A model or checkpoint that cannot be converted exactly, or a missing file."""


# ----------------------------------------------------------------------------------------------------------------
# megagpt -> Hugging Face


def per_head_to_blocks(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megagpt's (3h, ...) per-head [q|k|v] rows -> the (h, ...) rows of all heads' q, of k, of v."""
    rest = qkv.shape[1:]
    per_head = qkv.reshape(heads, 3, qkv.shape[0] // (3 * heads), *rest)  # (heads, 3, d, ...)
    return tuple(per_head[:, i].reshape(-1, *rest) for i in range(3))


def blocks_to_per_head(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    rest = q.shape[1:]
    stacked = torch.stack([t.reshape(heads, -1, *rest) for t in (q, k, v)], dim=1)  # (heads, 3, d, ...)
    return stacked.reshape(-1, *rest)


def has_local_layers(model_cfg: dict) -> bool:
    return "local" in model_cfg["attention_pattern"] and model_cfg["local_window"] < max_position_count(model_cfg)


def max_position_count(model_cfg: dict) -> int:
    return model_cfg.get("max_position_embeddings") or model_cfg["seq_length"]


def layer_kinds(model_cfg: dict) -> list[str]:
    return cycle_pattern(model_cfg["attention_pattern"], model_cfg["num_layers"])


def to_hf(tensors: dict[str, torch.Tensor], model_cfg: dict) -> tuple[object, dict[str, torch.Tensor]]:
    """(transformers config, state dict) for megagpt's full tensors {name: tensor} and its model config."""
    local = has_local_layers(model_cfg)
    state = {
        "transformer.wte.weight": tensors["wte.weight"][: model_cfg["vocab_size"]],
        "transformer.wpe.weight": tensors["wpe.weight"],
        "transformer.ln_f.weight": tensors["ln_f.weight"],
        "transformer.ln_f.bias": tensors["ln_f.bias"],
    }
    for layer in range(model_cfg["num_layers"]):
        ours, theirs = f"blocks.{layer}.", f"transformer.h.{layer}."
        for name in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias"):
            state[theirs + name] = tensors[ours + name]
        layer_tensors = {name[len(ours) :]: t for name, t in tensors.items() if name.startswith(ours)}
        to_layer = _gpt_neo_layer if local else _gpt2_layer
        state.update({theirs + name: t for name, t in to_layer(layer_tensors, model_cfg, layer).items()})
    config = _gpt_neo_config(model_cfg) if local else _gpt2_config(model_cfg)
    return config, {name: t.contiguous() for name, t in state.items()}


def _gpt2_layer(ours: dict[str, torch.Tensor], model_cfg: dict, layer: int) -> dict[str, torch.Tensor]:
    """One layer's attention and MLP tensors in GPT-2's names; Conv1D weights are (in, out)."""
    heads = model_cfg["num_heads"]
    qkv_w, qkv_b = ours["attn.qkv.weight"], ours.get("attn.qkv.bias")
    q, k, v = per_head_to_blocks(qkv_w, heads)
    if qkv_b is not None:
        c_attn_bias = torch.cat(per_head_to_blocks(qkv_b, heads))
    else:
        c_attn_bias = qkv_w.new_zeros(3 * model_cfg["hidden_size"])
    return {
        "attn.c_attn.weight": torch.cat([q, k, v]).t(),
        "attn.c_attn.bias": c_attn_bias,
        "attn.c_proj.weight": ours["attn.proj.weight"].t(),
        "attn.c_proj.bias": ours["attn.proj.bias"],
        "mlp.c_fc.weight": ours["mlp.fc.weight"].t(),
        "mlp.c_fc.bias": ours["mlp.fc.bias"],
        "mlp.c_proj.weight": ours["mlp.proj.weight"].t(),
        "mlp.c_proj.bias": ours["mlp.proj.bias"],
    }


def _gpt_neo_layer(ours: dict[str, torch.Tensor], model_cfg: dict, layer: int) -> dict[str, torch.Tensor]:
    """One layer's attention and MLP tensors in GPT-Neo's names: separate q/k/v, the score scale folded into q, a
    value bias folded into out_proj's bias, a query bias refused."""
    heads, h = model_cfg["num_heads"], model_cfg["hidden_size"]
    qkv_b = ours.get("attn.qkv.bias")
    proj_w, proj_b = ours["attn.proj.weight"], ours["attn.proj.bias"]
    q, k, v = per_head_to_blocks(ours["attn.qkv.weight"], heads)
    scale = 1.0 / math.sqrt(h // heads)  # GPT-Neo does not scale the scores: fold the factor into q
    bias = proj_b
    if qkv_b is not None:
        q_bias, _, v_bias = per_head_to_blocks(qkv_b, heads)  # the key bias drops out of the softmax
        if torch.count_nonzero(q_bias):
            raise ConversionError(
                f"layer {layer} has a non-zero query bias, which GPT-Neo (the Hugging Face model for local "
                f"attention layers) cannot represent; train such models with model.qkv_bias=false"
            )
        bias = proj_b + proj_w.float().mv(v_bias.float()).to(proj_b.dtype)  # W_o (o + b_v) + b_o
    return {
        "attn.attention.q_proj.weight": q * scale,
        "attn.attention.k_proj.weight": k,
        "attn.attention.v_proj.weight": v,
        "attn.attention.out_proj.weight": proj_w,
        "attn.attention.out_proj.bias": bias,
        "mlp.c_fc.weight": ours["mlp.fc.weight"],
        "mlp.c_fc.bias": ours["mlp.fc.bias"],
        "mlp.c_proj.weight": ours["mlp.proj.weight"],
        "mlp.c_proj.bias": ours["mlp.proj.bias"],
    }


def _common_hf_config(model_cfg: dict) -> dict:
    vocab = model_cfg["vocab_size"]
    eos = GPT2_EOT if vocab == GPT2_VOCAB else None  # GPT-2's end-of-text, only with its vocabulary
    return dict(vocab_size=vocab, bos_token_id=eos, eos_token_id=eos, tie_word_embeddings=True)


def _gpt2_config(model_cfg: dict):
    import transformers

    dropout = model_cfg["dropout"]
    return transformers.GPT2Config(
        n_embd=model_cfg["hidden_size"], n_layer=model_cfg["num_layers"], n_head=model_cfg["num_heads"],
        n_positions=max_position_count(model_cfg), n_inner=None, activation_function="gelu_new",
        layer_norm_epsilon=model_cfg["layernorm_epsilon"], resid_pdrop=dropout, embd_pdrop=dropout,
        attn_pdrop=dropout, **_common_hf_config(model_cfg),
    )  # fmt: skip


def _gpt_neo_config(model_cfg: dict):
    import transformers

    dropout = model_cfg["dropout"]
    kinds = ["local" if kind == "local" else "global" for kind in layer_kinds(model_cfg)]
    pattern = ["local" if kind == "local" else "global" for kind in model_cfg["attention_pattern"]]
    if model_cfg["num_layers"] % len(pattern) == 0:
        attention_types = [[pattern, model_cfg["num_layers"] // len(pattern)]]
    else:
        attention_types = [[kinds, 1]]
    return transformers.GPTNeoConfig(
        hidden_size=model_cfg["hidden_size"], num_layers=model_cfg["num_layers"], num_heads=model_cfg["num_heads"],
        attention_types=attention_types, window_size=model_cfg["local_window"],
        max_position_embeddings=max_position_count(model_cfg), intermediate_size=None,
        activation_function="gelu_new", layer_norm_epsilon=model_cfg["layernorm_epsilon"], embed_dropout=dropout,
        attention_dropout=dropout, resid_dropout=dropout, **_common_hf_config(model_cfg),
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face -> megagpt


def read_hf_folder(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json as a dict, the state dict) of a transformers model folder (safetensors or pytorch_model.bin)."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise ConversionError(f"{config_path} is missing: --hf must be a Hugging Face model folder")
    try:
        config = json.loads(config_path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{config_path} is not a JSON file ({e}); the model folder is damaged") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{config_path} holds a {type(config).__name__}, not a JSON object")
    if config.get("model_type") not in SUPPORTED:
        raise ConversionError(
            f"model_type {config.get('model_type')!r} in {config_path} is not supported: megagpt converts "
            f"{' and '.join(SUPPORTED)} models"
        )
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not weights:
        raise ConversionError(f"{folder} has no model.safetensors (or pytorch_model.bin) weights")
    state = {}
    for path in weights:
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state.update(load_file(str(path)))
            else:
                state.update(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as e:  # safetensors and torch raise their own types for a damaged file
            raise ConversionError(f"cannot read the weights file {path}: {e}") from None
    # OpenAI's GPT-2 checkpoints (gpt2, gpt2-medium, ...) name the base model's tensors without its prefix.
    if not any(name.startswith("transformer.") for name in state):
        state = {name if name.startswith("lm_head.") else f"transformer.{name}": t for name, t in state.items()}
    return config, state


def from_hf(hf_config: dict, state: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """(megagpt model config section, full tensors {name: tensor}) of a GPT-2 or GPT-Neo model."""
    kind = hf_config.get("model_type")
    if kind == "gpt2":
        return _from_gpt2(hf_config, state)
    if kind == "gpt_neo":
        return _from_gpt_neo(hf_config, state)
    raise ConversionError(f"model_type {kind!r} is not supported: megagpt converts gpt2 and gpt_neo models")


def _take(state: dict, name: str) -> torch.Tensor:
    if name not in state:
        raise ConversionError(f"the Hugging Face weights have no {name}")
    return state[name].float()


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConversionError(message)


def _check_shapes(state: dict, model_cfg: dict, layer_shapes: dict[str, tuple]) -> None:
    """Every tensor the conversion reads, present and of the shape the config says (else a sentence naming it,
    not an unpacking error deep inside the conversion). layer_shapes: per-layer names under transformer.h.N."""
    h, vocab, positions = model_cfg["hidden_size"], model_cfg["vocab_size"], model_cfg["max_position_embeddings"]
    expected = {
        "transformer.wte.weight": (vocab, h),
        "transformer.wpe.weight": (positions, h),
        "transformer.ln_f.weight": (h,),
        "transformer.ln_f.bias": (h,),
    }
    for layer in range(model_cfg["num_layers"]):
        for name in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias"):
            expected[f"transformer.h.{layer}.{name}"] = (h,)
        expected.update({f"transformer.h.{layer}.{name}": shape for name, shape in layer_shapes.items()})
    for name, shape in expected.items():
        _check(name in state, f"the Hugging Face weights have no {name}")
        actual = tuple(state[name].shape)
        _check(
            actual == shape,
            f"{name} has shape {list(actual)} but the Hugging Face config says {list(shape)} (hidden "
            f"{h}, vocabulary {vocab}, positions {positions}); the config.json does not belong to these weights",
        )


def _common_tensors(model_cfg: dict, state: dict) -> dict[str, torch.Tensor]:
    wte = _take(state, "transformer.wte.weight")
    rows = padded_vocab_size(_ModelDims(model_cfg))
    tensors = {
        "wte.weight": torch.cat([wte, wte.new_zeros(rows - wte.shape[0], wte.shape[1])]),
        "wpe.weight": _take(state, "transformer.wpe.weight"),
        "ln_f.weight": _take(state, "transformer.ln_f.weight"),
        "ln_f.bias": _take(state, "transformer.ln_f.bias"),
    }
    for layer in range(model_cfg["num_layers"]):
        for name in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias"):
            tensors[f"blocks.{layer}.{name}"] = _take(state, f"transformer.h.{layer}.{name}")
    return tensors


class _ModelDims:
    """What padded_vocab_size reads, from a model config dict."""

    def __init__(self, model_cfg: dict):
        self.vocab_size = model_cfg["vocab_size"]
        self.make_vocab_size_divisible_by = model_cfg.get("make_vocab_size_divisible_by", 128)


def _base_model_cfg(layers, hidden, heads, positions, vocab, eps, dropout, activation, inner) -> dict:
    _check(activation in GELU_TANH, f"activation {activation!r}: megagpt's MLP uses the tanh GELU (gelu_new)")
    _check(inner in (None, 4 * hidden), f"an MLP width of {inner}: megagpt's MLP is 4 x hidden ({4 * hidden})")
    return {
        "num_layers": layers, "hidden_size": hidden, "num_heads": heads, "seq_length": positions,
        "max_position_embeddings": positions, "vocab_size": vocab, "layernorm_epsilon": eps, "dropout": dropout,
    }  # fmt: skip


def _require_keys(c: dict, *keys: str) -> None:
    missing = [key for key in keys if key not in c]
    _check(not missing, f"the Hugging Face config has no {', '.join(missing)}")


def _from_gpt2(c: dict, state: dict) -> tuple[dict, dict]:
    _require_keys(c, "n_layer", "n_embd", "n_head", "n_positions", "vocab_size")
    _check(c.get("scale_attn_weights", True), "scale_attn_weights=false: megagpt always scales by 1/sqrt(head_dim)")
    _check(not c.get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx is not supported")
    _check(c.get("tie_word_embeddings", True), "untied output embeddings: megagpt ties the output layer to wte")
    model_cfg = _base_model_cfg(
        c["n_layer"], c["n_embd"], c["n_head"], c["n_positions"], c["vocab_size"], c.get("layer_norm_epsilon", 1e-5),
        c.get("resid_pdrop", 0.1), c.get("activation_function", "gelu_new"), c.get("n_inner"),
    )  # fmt: skip
    model_cfg.update(attention_pattern=["dense"], qkv_bias=True)
    heads, h = c["n_head"], c["n_embd"]
    _check(h % heads == 0, f"n_embd={h} is not divisible by n_head={heads}")
    _check_shapes(state, model_cfg, {  # Conv1D weights are (in, out)
        "attn.c_attn.weight": (h, 3 * h), "attn.c_attn.bias": (3 * h,), "attn.c_proj.weight": (h, h),
        "attn.c_proj.bias": (h,), "mlp.c_fc.weight": (h, 4 * h), "mlp.c_fc.bias": (4 * h,),
        "mlp.c_proj.weight": (4 * h, h), "mlp.c_proj.bias": (h,),
    })  # fmt: skip
    tensors = _common_tensors(model_cfg, state)
    for layer in range(c["n_layer"]):
        ours, theirs = f"blocks.{layer}.", f"transformer.h.{layer}."
        q, k, v = _take(state, theirs + "attn.c_attn.weight").t().split(h)
        tensors[ours + "attn.qkv.weight"] = blocks_to_per_head(q, k, v, heads)
        tensors[ours + "attn.qkv.bias"] = blocks_to_per_head(*_take(state, theirs + "attn.c_attn.bias").split(h), heads)
        tensors[ours + "attn.proj.weight"] = _take(state, theirs + "attn.c_proj.weight").t()
        tensors[ours + "attn.proj.bias"] = _take(state, theirs + "attn.c_proj.bias")
        tensors[ours + "mlp.fc.weight"] = _take(state, theirs + "mlp.c_fc.weight").t()
        tensors[ours + "mlp.fc.bias"] = _take(state, theirs + "mlp.c_fc.bias")
        tensors[ours + "mlp.proj.weight"] = _take(state, theirs + "mlp.c_proj.weight").t()
        tensors[ours + "mlp.proj.bias"] = _take(state, theirs + "mlp.c_proj.bias")
    return model_cfg, tensors


def _from_gpt_neo(c: dict, state: dict) -> tuple[dict, dict]:
    _require_keys(c, "num_layers", "hidden_size", "num_heads", "max_position_embeddings", "vocab_size",
                  "attention_types", "window_size")  # fmt: skip
    _check(c.get("tie_word_embeddings", True), "untied output embeddings: megagpt ties the output layer to wte")
    layers = c["num_layers"]
    kinds = [kind for pattern, repeat in c["attention_types"] for _ in range(repeat) for kind in pattern]
    _check(len(kinds) == layers, f"attention_types give {len(kinds)} layers, num_layers is {layers}")
    _check(set(kinds) <= {"global", "local"}, f"attention kinds {sorted(set(kinds))}: only global and local exist")
    model_cfg = _base_model_cfg(
        layers, c["hidden_size"], c["num_heads"], c["max_position_embeddings"], c["vocab_size"],
        c.get("layer_norm_epsilon", 1e-5), c.get("resid_dropout", 0.0), c.get("activation_function", "gelu_new"),
        c.get("intermediate_size"),
    )  # fmt: skip
    ours_kinds = ["local" if kind == "local" else "dense" for kind in kinds]
    model_cfg.update(attention_pattern=shortest_cycle(ours_kinds), local_window=c["window_size"], qkv_bias=False)
    heads, h = c["num_heads"], c["hidden_size"]
    _check(h % heads == 0, f"hidden_size={h} is not divisible by num_heads={heads}")
    _check_shapes(state, model_cfg, {  # Linear weights are (out, in)
        "attn.attention.q_proj.weight": (h, h), "attn.attention.k_proj.weight": (h, h),
        "attn.attention.v_proj.weight": (h, h), "attn.attention.out_proj.weight": (h, h),
        "attn.attention.out_proj.bias": (h,), "mlp.c_fc.weight": (4 * h, h), "mlp.c_fc.bias": (4 * h,),
        "mlp.c_proj.weight": (h, 4 * h), "mlp.c_proj.bias": (h,),
    })  # fmt: skip
    tensors = _common_tensors(model_cfg, state)
    unscale = math.sqrt(h // heads)  # megagpt divides the scores by sqrt(head_dim); GPT-Neo does not
    for layer in range(layers):
        ours, attention = f"blocks.{layer}.", f"transformer.h.{layer}.attn.attention."
        q = _take(state, attention + "q_proj.weight") * unscale
        k, v = _take(state, attention + "k_proj.weight"), _take(state, attention + "v_proj.weight")
        tensors[ours + "attn.qkv.weight"] = blocks_to_per_head(q, k, v, heads)
        tensors[ours + "attn.proj.weight"] = _take(state, attention + "out_proj.weight")
        tensors[ours + "attn.proj.bias"] = _take(state, attention + "out_proj.bias")
        mlp = f"transformer.h.{layer}.mlp."
        tensors[ours + "mlp.fc.weight"], tensors[ours + "mlp.fc.bias"] = (
            _take(state, mlp + "c_fc.weight"),
            _take(state, mlp + "c_fc.bias"),
        )
        tensors[ours + "mlp.proj.weight"] = _take(state, mlp + "c_proj.weight")
        tensors[ours + "mlp.proj.bias"] = _take(state, mlp + "c_proj.bias")
    return model_cfg, tensors


def shortest_cycle(kinds: list[str]) -> list[str]:
    """The shortest pattern whose cycle gives these layer kinds (megagpt's attention_pattern)."""
    for period in range(1, len(kinds) + 1):
        if all(kinds[i] == kinds[i % period] for i in range(len(kinds))):
            return kinds[:period]
    return kinds


# ----------------------------------------------------------------------------------------------------------------
# Whole folders: a megagpt checkpoint <-> a transformers model folder


def checkpoint_to_hf_folder(checkpoint: str | Path, out: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write the checkpoint (any layout) as a transformers model folder: config.json, model.safetensors,
    generation_config.json and, for GPT-2's vocabulary, the GPT-2 tokenizer files."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    from megagpt.checkpoint.format import METADATA
    from megagpt.checkpoint.paths import open_checkpoint

    saved = open_checkpoint(checkpoint)
    tensors = {name: saved.weight(name).float() for name in saved.names("weight")}  # fp32 main weights if kept
    config, state = to_hf(tensors, saved.meta.model)
    out = Path(out)
    taken = [name for name in ("config.json", "model.safetensors", METADATA, "latest") if (out / name).exists()]
    if taken:  # another model folder, or a training run's checkpoints: never overwrite them
        raise ConversionError(f"--out {out} already holds {', '.join(taken)}; write the model into a new folder")
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id).save_pretrained(out)
    save_file({name: t.to(dtype) for name, t in state.items()}, str(out / "model.safetensors"), {"format": "pt"})
    if saved.meta.model["vocab_size"] == GPT2_VOCAB:
        write_gpt2_tokenizer(out, max_position_count(saved.meta.model))
    return out


def write_gpt2_tokenizer(out: Path, max_length: int) -> None:
    """The GPT-2 tokenizer as transformers reads it: OpenAI's encoder.json and vocab.bpe (which megagpt tokenizes
    with too) under the names vocab.json and merges.txt."""
    from megagpt.data.tokenizer import gpt2_data_dir

    data = gpt2_data_dir()
    (out / "vocab.json").write_bytes((data / "encoder.json").read_bytes())
    (out / "merges.txt").write_bytes((data / "vocab.bpe").read_bytes())
    special = "<|endoftext|>"
    tokenizer_config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": max_length,
        "bos_token": special,
        "eos_token": special,
        "unk_token": special,
        "add_prefix_space": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1))
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": special, "eos_token": special, "unk_token": special}, indent=1)
    )


def hf_folder_to_checkpoint(
    hf_folder: str | Path, out: str | Path, tp: int = 1, pp: int = 1, vpp: int = 1, dp: int = 1, zero: int = 0
) -> Path:
    """Write a GPT-2 or GPT-Neo model folder as a megagpt checkpoint (step 0, weights only: Adam starts fresh) for
    the layout (tp, pp, vpp, dp, zero), plus out/config.yaml with its model section to train it with."""
    import shutil
    import tempfile

    import yaml

    from megagpt.checkpoint.format import CheckpointMetadata, TensorShard, layout_record
    from megagpt.checkpoint.offline import OfflineCheckpointWriter
    from megagpt.checkpoint.reshard import reshard_checkpoint
    from megagpt.config import config_from_dict, validate

    hf_config, state = read_hf_folder(hf_folder)
    model_section, tensors = from_hf(hf_config, state)
    cfg = config_from_dict({"model": model_section, "data": {"synthetic": True}, "train": {"device": "cpu"}})
    validate(cfg)
    metadata = CheckpointMetadata(
        step=0, consumed_samples=0, train_samples=None, adam_step=0.0, precision="fp32", seed=cfg.train.seed,
        model=cfg.to_dict()["model"], loss_scaler=None, layout=layout_record(1, 1, 1, 1, 0),
        converted_from={"path": str(Path(hf_folder).resolve()), "model_type": hf_config["model_type"]},
    )  # fmt: skip
    out = Path(out)
    one_process = (tp, pp, vpp, dp, zero) == (1, 1, 1, 1, 0)
    staging = out if one_process else Path(tempfile.mkdtemp(prefix="megagpt-convert-"))
    writer = OfflineCheckpointWriter(staging, 0)
    writer.add_rank(0, [TensorShard(name, tuple(t.shape), -1, 0, 1).piece("weight", t) for name, t in tensors.items()])
    folder = writer.finish(metadata)
    if not one_process:
        folder = reshard_checkpoint(folder, out, tp, pp, vpp, dp, zero)
        shutil.rmtree(staging, ignore_errors=True)
    layout = {"tp": tp, "pp": pp, "vpp": vpp, "zero": zero}
    (out / "config.yaml").write_text(yaml.safe_dump({"model": model_section, "parallel": layout}, sort_keys=False))
    return folder
