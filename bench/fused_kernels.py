"""megagpt's CUDA softmax and layer norm kernels: achieved GB/s against the device's copy bandwidth and against torch
eager (and apex's layer norm when it imports), at GPT-3 175B's shapes on one tensor-parallel rank of 8.

    python bench/fused_kernels.py [--dtype bf16] [--reps 50] [--micro-batch 1] [--json PATH]

Shapes: attention scores (micro-batch, 96 / 8 heads, 2048, 2048), causal (dense layers) and a causal band of 256
(local layers); layer norm over (micro-batch * 2048, 12288). GB/s counts the bytes a kernel must move at least:
softmax forward reads scores and writes probabilities, backward reads probabilities and their gradient and writes
one gradient; layer norm forward reads x and writes y, backward reads x and dy and writes dx (weights and the
per-row statistics are small). Copy bandwidth is a device-to-device tensor copy of 1 GiB (read + write).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

from megagpt.model.facts import COMPUTE_DTYPES


def cuda_time(fn, reps: int) -> float:
    """Median seconds of fn over reps, after warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def copy_bandwidth(reps: int) -> float:
    src = torch.empty(1 << 28, device="cuda", dtype=torch.float32)  # 1 GiB
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / cuda_time(lambda: dst.copy_(src), reps) / 1e9


def softmax_rows(args, dtype):
    from megagpt.kernels import cuda_kernels
    from megagpt.kernels.softmax import torch_scaled_masked_softmax

    ops = cuda_kernels()
    scores = torch.randn(args.micro_batch, 12, 2048, 2048, device="cuda", dtype=dtype)
    probs, grad, grad_scores = torch.empty_like(scores), torch.randn_like(scores), torch.empty_like(scores)
    size = scores.numel() * scores.element_size()
    rows = []
    for label, window in (("causal", None), ("causal band 256", 256)):
        ours = cuda_time(lambda w=window: ops.softmax_forward(scores, probs, 0.125, True, w or 0, None), args.reps)
        torch_eager = cuda_time(
            lambda w=window: torch_scaled_masked_softmax(scores, 0.125, causal=True, window=w), args.reps
        )
        rows.append((f"softmax forward, {label}", 2 * size, ours, torch_eager, None))
    scores_t = scores.detach().requires_grad_()
    eager_probs = torch_scaled_masked_softmax(scores_t, 0.125, causal=True)
    ours = cuda_time(lambda: ops.softmax_backward(grad, probs, grad_scores, 0.125), args.reps)
    torch_eager = cuda_time(lambda: torch.autograd.grad(eager_probs, scores_t, grad, retain_graph=True), args.reps)
    rows.append(("softmax backward", 3 * size, ours, torch_eager, None))
    return rows


def layer_norm_rows(args, dtype):
    from megagpt.kernels import cuda_kernels
    from megagpt.kernels.cuda import _apex_layer_norm

    ops = cuda_kernels()
    hidden, tokens = 12288, args.micro_batch * 2048
    x = torch.randn(tokens, hidden, device="cuda", dtype=dtype)
    weight, bias = torch.randn(hidden, device="cuda", dtype=dtype), torch.randn(hidden, device="cuda", dtype=dtype)
    y, grad_y, grad_x = torch.empty_like(x), torch.randn_like(x), torch.empty_like(x)
    mean = torch.empty(tokens, device="cuda")
    rstd = torch.empty(tokens, device="cuda")
    grad_w, grad_b = torch.empty_like(weight), torch.empty_like(bias)
    size = x.numel() * x.element_size()
    apex = _apex_layer_norm()

    ours = cuda_time(lambda: ops.layer_norm_forward(x, weight, bias, y, mean, rstd, 1e-5), args.reps)
    torch_eager = cuda_time(lambda: F.layer_norm(x, (hidden,), weight, bias, 1e-5), args.reps)
    apex_time = cuda_time(lambda: apex(x, weight, bias, (hidden,), 1e-5), args.reps) if apex else None
    rows = [("layer norm forward", 2 * size, ours, torch_eager, apex_time)]

    ours = cuda_time(lambda: ops.layer_norm_backward(grad_y, x, weight, mean, rstd, grad_x, grad_w, grad_b), args.reps)
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
    eager_out = F.layer_norm(leaves[0], (hidden,), leaves[1], leaves[2], 1e-5)
    torch_eager = cuda_time(lambda: torch.autograd.grad(eager_out, leaves, grad_y, retain_graph=True), args.reps)
    apex_time = None
    if apex:
        apex_out = apex(leaves[0], leaves[1], leaves[2], (hidden,), 1e-5)
        apex_time = cuda_time(lambda: torch.autograd.grad(apex_out, leaves, grad_y, retain_graph=True), args.reps)
    rows.append(("layer norm backward", 3 * size, ours, torch_eager, apex_time))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=COMPUTE_DTYPES, default="bf16")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the results here (tools/gpu_check.py reads it)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/fused_kernels.py measures CUDA kernels and needs a CUDA device; none is visible.")
        return
    dtype = COMPUTE_DTYPES[args.dtype]
    copy = copy_bandwidth(args.reps)
    print(f"# {torch.cuda.get_device_name()}, {args.dtype}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    print(f"# device copy bandwidth: {copy:.0f} GB/s")
    print(f"\n{'kernel':34s} {'ours GB/s':>10s} {'of copy':>8s} {'vs torch':>9s} {'vs apex':>8s}")
    results = {"device": torch.cuda.get_device_name(), "dtype": args.dtype, "copy_gb_s": copy, "kernels": {}}
    for name, nbytes, ours, torch_eager, apex_time in softmax_rows(args, dtype) + layer_norm_rows(args, dtype):
        rate = nbytes / ours / 1e9
        vs_apex = f"{apex_time / ours:7.2f}x" if apex_time else "     n/a"
        print(f"{name:34s} {rate:10.0f} {rate / copy:7.0%} {torch_eager / ours:8.2f}x {vs_apex}")
        results["kernels"][name] = {
            "gb_s": rate,
            "of_copy": rate / copy,
            "speedup_vs_torch": torch_eager / ours,
            "speedup_vs_apex": apex_time / ours if apex_time else None,
        }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
