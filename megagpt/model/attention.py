"""Causal attention, dense or locally banded (GPT-3's sparse layers), on every backend.

`causal_attention` is the one entry point the model calls. window=None is dense causal attention; window=w lets
query i see keys j with i - w < j <= i (a window as long as the sequence is dense). Backends:

    sdpa           torch's scaled_dot_product_attention (Flash on GPU): dense causal; a window becomes a band
                   mask over the full (s, s) scores, exact but O(s^2)
    blocked        the band block by block (blocked_attention.py): O(s * w) compute and memory; any device,
                   backward and dropout
    flex           FlexAttention with a sliding-window block mask, compiled on GPU; no dropout, and no backward
                   on CPU (there it serves inference only)
    fused_softmax  Megatron's path: scores matmul, megagpt.kernels.scaled_masked_softmax with the band honoured,
                   dropout, matmul; O(s^2)

"auto" picks sdpa for dense layers and, for local ones, flex on CUDA when it can serve the call (no dropout),
else blocked. A backend asked for by name that cannot serve the call raises AttentionBackendError saying why.

Generation's key/value cache (KVCache, cached_attention): new queries attend to the cached keys and values of the
positions before them, and the cache keeps only what a later query can see (a local layer's last `window`).
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megagpt.errors import UserError
from megagpt.kernels import scaled_masked_softmax
from megagpt.kernels.softmax import causal_band_mask
from megagpt.model.blocked_attention import banded_attention

BACKENDS = ("auto", "sdpa", "blocked", "flex", "fused_softmax")


class AttentionBackendError(UserError):
    """An attention backend was asked for a call it cannot serve."""


@dataclass
class KVCache:
    """One layer's keys and values of the positions seen so far, on this rank's heads; empty before the prompt."""

    keys: torch.Tensor | None = None  # (b, heads/tp, t, d)
    values: torch.Tensor | None = None


def cached_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, window: int | None
) -> torch.Tensor:
    """q, k, v: (b, heads, s, d) of s new positions, following the cached ones -> (b, heads, s, d). Extends the
    cache in place, keeping only the keys a later query can see (the last `window` for a local layer)."""
    if cache.keys is not None:
        k = torch.cat([cache.keys, k], dim=2)
        v = torch.cat([cache.values, v], dim=2)
    # The s new queries are the last s of the t cached positions; a local layer also masks keys beyond its band.
    visible = ~causal_band_mask(q.shape[2], k.shape[2], window, q.device)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
    keep = k.shape[2] if window is None else window
    cache.keys, cache.values = k[:, :, -keep:], v[:, :, -keep:]
    return y


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
    fused_kernels: str = "auto",
) -> torch.Tensor:
    """q, k, v: (b, heads, s, head_dim) -> (b, heads, s, head_dim); scores scaled by 1/sqrt(head_dim).
    fused_kernels (model.fused_kernels) is what the fused_softmax backend's softmax may use (megagpt/kernels)."""
    if window is not None and window < 1:
        raise ValueError(f"window={window} must be at least 1 (or None for dense attention)")
    if window is not None and window >= q.shape[-2]:
        window = None  # the band covers every earlier key: dense causal attention
    if backend == "auto":
        backend = pick_backend(q, k, v, window=window, dropout_p=dropout_p)
    else:
        reason = cannot_serve(backend, q, k, v, window=window, dropout_p=dropout_p)
        if reason:
            raise AttentionBackendError(f"attention backend '{backend}' cannot serve this call: {reason}")
    if backend == "fused_softmax":
        return _fused_softmax(q, k, v, window, dropout_p, fused_kernels)
    return _IMPLEMENTATIONS[backend](q, k, v, window, dropout_p)


def pick_backend(q, k, v, *, window: int | None, dropout_p: float) -> str:
    """What "auto" runs: sdpa for dense layers; for local ones flex where it can serve, else blocked."""
    if window is None:
        return "sdpa"
    if q.is_cuda and not cannot_serve("flex", q, k, v, window=window, dropout_p=dropout_p):
        return "flex"
    return "blocked"


def cannot_serve(backend: str, q, k, v, *, window: int | None, dropout_p: float) -> str | None:
    """Why `backend` cannot run this call, or None if it can."""
    if backend not in _IMPLEMENTATIONS:
        return f"unknown backend; choose one of {', '.join(BACKENDS)}"
    if backend == "flex":
        if _flex_module() is None:
            return "torch.nn.attention.flex_attention is missing (it needs torch 2.5 or newer)"
        if dropout_p > 0.0:
            return "FlexAttention has no attention dropout; set model.dropout=0 or use blocked"
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        if not q.is_cuda and needs_grad:
            return "FlexAttention has no backward on CPU; use blocked (or auto)"
    return None


# ----------------------------------------------------------------------------------------------------------------
# The backends. Each takes (q, k, v, window, dropout_p) with window None for dense causal attention.


def _sdpa(q, k, v, window, dropout_p):
    if window is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    visible = ~causal_band_mask(q.shape[-2], k.shape[-2], window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, dropout_p=dropout_p)


def _blocked(q, k, v, window, dropout_p):
    if window is None:  # dense layers have nothing to skip: the fused dense kernel is the right tool
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    return banded_attention(q, k, v, window, dropout_p)


def _fused_softmax(q, k, v, window, dropout_p, fused_kernels="auto"):
    scores = torch.matmul(q, k.transpose(-1, -2))  # (b, heads, s, s)
    probs = scaled_masked_softmax(scores, 1.0 / math.sqrt(q.shape[-1]), causal=True, window=window, fused=fused_kernels)
    probs = F.dropout(probs, p=dropout_p) if dropout_p > 0.0 else probs
    return torch.matmul(probs, v)


def _flex(q, k, v, window, dropout_p):
    flex = _flex_module()
    s = q.shape[-2]
    block_mask = _flex_block_mask(s, window, str(q.device))
    if q.is_cuda:
        with _recompile_budget(FLEX_RECOMPILE_LIMIT):
            return _compiled_flex()(q, k, v, block_mask=block_mask)
    # On CPU only inference gets here (cannot_serve), and flex refuses inputs that require grad even under
    # no_grad; eager flex also warns that it is unfused, which is all CPU has.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return flex.flex_attention(q.detach(), k.detach(), v.detach(), block_mask=block_mask)


_IMPLEMENTATIONS = {"sdpa": _sdpa, "blocked": _blocked, "flex": _flex, "fused_softmax": _fused_softmax}


@functools.cache
def _flex_module():
    try:
        import torch.nn.attention.flex_attention as flex
    except ImportError:
        return None
    return flex


# Compiled with static shapes, flex compiles once per (shape, dtype, window, grad mode): one model needs a few,
# but evaluation, generation's growing prompts and the tests' grids pass torch.compile's default of 8, after
# which torch silently runs flex unfused (slow, O(s^2) memory).
FLEX_RECOMPILE_LIMIT = 64


@contextlib.contextmanager
def _recompile_budget(limit: int):
    """Raise torch.compile's per-function recompile limit to at least `limit` while the block runs."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.6
    with config.patch(**{name: max(limit, getattr(config, name))}):
        yield


@functools.cache
def _compiled_flex():
    # FlexAttention is only fused (and only fast) when compiled.
    return torch.compile(_flex_module().flex_attention, dynamic=False)


@functools.lru_cache(maxsize=32)
def _flex_block_mask(seq_len: int, window: int | None, device: str):
    def causal_band(batch, head, query, key):
        visible = key <= query
        if window is not None:
            visible = visible & (key > query - window)
        return visible

    return _flex_module().create_block_mask(causal_band, None, None, seq_len, seq_len, device=device)
