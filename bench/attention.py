"""Local (banded) attention against dense causal attention, alone and inside a model step.

    python bench/attention.py [--seq 2048] [--window 256] [--heads 12] [--reps 10]
                              [--layers 4] [--hidden 768] [--vocab 50257] [--model-reps 3] [--json PATH]

1. Attention alone, forward + backward on (1, heads, seq, 64): every backend that can train on this device for a
   local layer, each against dense causal sdpa (Flash) as the peer. Printed: median times and the ratio.
2. A model step (forward + backward of the GPT, no optimizer) with attention_pattern [dense, local] against
   [dense]: the whole-step ratio, which is what a user gains.

Each comparison is interleaved (each repetition runs both contenders once) so drifts in machine speed hit both
alike, and the ratios compare medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved(contenders: dict, reps: int) -> dict[str, float]:
    """Median seconds per contender; one warm-up round first."""
    times = {name: [] for name in contenders}
    for rep in range(reps + 1):
        for name, fn in contenders.items():
            t = timed(fn)
            if rep:
                times[name].append(t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def attention_contenders(args, device, dtype) -> dict:
    from megagpt.model.attention import cannot_serve, causal_attention

    shape = (1, args.heads, args.seq, 64)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, device=device, dtype=dtype)

    def run(window, backend):
        def step():
            out = causal_attention(q, k, v, window=window, backend=backend)
            out.backward(grad)

        return step

    dense = run(None, "sdpa")
    return {
        backend: run(args.window, backend)
        for backend in ("blocked", "flex", "sdpa", "fused_softmax")
        if not cannot_serve(backend, q, k, v, window=args.window, dropout_p=0.0)
    }, dense


def model_contenders(args, device, dtype) -> dict:
    from megagpt.config import config_from_dict
    from megagpt.model.gpt import GPT
    from megagpt.parallel.context import Group

    contenders = {}
    tokens = torch.randint(0, args.vocab, (1, args.seq + 1), device=device)
    for pattern in ("[dense]", "[dense,local]"):
        cfg = config_from_dict(
            {"preset": "tiny-cpu"},
            [
                f"model.num_layers={args.layers}",
                f"model.hidden_size={args.hidden}",
                f"model.num_heads={args.hidden // 64}",
                f"model.seq_length={args.seq}",
                f"model.local_window={args.window}",
                f"model.attention_pattern={pattern}",
                f"model.vocab_size={args.vocab}",
                "model.dropout=0.0",
            ],
        ).model
        model = GPT(cfg, Group.solo(), init_seed=0).to(device=device, dtype=dtype)

        def step(model=model):
            model(tokens[:, :-1], tokens[:, 1:]).backward()
            model.zero_grad(set_to_none=True)

        contenders[f"model step {pattern}"] = step
    return contenders


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--model-reps", type=int, default=3, help="0 skips the model step")
    parser.add_argument("--vocab", type=int, default=50257, help="the model's vocabulary (GPT-2's by default)")
    parser.add_argument("--json", default=None, help="also write the results here (tools/gpu_check.py reads it)")
    args = parser.parse_args()
    results = {"device": None, "attention": {}, "model": {}}

    if torch.cuda.is_available():
        device, dtype = torch.device("cuda"), torch.bfloat16
        what = f"{torch.cuda.get_device_name()}, bf16"
    else:
        device, dtype = torch.device("cpu"), torch.float32
        what = f"CPU, {torch.get_num_threads()} threads, fp32"
    print(f"# {what}; seq {args.seq}, head_dim 64, {args.heads} heads, window {args.window}, torch {torch.__version__}")
    results["device"] = what

    # Each local backend is timed against its own interleaved dense runs: an O(s^2) contender's large temporaries
    # would otherwise change the allocator's state, and so the times, of the others.
    local, dense = attention_contenders(args, device, dtype)
    print(f"\n## attention forward+backward (median of {args.reps})")
    print(f"{'local backend':16s} {'local ms':>9s} {'dense ms':>9s}   local / dense causal sdpa")
    for backend, run in local.items():
        times = interleaved({"dense": dense, "local": run}, args.reps)
        ratio = times["local"] / times["dense"]
        print(f"{backend:16s} {times['local'] * 1e3:9.1f} {times['dense'] * 1e3:9.1f}   {ratio:.3f}")
        results["attention"][backend] = {"local_s": times["local"], "dense_s": times["dense"], "over_dense": ratio}

    if args.model_reps:
        results["model"] = model_step(args, device, dtype)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def model_step(args, device, dtype) -> dict:
    times = interleaved(model_contenders(args, device, dtype), args.model_reps)
    dense = times["model step [dense]"]
    print(
        f"\n## GPT forward+backward, {args.layers} layers, hidden {args.hidden}, vocab {args.vocab} "
        f"(median of {args.model_reps})"
    )
    for name, t in times.items():
        print(f"{name:32s} {t * 1e3:9.1f} ms   {t / dense:6.3f} x all-dense")
    return {name: {"seconds": t, "over_all_dense": t / dense} for name, t in times.items()}


if __name__ == "__main__":
    main()
