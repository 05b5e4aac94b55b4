"""Attention backends on CUDA against the float64 reference (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from megagpt.model.attention import causal_attention, pick_backend
from tests.unit.test_attention import reference_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TOLERANCE = {torch.float32: 2e-3, torch.bfloat16: 3e-2, torch.float16: 5e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["sdpa", "blocked", "flex", "fused_softmax"])
@pytest.mark.parametrize("window", [None, 1, 7, 64, 256])
@pytest.mark.parametrize("seq_len", [256, 300])
def test_backend_matches_float64_reference_on_cuda(dtype, backend, window, seq_len):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(2, 4, seq_len, 64, generator=g, device="cuda", dtype=dtype).requires_grad_() for _ in range(3)
    )
    out = causal_attention(q, k, v, window=window, backend=backend)
    ref = reference_attention(q, k, v, window)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v), grad.to(dtype))
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_.double(), w_.double(), rtol=tol, atol=tol)


def test_auto_picks_flex_for_local_layers_on_cuda_unless_dropout():
    q, k, v = (torch.randn(1, 2, 256, 64, device="cuda", requires_grad=True) for _ in range(3))
    assert pick_backend(q, k, v, window=64, dropout_p=0.0) == "flex"
    assert pick_backend(q, k, v, window=64, dropout_p=0.1) == "blocked"
    assert pick_backend(q, k, v, window=None, dropout_p=0.0) == "sdpa"
