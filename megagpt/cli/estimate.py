"""What a config costs on a layout, without running it: parameters (total and per rank), memory per GPU
(weights, gradients, optimizer state, activations), FLOPs per step, the pipeline bubble, and the step time and
days for its token budget at a given MFU. The accounting is in megagpt/estimate.py.

    python tools/estimate.py --config configs/gpt3-175b.yaml --tp 8 --pp 16 --dp 8 --zero 1 \\
        --recompute selective --sequence-parallel --gpu h100 [--mfu 0.4] [--tokens 300e9] [--json]
    # time from a measured throughput instead of an assumed MFU: Narayanan et al. (2021), 175B on 1024 A100s
    python tools/estimate.py --config configs/gpt3-175b.yaml --tp 8 --pp 16 --dp 8 --recompute full \\
        --gpu a100 --tflops-per-gpu 140 --flops-convention hardware --tokens 300e9

--mfu is an assumed model FLOPs utilization while the pipeline computes: the bubble is added on top.
--tflops-per-gpu is a measured throughput, bubble included, counted in --flops-convention: "hardware" (with the
forward that recomputation repeats, as Megatron's papers count) or "model".

Layout flags override the config's parallel.* and train.* keys; --dp sets the world size to tp x pp x dp.
"""

from __future__ import annotations

import argparse
import json
import sys

from megagpt.cli import reports_user_errors
from megagpt.errors import UserError


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--tp", type=int)
    parser.add_argument("--pp", type=int)
    parser.add_argument("--vpp", type=int)
    parser.add_argument("--dp", type=int, default=1)
    parser.add_argument("--micro-batch", type=int)
    parser.add_argument("--global-batch", type=int)
    parser.add_argument("--zero", type=int, choices=(0, 1, 2, 3))
    parser.add_argument("--recompute", choices=("none", "selective", "full"))
    parser.add_argument("--sequence-parallel", action="store_true")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--gpu", choices=("h100", "h200", "a100"), default="h100")
    parser.add_argument("--mfu", type=float, default=0.4, help="the model FLOPs utilization to predict time at")
    parser.add_argument(
        "--tflops-per-gpu", type=float, default=None, help="a measured throughput to predict time at, instead of --mfu"
    )
    parser.add_argument(
        "--flops-convention",
        choices=("hardware", "model"),
        default="hardware",
        help="what --tflops-per-gpu counts: hardware FLOPs (with recomputation; the default) or model FLOPs",
    )
    parser.add_argument("--tokens", type=float, default=None, help="token budget (default: the config's)")
    parser.add_argument("--json", action="store_true", help="print the estimate as one JSON object")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    from megagpt.config import load_config, validate
    from megagpt.estimate import estimate, report

    overrides = list(args.overrides)
    for flag, key in (("tp", "parallel.tp"), ("pp", "parallel.pp"), ("vpp", "parallel.vpp"),
                      ("micro_batch", "train.micro_batch_size"), ("global_batch", "train.global_batch_size"),
                      ("zero", "parallel.zero"), ("recompute", "parallel.recompute"),
                      ("precision", "train.precision")):  # fmt: skip
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.sequence_parallel:
        overrides.append("parallel.sequence_parallel=true")
    cfg = load_config(args.config, overrides)
    world = cfg.parallel.tp * cfg.parallel.pp * args.dp
    validate(cfg, world)
    if not 0 < args.mfu <= 1:
        raise UserError(f"--mfu={args.mfu} must be in (0, 1]")
    if args.tokens is not None and not args.tokens > 0:  # also NaN
        raise UserError(f"--tokens={args.tokens:g} must be a positive token budget, e.g. 300e9")
    if args.tflops_per_gpu is not None and not args.tflops_per_gpu > 0:
        raise UserError(f"--tflops-per-gpu={args.tflops_per_gpu:g} must be a positive throughput, e.g. 140")
    result = estimate(cfg, world, args.gpu, args.mfu, args.tokens, args.tflops_per_gpu, args.flops_convention)
    print(json.dumps(result, indent=1) if args.json else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
