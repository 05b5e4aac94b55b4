"""megagpt's CUDA kernels (megagpt/kernels/csrc) against float64 references, forward and backward, on random inputs
of odd and large sizes, with every output poisoned (NaN) before the call so an element the kernel skips shows.
Skipped without a GPU; the first test builds the extension (a minute or two)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megagpt.kernels import LayerNorm, cuda_kernels, layer_norm, scaled_masked_softmax
from megagpt.kernels.softmax import torch_scaled_masked_softmax

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def poisoned_like(t, dtype=None):
    return torch.full_like(t, float("nan"), dtype=dtype or t.dtype)


def reference_softmax(scores, scale, causal, window, mask):
    probs = torch_scaled_masked_softmax(scores.double(), scale, causal=causal, window=window, mask=mask)
    return probs


def check_close(got, want, dtype, what):
    tol = TOLERANCE[dtype]
    assert torch.isfinite(got).all(), f"{what}: non-finite values (an element left unwritten?)"
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


SOFTMAX_CASES = [
    # (b, heads, sq, sk, causal, window, mask heads)
    (2, 3, 1, 1, False, None, None),
    (2, 3, 7, 7, True, None, None),
    (1, 2, 33, 100, True, None, None),  # sq < sk: queries are the last 33 positions
    (1, 4, 64, 64, True, 7, None),
    (2, 2, 130, 130, True, 64, None),
    (1, 2, 16, 1024, False, None, 1),
    (1, 2, 8, 1025, True, 256, None),  # one past the warp-per-row size, odd: scalar loads
    (1, 2, 4, 2048, True, 256, 2),
    (1, 1, 3, 4097, False, None, 1),
    (1, 1, 2, 16384, True, 1000, None),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SOFTMAX_CASES, ids=lambda c: "x".join(map(str, c)))
def test_softmax_matches_float64(case, dtype):
    b, heads, sq, sk, causal, window, mask_heads = case
    g = torch.Generator(device="cuda").manual_seed(sk)
    scores = (torch.randn(b, heads, sq, sk, device="cuda", generator=g) * 3).to(dtype)
    mask = None
    if mask_heads:
        mask = torch.rand(b, mask_heads, sq, sk, device="cuda", generator=g) < 0.25
        mask[..., 0, :] = True  # a fully masked row: zeros, not NaN
    scale = 1.0 / math.sqrt(64)
    ops = cuda_kernels()
    probs = poisoned_like(scores)
    ops.softmax_forward(scores, probs, scale, causal, window or 0, mask)
    ref_scores = scores.double().requires_grad_()
    want = reference_softmax(ref_scores, scale, causal, window, mask)
    check_close(probs, want, dtype, "probs")
    if mask is not None:
        assert torch.equal(probs[..., 0, :], torch.zeros_like(probs[..., 0, :]))
    grad = torch.randn(b, heads, sq, sk, device="cuda", generator=g).to(dtype)
    grad_scores = poisoned_like(scores)
    ops.softmax_backward(grad, probs, grad_scores, scale)
    (want_grad,) = torch.autograd.grad(want, ref_scores, grad.double())
    check_close(grad_scores, want_grad, dtype, "grad scores")


def test_softmax_autograd_function_and_3d_scores():
    scores = torch.randn(6, 40, 40, device="cuda", requires_grad=True)
    got = scaled_masked_softmax(scores, 0.5, causal=True, window=5, fused="on")
    want = torch_scaled_masked_softmax(scores, 0.5, causal=True, window=5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(got)
    torch.testing.assert_close(
        torch.autograd.grad(got, scores, grad)[0], torch.autograd.grad(want, scores, grad)[0], rtol=1e-5, atol=1e-6
    )


LAYER_NORM_SHAPES = [(1, 1), (3, 7), (5, 768), (17, 1000), (4, 12288), (2, 20000), (300, 64)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, hidden", LAYER_NORM_SHAPES)
def test_layer_norm_matches_float64(rows, hidden, dtype):
    g = torch.Generator(device="cuda").manual_seed(hidden)
    x = (torch.randn(rows, hidden, device="cuda", generator=g) * 2 + 5).to(dtype)  # an offset tests the variance
    weight = torch.randn(hidden, device="cuda", generator=g).to(dtype)
    bias = torch.randn(hidden, device="cuda", generator=g).to(dtype)
    ops = cuda_kernels()
    y = poisoned_like(x)
    mean = torch.full((rows,), float("nan"), device="cuda")
    rstd = torch.full((rows,), float("nan"), device="cuda")
    ops.layer_norm_forward(x, weight, bias, y, mean, rstd, 1e-5)
    xd, wd, bd = (t.double().requires_grad_() for t in (x, weight, bias))
    want = F.layer_norm(xd, (hidden,), wd, bd, 1e-5)
    check_close(y, want, dtype, "y")
    torch.testing.assert_close(mean.double(), xd.detach().mean(-1), rtol=1e-5, atol=1e-5)
    grad_y = torch.randn(rows, hidden, device="cuda", generator=g).to(dtype)
    grad_x, grad_w, grad_b = poisoned_like(x), poisoned_like(weight), poisoned_like(bias)
    ops.layer_norm_backward(grad_y, x, weight, mean, rstd, grad_x, grad_w, grad_b)
    want_x, want_w, want_b = torch.autograd.grad(want, (xd, wd, bd), grad_y.double())
    check_close(grad_x, want_x, dtype, "grad x")
    # Parameter gradients sum over rows: compare relative to their scale.
    for got, ref, what in ((grad_w, want_w, "grad weight"), (grad_b, want_b, "grad bias")):
        scale = ref.abs().max().clamp_min(1.0)
        check_close(got.double() / scale, ref / scale, dtype, what)


def test_layer_norm_module_and_an_empty_input():
    ln = LayerNorm(48, fused="on").cuda()
    x = torch.randn(2, 3, 48, device="cuda", requires_grad=True)
    torch.testing.assert_close(ln(x), F.layer_norm(x, (48,), ln.weight, ln.bias, ln.eps), rtol=1e-5, atol=1e-5)
    ln(x).sum().backward()
    assert x.grad is not None and ln.weight.grad is not None
    empty = torch.randn(0, 48, device="cuda", requires_grad=True)
    out = layer_norm(empty, ln.weight, ln.bias, fused="on")
    out.sum().backward()
    assert out.shape == (0, 48)


def test_the_model_with_fused_kernels_on_matches_off():
    from megagpt.model.gpt import GPT
    from megagpt.parallel.context import Group
    from tests.conftest import tiny_config

    tokens = torch.randint(0, 1000, (2, 65), device="cuda")
    losses = {}
    for mode in ("off", "on"):
        cfg = tiny_config(
            f"model.fused_kernels={mode}", "model.attention_backend=fused_softmax", "model.dropout=0.0"
        ).model
        model = GPT(cfg, Group.solo(), init_seed=0).cuda()
        losses[mode] = model(tokens[:, :-1], tokens[:, 1:])
        losses[mode].backward()
    torch.testing.assert_close(losses["on"], losses["off"], rtol=1e-5, atol=1e-5)
