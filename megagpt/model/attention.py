"""Causal attention, dense or locally banded (GPT-3's sparse layers).

`causal_attention` is the one entry point the model calls. window=None is dense causal attention; window=w
lets query i see keys j with i - w < j <= i. This version computes the band with a boolean mask over the
full (s, s) score matrix, which is exact but O(s^2); block-sparse O(s * w) backends plug in behind the
same signature.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=16)
def band_mask(seq_len: int, window: int, device: torch.device) -> torch.Tensor:
    """(s, s) bool, True where query i may attend key j: i - window < j <= i."""
    i = torch.arange(seq_len, device=device).unsqueeze(1)
    j = torch.arange(seq_len, device=device).unsqueeze(0)
    return (j <= i) & (j > i - window)


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int | None = None, dropout_p: float = 0.0
) -> torch.Tensor:
    """q, k, v: (b, heads, s, head_dim) -> (b, heads, s, head_dim); scores scaled by 1/sqrt(head_dim)."""
    seq_len = q.shape[-2]
    if window is None or window >= seq_len:
        # A window as long as the sequence is the dense causal mask.
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    mask = band_mask(seq_len, window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
