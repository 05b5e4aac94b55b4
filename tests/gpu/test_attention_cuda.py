"""Attention backends on CUDA against the float64 reference (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from megagpt.model.attention import causal_attention, pick_backend
from tests.unit.test_attention import reference_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TOLERANCE = {torch.float32: 2e-3, torch.bfloat16: 3e-2, torch.float16: 5e-3}


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
WINDOWS = [None, 1, 7, 64, 256]


def cases():
    """Every backend, dtype, window and length; Flex (each variant a torch.compile of forward and backward, seconds
    apiece) on fewer: fp32 and bf16 (fp16 takes bf16's path), windows None, 7 and 256."""
    for backend in ("sdpa", "blocked", "flex", "fused_softmax"):
        for dtype in DTYPES:
            for window in WINDOWS:
                for seq_len in (256, 300):
                    if backend == "flex" and (dtype == torch.float16 or window not in (None, 7, 256)):
                        continue
                    yield pytest.param(dtype, backend, window, seq_len, id=f"{backend}-{dtype}-w{window}-s{seq_len}")


@pytest.mark.parametrize("dtype, backend, window, seq_len", list(cases()))
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


def test_the_pipeline_times_stages_with_cuda_events():
    """On CUDA the executor marks each computation with CUDA events (time.time() would time kernel launches):
    the spans cover the kernels, in order, and read back as seconds on one timeline."""
    import datetime

    from megagpt.data.batches import MicroBatch
    from megagpt.parallel.pipeline import PipelineExecutor

    weight = torch.nn.Parameter(torch.randn(1024, 1024, device="cuda"))

    def forward(chunk, x, labels):
        y = torch.ones(2, x.shape[1], 1024, device="cuda")
        for _ in range(20):
            y = torch.tanh(y @ chunk)
        return y.square().mean()

    executor = PipelineExecutor([weight], 0, (0,), (2, 8, 1024), torch.device("cuda"), datetime.timedelta(seconds=60))
    tokens = [MicroBatch.of(torch.zeros(2, 9, dtype=torch.long, device="cuda")) for _ in range(3)]
    record = executor.run(tokens, forward, backward=True)
    spans = record.events
    assert [repr(a) for a, _, _ in spans] == ["F0.0", "B0.0", "F0.1", "B0.1", "F0.2", "B0.2"]
    assert all(end > start for _, start, end in spans)
    assert all(later[1] >= earlier[2] - 1e-4 for earlier, later in zip(spans, spans[1:]))
    assert record.busy_s > 0
