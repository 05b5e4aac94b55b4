"""Fused kernels' CPU side (megagpt/kernels): which implementation runs, the torch paths against references, and
the errors of model.fused_kernels=on. The CUDA kernels themselves are tested in tests/gpu."""

from __future__ import annotations

import logging
import types

import pytest
import torch
import torch.nn.functional as F

from megagpt.kernels import KernelUnavailableError, LayerNorm, layer_norm, scaled_masked_softmax
from megagpt.kernels import cuda as kernels_cuda
from megagpt.kernels.softmax import _unsupported, torch_scaled_masked_softmax
from megagpt.log import get_logger

CUDA_TENSOR = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))  # choose() reads only these


@pytest.fixture
def log_lines():
    """What the megagpt logger says during the test, and a fresh record of which choices were announced."""
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = get_logger()
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)  # setLevel, not .level =: it also clears the logger's isEnabledFor cache
    kernels_cuda._announced.clear()
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(level)
    kernels_cuda._announced.clear()


@pytest.fixture
def built(monkeypatch):
    """Pretend the CUDA extension built (a module object), or failed with a message."""

    def set_state(module=None, error=None):
        monkeypatch.setattr(kernels_cuda, "_load", lambda: (module, error))

    return set_state


def test_cpu_tensors_take_torch_unless_on_insists(log_lines):
    x = torch.randn(3, 4)
    assert kernels_cuda.choose("layer_norm", x, "auto", None, apex=True) == "torch"
    assert kernels_cuda.choose("layer_norm", x, "auto", None, apex=True) == "torch"
    assert kernels_cuda.choose("layer_norm", x, "off", None) == "torch"
    assert log_lines == [
        "layer_norm: using torch (the tensors are on cpu, and the kernels are CUDA only)",  # once, not per call
        "layer_norm: using torch (model.fused_kernels=off)",
    ]
    with pytest.raises(KernelUnavailableError, match="fused_kernels=on but layer_norm .* tensors are on cpu"):
        kernels_cuda.choose("layer_norm", x, "on", None)
    with pytest.raises(ValueError, match="choose one of auto, on, off"):
        kernels_cuda.choose("layer_norm", x, "yes", None)


def test_on_cuda_the_order_is_ours_then_apex_then_torch(built, monkeypatch, log_lines):
    built(module=object())
    assert kernels_cuda.choose("layer_norm", CUDA_TENSOR, "auto", None, apex=True) == "cuda"
    assert kernels_cuda.choose("layer_norm", CUDA_TENSOR, "on", None, apex=True) == "cuda"
    # Our kernels cannot take the call (a dtype, a size): apex if it imports, else torch; "on" says why.
    unsupported = "dtype torch.float64; the kernels take float32, float16 and bfloat16"
    monkeypatch.setattr(kernels_cuda, "_apex_layer_norm", lambda: None)
    assert kernels_cuda.choose("layer_norm", CUDA_TENSOR, "auto", unsupported, apex=True) == "torch"
    monkeypatch.setattr(kernels_cuda, "_apex_layer_norm", lambda: lambda *a: None)
    assert kernels_cuda.choose("layer_norm", CUDA_TENSOR, "auto", unsupported, apex=True) == "apex"
    assert kernels_cuda.choose("softmax", CUDA_TENSOR, "auto", unsupported, apex=False) == "torch"  # no apex softmax
    with pytest.raises(KernelUnavailableError, match="dtype torch.float64"):
        kernels_cuda.choose("layer_norm", CUDA_TENSOR, "on", unsupported, apex=True)
    assert f"layer_norm: using apex ({unsupported})" in log_lines
    assert "layer_norm: using megagpt CUDA kernels" in log_lines


def test_a_failed_build_falls_back_under_auto_and_is_an_error_under_on(built, monkeypatch, log_lines):
    error = "building kernel extension megagpt_cuda_kernels failed (exit status 1); the log is /x/build.log: boom"
    built(error=error)
    monkeypatch.setattr(kernels_cuda, "_apex_layer_norm", lambda: None)
    assert kernels_cuda.choose("scaled_masked_softmax", CUDA_TENSOR, "auto", None) == "torch"
    assert log_lines == [f"scaled_masked_softmax: using torch ({error})"]
    with pytest.raises(KernelUnavailableError, match="cannot use megagpt's CUDA kernels: building .*build.log"):
        kernels_cuda.choose("scaled_masked_softmax", CUDA_TENSOR, "on", None)


def test_the_extension_refuses_to_build_against_a_cpu_torch(monkeypatch):
    monkeypatch.setattr(kernels_cuda.torch.version, "cuda", None)
    kernels_cuda._load.cache_clear()
    try:
        with pytest.raises(kernels_cuda.KernelBuildError, match="built without CUDA"):
            kernels_cuda.cuda_kernels()
    finally:
        kernels_cuda._load.cache_clear()


def test_softmax_calls_outside_the_kernel_are_named():
    scores = torch.zeros(2, 3, 4, 5)
    assert _unsupported(scores, None) is None
    assert _unsupported(torch.zeros(1, 16385), None) == "rows of 16385 keys; the kernel takes at most 16384"
    assert "dtype torch.float64" in _unsupported(scores.double(), None)
    assert _unsupported(scores, torch.zeros(2, 1, 4, 5, dtype=torch.bool)) is None
    assert _unsupported(scores, torch.zeros(2, 3, 4, 5, dtype=torch.bool)) is None
    assert "a mask of shape (2, 2, 4, 5)" in _unsupported(scores, torch.zeros(2, 2, 4, 5, dtype=torch.bool))
    assert "bool mask" in _unsupported(scores, torch.zeros(2, 1, 4, 5))


def test_softmax_torch_path_equals_a_float64_reference():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 3, 6, 9, generator=g)
    mask = torch.rand(2, 1, 6, 9, generator=g) < 0.3
    cases = [(False, None, None), (True, None, None), (True, 3, None), (False, None, mask), (True, 2, mask)]
    for causal, window, m in cases:
        got = scaled_masked_softmax(scores, 0.7, causal=causal, window=window, mask=m, fused="auto")
        i = torch.arange(6).unsqueeze(1) + 3  # the 6 queries are the last of 9 positions
        j = torch.arange(9).unsqueeze(0)
        hidden = torch.zeros(6, 9, dtype=torch.bool)
        if causal:
            hidden |= j > i
        if window:
            hidden |= j <= i - window
        if m is not None:
            hidden = hidden | m
        want = torch.softmax((scores.double() * 0.7).masked_fill(hidden, float("-inf")), -1)
        want = torch.nan_to_num(want, nan=0.0)  # fully masked rows: zeros
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)
    assert torch.equal(torch_scaled_masked_softmax(scores, 0.7), scaled_masked_softmax(scores, 0.7, fused="off"))


def test_layer_norm_torch_path_and_module():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w, b = (torch.randn(16, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    got = layer_norm(x, w, b, 1e-5)
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    want = (x - mean) / torch.sqrt(var + 1e-5) * w + b
    torch.testing.assert_close(got, want)
    grads = torch.autograd.grad(got.sum(), (x, w, b))
    want_grads = torch.autograd.grad(want.sum(), (x, w, b))
    for got_grad, want_grad in zip(grads, want_grads):
        torch.testing.assert_close(got_grad, want_grad)
    # A drop-in for torch.nn.LayerNorm: same parameters and state dict, same output.
    ours, theirs = LayerNorm(16, eps=1e-6, fused="off"), torch.nn.LayerNorm(16, eps=1e-6)
    theirs.load_state_dict(ours.state_dict())
    assert list(ours.state_dict()) == ["weight", "bias"]
    y = torch.randn(4, 16)
    torch.testing.assert_close(ours(y), theirs(y))
    torch.testing.assert_close(ours(y), F.layer_norm(y, (16,), ours.weight, ours.bias, 1e-6))


def test_fused_kernels_on_is_refused_on_cpu_before_anything_starts():
    from megagpt.config import validate
    from tests.conftest import tiny_config
    from tests.unit.test_config import _problems

    assert "model.fused_kernels=on needs CUDA" in _problems("model.fused_kernels=on", "train.device=cpu")
    for mode in ("auto", "off"):
        validate(tiny_config(f"model.fused_kernels={mode}", "train.device=cpu"))
