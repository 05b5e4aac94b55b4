"""Scaled masked softmax: softmax(scale * scores) over the last dim with masked positions excluded.

Megatron's attention path (scores matmul, this softmax, dropout, matmul), with the causal band of local layers
honoured. On CUDA it runs megagpt's fused kernel (csrc/softmax.cu) when model.fused_kernels allows; elsewhere, and
as the fallback, the torch implementation below, which every device runs.
"""

from __future__ import annotations

import torch

from megagpt.kernels.cuda import choose, cuda_kernels, dtype_unsupported

MAX_FUSED_ROW = 16384  # csrc/kernels.h kMaxSoftmaxRow


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
    fused: str = "auto",
) -> torch.Tensor:
    """scores: (..., sq, sk). causal: mask keys after each query; window: also mask keys window or more positions
    before it (needs causal); mask: bool, True where masked, of shape (b, 1 or heads, sq, sk) for scores
    (b, heads, sq, sk) (the torch path broadcasts any shape). The softmax runs in fp32 and the result has the
    input's dtype; a row with every key masked gives zeros, not NaN. fused: model.fused_kernels (kernels/cuda.py)."""
    if window is not None and not causal:
        raise ValueError("scaled_masked_softmax: a window is a causal band, so it needs causal=True")
    if window is not None and window < 1:
        raise ValueError(f"scaled_masked_softmax: window={window} must be at least 1")
    if choose("scaled_masked_softmax", scores, fused, _unsupported(scores, mask)) == "cuda":
        return _FusedSoftmax.apply(scores, scale, causal, window or 0, mask)
    return torch_scaled_masked_softmax(scores, scale, causal=causal, window=window, mask=mask)


def torch_scaled_masked_softmax(scores, scale, *, causal=False, window=None, mask=None) -> torch.Tensor:
    """The plain torch implementation of scaled_masked_softmax."""
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


def _unsupported(scores: torch.Tensor, mask: torch.Tensor | None) -> str | None:
    """Why the fused kernel cannot take this call, or None."""
    if scores.dim() < 2 or 0 in scores.shape[-2:]:
        return "scores need at least 2 dims and a query and a key"
    if scores.shape[-1] > MAX_FUSED_ROW:
        return f"rows of {scores.shape[-1]} keys; the kernel takes at most {MAX_FUSED_ROW}"
    if mask is not None:
        if mask.device != scores.device:
            return f"a mask on {mask.device} for scores on {scores.device}"
        if mask.dtype != torch.bool or scores.dim() != 4 or mask.dim() != 4:
            return "the kernel takes a bool mask (b, 1 or heads, sq, sk) for scores (b, heads, sq, sk)"
        b, heads, sq, sk = scores.shape
        if mask.shape[0] != b or mask.shape[1] not in (1, heads) or mask.shape[2:] != (sq, sk):
            return f"a mask of shape {tuple(mask.shape)} for scores {tuple(scores.shape)}"
    return dtype_unsupported(scores)


class _FusedSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, scale, causal, window, mask):
        scores = scores.contiguous()
        probs = torch.empty_like(scores)
        cuda_kernels().softmax_forward(
            scores, probs, scale, causal, window, mask.contiguous() if mask is not None else None
        )
        ctx.save_for_backward(probs)
        ctx.scale = scale
        return probs

    @staticmethod
    def backward(ctx, grad_probs):
        (probs,) = ctx.saved_tensors
        grad_scores = torch.empty_like(probs)
        cuda_kernels().softmax_backward(grad_probs.contiguous(), probs, grad_scores, ctx.scale)
        return grad_scores, None, None, None, None
