"""The chunked output layer + cross entropy (megagpt/model/loss.py) against the plain two-step computation in
float64: the loss and both gradients, with a last chunk shorter than the others, an upstream gradient other than
1, and bf16 inputs (fp32 softmax)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megagpt.model.loss import linear_cross_entropy


def reference(x, weight, labels, upstream):
    x64 = x.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    loss = F.cross_entropy(x64 @ w64.t(), labels)
    (loss * upstream).backward()
    return loss.detach(), x64.grad, w64.grad


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_chunked_loss_and_gradients_match_the_plain_computation(dtype, tolerance):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(300, 32, generator=generator).to(dtype).requires_grad_()
    weight = (torch.randn(1000, 32, generator=generator) * 0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, 1000, (300,), generator=generator)
    loss = linear_cross_entropy(x, weight, labels, block_rows=128)  # row blocks of 128, 128 and 44 rows
    (loss * 3.0).backward()
    want_loss, want_dx, want_dw = reference(x, weight, labels, 3.0)
    assert loss.dtype == torch.float32 and x.grad.dtype == dtype and weight.grad.dtype == dtype
    assert loss.item() == pytest.approx(want_loss.item(), rel=tolerance)
    for got, want in ((x.grad, want_dx), (weight.grad, want_dw)):
        assert (got.double() - want).abs().max() <= tolerance * want.abs().max()
