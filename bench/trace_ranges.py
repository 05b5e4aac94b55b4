"""What the profiler's named ranges cost when no profiler runs, against their peers measured in the same run.

    python bench/trace_ranges.py [--calls 200000] [--trace runs/x/traces/rank0_steps4-4.json]

Times `with trace_range(name)` (parallel/trace_ranges.py: a record_function only while a profiler listens),
torch's plain `with torch.profiler.record_function(name)` (which enters the dispatcher even with no profiler) and
an empty `with` on a shared nullcontext (the floor), interleaved in rounds, and prints each per call and their
ratios. With --trace (a trace logging.profile wrote) it also counts the named ranges a rank opened per profiled
step, and prints what they would cost per step with no profiler running, against that step's measured length.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import time

import torch

from megagpt.parallel.trace_ranges import trace_range

NAMED = re.compile(r"^(step \d+|[A-Z]+ mb\d+ c\d+|p2p .*|dp .*|tp .*)$")


def per_call_us(context, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        with context():
            pass
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--trace", help="a profiler trace: count its named ranges per step")
    args = parser.parse_args()
    assert not torch.autograd._profiler_enabled()
    nothing = contextlib.nullcontext()
    peers = {
        "nullcontext": lambda: nothing,  # a `with` that does nothing: the floor
        "trace_range": lambda: trace_range("F mb3 c0"),
        "record_function": lambda: torch.profiler.record_function("F mb3 c0"),
    }
    best = {name: float("inf") for name in peers}
    for _ in range(args.rounds):  # interleaved, the best round of each: the machine's load varies
        for name, context in peers.items():
            best[name] = min(best[name], per_call_us(context, args.calls))
    for name, us in best.items():
        print(f"{name:16s} {us:.3f} us/range")
    print(f"trace_range / nullcontext: {best['trace_range'] / best['nullcontext']:.1f}x")
    print(f"record_function / trace_range: {best['record_function'] / best['trace_range']:.1f}x")
    if args.trace:
        events = json.load(open(args.trace))["traceEvents"]
        ranges = [e for e in events if e.get("cat") == "user_annotation" and NAMED.match(e["name"])]
        steps = [e for e in ranges if e["name"].startswith("step ")]
        per_step = (len(ranges) - len(steps)) / len(steps)
        step_us = sum(e["dur"] for e in steps) / len(steps)
        off_us = per_step * (best["trace_range"] - best["nullcontext"])
        print(
            f"{per_step:.0f} named ranges per step of {step_us / 1e3:.1f} ms: {off_us:.1f} us per step with no "
            f"profiler ({100 * off_us / step_us:.4f}% of the step); as plain record_function "
            f"{per_step * best['record_function']:.0f} us"
        )


if __name__ == "__main__":
    main()
