"""Every attention backend equals a float64 masked reference, forward and gradients (megagpt/model/attention.py)."""

from __future__ import annotations

import math

import pytest
import torch

from megagpt.kernels import scaled_masked_softmax
from megagpt.model.attention import AttentionBackendError, causal_attention, pick_backend
from megagpt.model.blocked_attention import banded_attention, default_block_size

TRAINABLE_ON_CPU = ["sdpa", "blocked", "fused_softmax", "auto"]


def reference_attention(q, k, v, window):
    """float64 masked softmax attention, written out longhand."""
    q, k, v = (t.double() for t in (q, k, v))
    s = q.shape[-2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    i = torch.arange(s, device=q.device).unsqueeze(1)  # on q's device: the CUDA tests share this reference
    j = torch.arange(s, device=q.device).unsqueeze(0)
    visible = j <= i
    if window is not None:
        visible &= j > i - window
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1) @ v


def random_qkv(seq_len, dtype=torch.float32, heads=3, head_dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, heads, seq_len, head_dim, generator=g, dtype=dtype).requires_grad_() for _ in range(3)]


def assert_matches_reference(out, q, k, v, window, rtol, atol):
    ref = reference_attention(q, k, v, window)
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v), grad.to(out.dtype))
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for name, g, w in zip("qkv", got, want):
        torch.testing.assert_close(
            g.double(), w.double(), rtol=rtol, atol=atol, msg=lambda m, name=name: f"d{name}: {m}"
        )


# 128 is a multiple of every block size used (16, 32, 64); 150 and 37 are multiples of none.
@pytest.mark.parametrize("backend", TRAINABLE_ON_CPU)
@pytest.mark.parametrize("window", [None, 1, 7, 64])
@pytest.mark.parametrize("seq_len", [128, 150])
def test_backend_matches_float64_reference(backend, window, seq_len):
    q, k, v = random_qkv(seq_len)
    out = causal_attention(q, k, v, window=window, backend=backend)
    assert out.shape == q.shape
    assert_matches_reference(out, q, k, v, window, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("backend", TRAINABLE_ON_CPU)
def test_local_attention_ignores_keys_outside_the_band(backend):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 8) for _ in range(3))
    out = causal_attention(q, k, v, window=4, backend=backend)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, :20] += 10.0  # query 39 sees keys 36..39 only; queries >= 23 never see keys < 20
    v2[:, :, :20] -= 3.0
    out2 = causal_attention(q, k2, v2, window=4, backend=backend)
    torch.testing.assert_close(out[:, :, 23:], out2[:, :, 23:])
    assert not torch.allclose(out[:, :, :20], out2[:, :, :20])


@pytest.mark.parametrize("window", [1, 7, 64])
@pytest.mark.parametrize("seq_len, block", [(128, 32), (150, 32), (37, 16), (150, 64), (20, 16)])
def test_blocked_is_exact_in_float64_for_any_block_size(window, seq_len, block):
    q, k, v = random_qkv(seq_len, dtype=torch.float64)
    out = banded_attention(q, k, v, window, block_size=block)
    assert_matches_reference(out, q, k, v, window, rtol=1e-10, atol=1e-10)


def test_blocked_in_bf16_stays_close_to_the_reference():
    q, k, v = random_qkv(150, dtype=torch.bfloat16)
    out = causal_attention(q, k, v, window=64, backend="blocked")
    assert out.dtype == torch.bfloat16
    assert_matches_reference(out, q, k, v, 64, rtol=3e-2, atol=3e-2)


def test_blocked_dropout_gradients_are_those_of_its_own_forward():
    """With a fixed generator state the dropout mask repeats, so gradcheck sees one function."""
    q, k, v = random_qkv(40, dtype=torch.float64, heads=2, head_dim=4)

    def attention(q, k, v):
        torch.manual_seed(3)
        return banded_attention(q, k, v, 7, dropout_p=0.3, block_size=16)

    assert torch.autograd.gradcheck(attention, (q, k, v))
    # Dropout really drops: the output is not the undropped one, and is the undropped one on average.
    undropped = banded_attention(q, k, v, 7)
    assert not torch.allclose(attention(q, k, v), undropped)
    with torch.no_grad():
        mean = torch.stack([banded_attention(q, k, v, 7, dropout_p=0.3) for _ in range(400)]).mean(0)
    assert (mean - undropped).abs().mean() < 0.05 * undropped.abs().mean()


@pytest.mark.parametrize("window", [None, 7, 64])
def test_flex_forward_matches_reference_on_cpu_without_gradients(window):
    q, k, v = random_qkv(150)
    with torch.no_grad():
        out = causal_attention(q, k, v, window=window, backend="flex")
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, window), rtol=2e-5, atol=2e-5)


def test_a_backend_that_cannot_serve_the_call_says_why():
    q, k, v = random_qkv(32)
    with pytest.raises(AttentionBackendError, match="flex.*no backward on CPU"):
        causal_attention(q, k, v, window=7, backend="flex")
    with torch.no_grad(), pytest.raises(AttentionBackendError, match="no attention dropout"):
        causal_attention(q, k, v, window=7, dropout_p=0.1, backend="flex")
    with pytest.raises(AttentionBackendError, match="unknown backend.*blocked"):
        causal_attention(q, k, v, window=7, backend="splash")


def test_auto_picks_sdpa_for_dense_and_blocked_for_local_layers_on_cpu():
    q, k, v = random_qkv(64)
    assert pick_backend(q, k, v, window=None, dropout_p=0.0) == "sdpa"
    assert pick_backend(q, k, v, window=16, dropout_p=0.0) == "blocked"
    assert pick_backend(q, k, v, window=16, dropout_p=0.1) == "blocked"
    # A window as long as the sequence is dense attention, whatever the backend.
    for backend in ("blocked", "fused_softmax"):
        out = causal_attention(q, k, v, window=64, backend=backend)
        torch.testing.assert_close(out, causal_attention(q, k, v, backend="sdpa"), rtol=1e-5, atol=1e-5)


def test_default_block_size_is_a_quarter_of_the_window_within_16_to_64():
    assert [default_block_size(w) for w in (1, 7, 64, 100, 256, 2048)] == [16, 16, 16, 32, 64, 64]


def test_scaled_masked_softmax_torch_path():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 3, 5, 9, generator=g, dtype=torch.bfloat16, requires_grad=True)
    # causal with queries as the last 5 of 9 positions, band of 3
    probs = scaled_masked_softmax(scores, 0.5, causal=True, window=3)
    i = torch.arange(5).unsqueeze(1) + 4
    j = torch.arange(9).unsqueeze(0)
    visible = (j <= i) & (j > i - 3)
    want = torch.softmax((scores.float() * 0.5).masked_fill(~visible, float("-inf")), -1)
    assert probs.dtype == torch.bfloat16
    torch.testing.assert_close(probs.float(), want, rtol=1e-2, atol=1e-2)
    # A boolean mask that hides a whole row gives zeros there and finite gradients everywhere.
    mask = torch.zeros(2, 1, 5, 9, dtype=torch.bool)
    mask[:, :, 2] = True
    probs = scaled_masked_softmax(scores.float().detach().requires_grad_(), 1.0, mask=mask)
    assert torch.equal(probs[:, :, 2], torch.zeros_like(probs[:, :, 2]))
    torch.testing.assert_close(probs.sum(-1)[:, :, [0, 1, 3, 4]], torch.ones(2, 3, 4))
    probs.pow(2).sum().backward()
    with pytest.raises(ValueError, match="needs causal"):
        scaled_masked_softmax(scores, 1.0, window=3)


def test_flex_compiles_get_a_recompile_budget_past_torch_default():
    """Static-shape compiles of flex happen once per shape, dtype and window; past torch.compile's default limit
    (8) torch would run it unfused. The budget flex runs under lets 12 variants each compile."""
    from torch._dynamo.utils import counters

    from megagpt.model.attention import FLEX_RECOMPILE_LIMIT, _recompile_budget

    torch._dynamo.reset()
    counters.clear()
    double = torch.compile(lambda x: x * 2, backend="eager", dynamic=False)
    with _recompile_budget(FLEX_RECOMPILE_LIMIT):
        for n in range(1, 13):
            double(torch.ones(n))
    assert counters["stats"]["unique_graphs"] == 12
    torch._dynamo.reset()
