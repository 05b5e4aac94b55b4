"""Fused kernels with plain-torch fallbacks.

    scaled_masked_softmax   scale, mask (causal, a causal band, or a boolean mask) and softmax in one call, fp32 math
    layer_norm, LayerNorm   layer norm with weight and bias

Each runs megagpt's CUDA kernels (csrc/, built on first use by build.py) on CUDA tensors, apex's fused layer norm
when the kernels cannot serve and apex imports, and plain torch otherwise; model.fused_kernels (auto, on, off)
sets the policy (cuda.py).
"""

from megagpt.kernels.cuda import FUSED_MODES, KernelUnavailableError, cuda_kernels
from megagpt.kernels.layernorm import LayerNorm, layer_norm
from megagpt.kernels.softmax import scaled_masked_softmax

__all__ = ["FUSED_MODES", "KernelUnavailableError", "LayerNorm", "cuda_kernels", "layer_norm", "scaled_masked_softmax"]
