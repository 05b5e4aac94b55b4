"""Scaled masked softmax: softmax(scale * scores) over the last dim with masked positions excluded."""

from __future__ import annotations

import torch


def causal_band_mask(sq: int, sk: int, window: int | None, device: torch.device) -> torch.Tensor:
    """(sq, sk) bool, True where masked. Queries are the last sq of sk positions (so sq == sk is the usual
    square case): query i sits at key position i + sk - sq and sees keys j <= that position, and with a window
    only the `window` most recent of them."""
    i = torch.arange(sq, device=device).unsqueeze(1) + (sk - sq)
    j = torch.arange(sk, device=device).unsqueeze(0)
    visible = j <= i
    if window is not None:
        visible &= j > i - window
    return ~visible


def scaled_masked_softmax(
    scores: torch.Tensor,
    scale: float,
    *,
    causal: bool = False,
    window: int | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """scores: (..., sq, sk). causal: mask keys after each query; window: also mask keys window or more positions
    before it (needs causal); mask: bool, broadcastable to scores, True where masked. The softmax runs in fp32 and
    the result has the input's dtype; a row with every key masked gives zeros, not NaN."""
    if window is not None and not causal:
        raise ValueError("scaled_masked_softmax: a window is a causal band, so it needs causal=True")
    masked = mask
    if causal:
        band = causal_band_mask(scores.shape[-2], scores.shape[-1], window, scores.device)
        masked = band if masked is None else masked | band
    x = scores.float() * scale
    if masked is None:
        return torch.softmax(x, dim=-1).to(scores.dtype)
    probs = torch.softmax(x.masked_fill(masked, float("-inf")), dim=-1)
    # A fully masked row is all -inf, whose softmax is NaN; give it zeros (it attends to nothing).
    return probs.masked_fill(masked, 0.0).to(scores.dtype)
