"""Layer norm over the last dim: megagpt's CUDA kernel (csrc/layernorm.cu), apex's fused layer norm, or torch.

`LayerNorm` is a drop-in for torch.nn.LayerNorm (the same parameters, names and state dict) whose forward picks
its implementation per call, as model.fused_kernels says (kernels/cuda.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megagpt.kernels.cuda import _apex_layer_norm, choose, cuda_kernels, dtype_unsupported
from megagpt.parallel.weight_grads import layer_norm as split_layer_norm


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5, fused: str = "auto"
) -> torch.Tensor:
    """(..., hidden) normalized over hidden, times weight plus bias (both (hidden,))."""
    unsupported = (
        dtype_unsupported(x, weight, bias)
        or _device_mismatch(x, weight, bias)
        or ("an empty last dim" if x.dim() == 0 or x.shape[-1] == 0 else None)
    )
    choice = choose("layer_norm", x, fused, unsupported, apex=True)
    if choice == "cuda":
        return _FusedLayerNorm.apply(x, weight, bias, eps)
    if choice == "apex":
        return _apex_layer_norm()(x, weight, bias, weight.shape, eps)
    return F.layer_norm(x, weight.shape, weight, bias, eps)


class LayerNorm(nn.LayerNorm):
    """torch.nn.LayerNorm with an elementwise affine, computed by `layer_norm`."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, fused: str = "auto"):
        super().__init__(hidden_size, eps=eps)
        self.fused = fused

    # Zero-bubble schedules: normalization in B, the weight and bias gradients in W (parallel/weight_grads.py);
    # the split runs on torch ops whatever `fused` says, since the fused kernels compute all three gradients at once.
    split_backward = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.split_backward:
            return split_layer_norm(x, self.weight, self.bias, self.eps)
        return layer_norm(x, self.weight, self.bias, self.eps, self.fused)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fused={self.fused}"


def _device_mismatch(*tensors: torch.Tensor) -> str | None:
    devices = {t.device for t in tensors}
    return f"tensors on {sorted(map(str, devices))}" if len(devices) > 1 else None


class _FusedLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        x = x.contiguous()
        rows = x.numel() // x.shape[-1]
        y = torch.empty_like(x)
        mean = torch.empty(rows, device=x.device, dtype=torch.float32)
        rstd = torch.empty(rows, device=x.device, dtype=torch.float32)
        cuda_kernels().layer_norm_forward(x, weight.contiguous(), bias.contiguous(), y, mean, rstd, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, mean, rstd = ctx.saved_tensors
        grad_x = torch.empty_like(x)
        grad_weight = torch.zeros_like(weight)  # zeros: an empty input has no rows to sum
        grad_bias = torch.zeros_like(weight)
        if x.numel():
            cuda_kernels().layer_norm_backward(
                grad_y.contiguous(), x, weight.contiguous(), mean, rstd, grad_x, grad_weight, grad_bias
            )
        return grad_x, grad_weight, grad_bias, None
