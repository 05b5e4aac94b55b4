"""Training throughput of megagpt against Hugging Face transformers' GPT2LMHeadModel, measured in the same run.

    python bench/train_throughput.py [--layers 4] [--hidden 768] [--heads 12] [--seq 1024] [--batch 4]
                                     [--steps 5] [--threads N] [--precision fp32|bf16] [--preset gpt3-1.3b]
                                     [--peers all|none] [--json PATH]

Both train the same GPT-2-shaped decoder (all layers dense, vocabulary 50257, tied embeddings, GELU tanh) with
AdamW (lr 1e-4, weight decay 0.1, betas 0.9/0.95) on the same random tokens, one optimizer step per batch; steps
alternate between the two so drifts in machine speed hit both alike; the medians are compared. megagpt runs its
real training step (the pipeline executor, fp32 gradient buckets, the optimizer over main-weight pieces),
transformers a plain loop: forward with labels, backward, clip to 1.0, step, zero_grad, once with torch's default
AdamW and once with its fused kernel (the stronger peer: megagpt uses the fused one).

On a GPU (bf16 by default there) it also reports MFU: model FLOPs per second over the device's bf16 matmul peak,
measured here with a large matmul. Model FLOPs per step follow Narayanan et al. (2021) with the local layers'
attention counted at their window: 72 B s l h^2 (1 + s_eff / (6 h) + V / (12 l h)), where s_eff is the mean over
layers of the keys a query sees (s for dense layers, the window for local ones) and 72 = 3 (forward + backward) x
24. --preset gpt3-1.3b runs GPT-3 XL as the preset has it (24 layers, hidden 2048, seq 2048, [dense, local], dropout
0.1 with its production attention path), the transformers peers with the same dropout; --peers none runs megagpt
alone (MFU only: a 1.3B model three times over does not fit one 80 GB GPU with its optimizer states).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

VOCAB = 50257


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def megagpt_config(args, device, dtype_name):
    from megagpt.config import config_from_dict

    run_dir = tempfile.mkdtemp(prefix="megagpt-bench-")
    run = [
        f"train.global_batch_size={args.batch}", f"train.micro_batch_size={args.batch}",
        f"train.precision={dtype_name}", f"train.device={device.type}", "train.iters=1000000", "optim.lr=1e-4",
        "optim.warmup_iters=0", "optim.clip_grad=1.0", f"logging.dir={run_dir}", "logging.tensorboard=false",
    ]  # fmt: skip
    if args.preset:  # the preset's model as it trains, dropout and attention path included
        return config_from_dict({"preset": args.preset}, [f"model.vocab_size={VOCAB}", *run])
    shape = [
        f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}", f"model.num_heads={args.heads}",
        f"model.seq_length={args.seq}", f"model.vocab_size={VOCAB}", f"model.attention_pattern={args.pattern}",
        f"model.local_window={args.window}", "model.dropout=0.0",
    ]  # fmt: skip
    return config_from_dict({"preset": "tiny-cpu"}, [*shape, *run])


def megagpt_step(args, device, cfg):
    from megagpt.data.gpt_dataset import SyntheticDataset
    from megagpt.parallel.context import ParallelContext
    from megagpt.train.run import build_trainer

    data = SyntheticDataset(args.batch * (args.steps + 2) * 2, args.seq, VOCAB, seed=1)
    trainer = build_trainer(cfg, ParallelContext.single_process(device), data, None, None)

    def step():
        trainer.train_step()

    return step


def hf_step(args, device, dtype, fused_adam: bool = False, dropout: float = 0.0):
    import transformers

    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=args.hidden, n_layer=args.layers, n_head=args.heads, n_positions=args.seq,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config).to(device=device, dtype=dtype).train()
    fused = {"fused": True} if fused_adam else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, **fused)
    generator = torch.Generator().manual_seed(1)

    def step():
        tokens = torch.randint(0, VOCAB, (args.batch, args.seq), generator=generator).to(device)
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def timed_alternating(contenders: dict, steps: int, device) -> dict[str, float]:
    """Median seconds per step of each contender; one warm-up step each first."""
    times = {name: [] for name in contenders}
    for i in range(steps + 1):
        for name, step in contenders.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            if i:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def matmul_peak(device, dtype) -> float:
    from megagpt.train.peaks import measure_matmul_tflops  # the measurement the training logs use for MFU

    return measure_matmul_tflops(device, dtype, size=8192) * 1e12


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None, help="default: fp32 on CPU, bf16 on GPU")
    parser.add_argument("--pattern", default="[dense]", help="megagpt's attention_pattern (transformers: all dense)")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--preset", choices=("gpt3-1.3b",), default=None)
    parser.add_argument("--peers", choices=("all", "none"), default="all", help="none: megagpt alone (MFU only)")
    parser.add_argument("--json", default=None, help="also write the results here (tools/gpu_check.py reads it)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    from megagpt.model.facts import COMPUTE_DTYPES

    dtype = COMPUTE_DTYPES[precision]
    what = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"# {what}, {precision}, torch {torch.__version__}; {args.layers} layers, hidden {args.hidden}, "
        f"{args.heads} heads, seq {args.seq}, batch {args.batch}, megagpt attention_pattern {args.pattern}"
    )
    cfg = megagpt_config(args, device, precision)
    m = cfg.model
    args.layers, args.hidden, args.heads, args.seq = m.num_layers, m.hidden_size, m.num_heads, m.seq_length
    contenders = {"megagpt": megagpt_step(args, device, cfg)}
    if args.peers == "all":
        # torch's default AdamW, as a plain training loop has it; then its fused kernel, the stronger peer
        contenders["transformers"] = hf_step(args, device, dtype, dropout=m.dropout)
        contenders["transformers+fused"] = hf_step(args, device, dtype, fused_adam=True, dropout=m.dropout)
    times = timed_alternating(contenders, args.steps, device)
    tokens = args.batch * args.seq
    results = {"device": what, "precision": precision, "model": cfg.to_dict()["model"], "batch": args.batch}
    results["contenders"] = {name: {"seconds": t, "tokens_per_s": tokens / t} for name, t in times.items()}
    for name, seconds in times.items():
        print(f"{name:20s} {seconds * 1e3:9.1f} ms/step {tokens / seconds:10.0f} tokens/s")
    for peer in ("transformers", "transformers+fused"):
        if peer in times:
            print(f"megagpt / {peer} tokens/s: {times[peer] / times['megagpt']:.2f}x")
            results["contenders"][peer]["megagpt_speedup"] = times[peer] / times["megagpt"]
    if device.type == "cuda":
        peak = matmul_peak(device, dtype)
        from megagpt.estimate import model_flops_per_step  # the formula in the module docstring

        flops = model_flops_per_step(cfg)
        results.update(matmul_peak_flops=peak, model_flops_per_step=flops)
        print(f"measured matmul peak {peak / 1e12:.0f} TFLOP/s; model FLOPs per step {flops / 1e12:.2f} T")
        for name, seconds in times.items():
            print(f"{name:14s} MFU {flops / seconds / peak:.1%}")
            results["contenders"][name]["mfu"] = flops / seconds / peak
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
