"""Fused kernels with plain-torch fallbacks.

`scaled_masked_softmax` is the softmax of Megatron's attention path: scale, mask (causal, a causal band, or a
boolean mask) and softmax in one call, in fp32 whatever the input dtype. This is its torch implementation, which
every device can run.
"""

from megagpt.kernels.softmax import scaled_masked_softmax

__all__ = ["scaled_masked_softmax"]
