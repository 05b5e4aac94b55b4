"""What the performance fields of a logged row cost: training steps logged every step (logging.log_interval=1,
TensorBoard on) with the new fields (step time, throughput and MFU per device, memory, the by-tokens TensorBoard
scalars) against the same steps logging only the fields rows had before, in the same process.

    python bench/logging_cost.py [--rounds 10] [--steps 5] [--layers 2] [--hidden 64] [--seq 64] [--batch 8]
                                 [--json PATH]

One trainer (the tiny-cpu preset's shape, or the given one) trains `steps` steps per round through
Trainer.train, once per variant, the variants alternating (which goes first alternates too) so that drifts in the
machine's speed hit both alike; the medians of the rounds' ms/step are compared. The old variant keeps the row's
former fields (loss, lr, grad norm, tokens/s, batch, consumed samples, elapsed) and writes only those. It also
times the new fields' own computation (StepPerformance.fields and memory_fields) alone, per row, and the writing of
a row (console line, metrics.jsonl, TensorBoard) with the new fields and with the old ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

OLD_KEYS = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "global_batch_size", "consumed_samples", "elapsed_s"}


def build(args):
    from megagpt.config import config_from_dict
    from megagpt.data.gpt_dataset import SyntheticDataset
    from megagpt.parallel.context import ParallelContext
    from megagpt.train.run import build_trainer, open_run_folder

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    total = 2 * (args.rounds + 1) * args.steps
    cfg = config_from_dict(
        {"preset": "tiny-cpu"},
        [f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}", f"model.seq_length={args.seq}",
         f"train.global_batch_size={args.batch}", f"train.micro_batch_size={args.batch}", f"train.iters={total}",
         "train.eval_iters=0", f"train.device={device.type}", "logging.log_interval=1",
         "logging.memory_report=false", f"logging.dir={tempfile.mkdtemp(prefix='megagpt-logging-cost-')}"],
    )  # fmt: skip
    data = SyntheticDataset(args.batch * total, args.seq, cfg.model.vocab_size, seed=1)
    metrics = open_run_folder(cfg)
    trainer = build_trainer(cfg, ParallelContext.single_process(device), data, None, metrics)
    return cfg, trainer, metrics


class OldFields:
    """The row's throughput as it was: global tokens/s only."""

    def __init__(self, cfg, world_size, peak):
        self.seq = cfg.model.seq_length

    def fields(self, samples, steps, seconds):
        return {"tokens_per_s": samples * self.seq / seconds}


def run_steps(trainer, cfg, steps: int, old: bool) -> float:
    """Seconds per step of the next `steps` steps, logged every step, in the variant asked for."""
    import megagpt.train.trainer as trainer_module

    saved = trainer_module.StepPerformance, trainer_module.memory_fields, trainer.metrics.write
    if old:
        write = trainer.metrics.write
        trainer_module.StepPerformance = OldFields
        trainer_module.memory_fields = lambda device: {}
        trainer.metrics.write = lambda row: write({k: v for k, v in row.items() if k in OLD_KEYS})
    trainer.cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, iters=trainer.state.step + steps))
    try:
        start = time.perf_counter()
        trainer.train()
        return (time.perf_counter() - start) / steps
    finally:
        trainer_module.StepPerformance, trainer_module.memory_fields, trainer.metrics.write = saved


def fields_alone(cfg, device, repeats: int = 1000) -> float:
    from megagpt.train.metrics import StepPerformance, memory_fields
    from megagpt.train.peaks import Peak

    perf = StepPerformance(cfg, 1, Peak(1.0, "config"))
    start = time.perf_counter()
    for _ in range(repeats):
        perf.fields(cfg.train.global_batch_size, 1, 0.1)
        memory_fields(device)
    return (time.perf_counter() - start) / repeats


def write_cost(row: dict, repeats: int = 100) -> tuple[float, float]:
    """Seconds per MetricsWriter.write (console line, metrics.jsonl, TensorBoard) of `row`, and of the same row cut
    to the old fields, timed alternately into a fresh run folder."""
    from megagpt.train.metrics import MetricsWriter

    writer = MetricsWriter(Path(tempfile.mkdtemp(prefix="megagpt-logging-cost-")), True, total_steps=10**6)
    old_row = {k: v for k, v in row.items() if k in OLD_KEYS}
    times = {"new": 0.0, "old": 0.0}
    for i in range(repeats):
        for name, r in (("new", row), ("old", old_row)):
            start = time.perf_counter()
            writer.write({**r, "step": i + 1})
            times[name] += time.perf_counter() - start
    writer.close()
    return times["new"] / repeats, times["old"] / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cfg, trainer, metrics = build(args)
    device = trainer.ctx.device
    what = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"# {what}; {args.layers} layers, hidden {args.hidden}, seq {args.seq}, batch {args.batch}, logged every step"
    )
    run_steps(trainer, cfg, args.steps, old=False)  # warm-up, and the peak measured once
    times = {"new": [], "old": []}
    for i in range(args.rounds):
        for old in (i % 2 == 0, i % 2 == 1):
            times["old" if old else "new"].append(run_steps(trainer, cfg, args.steps, old))
    metrics.close()
    new, old = statistics.median(times["new"]), statistics.median(times["old"])
    paired = sorted(a / b for a, b in zip(times["new"], times["old"]))  # each round's two variants ran back to back
    alone = fields_alone(cfg, device)
    write_new, write_old = write_cost(trainer.state.history[-1])
    print(f"with the new fields {new * 1e3:8.2f} ms/step")
    print(f"old fields only     {old * 1e3:8.2f} ms/step")
    print(f"ratio new / old     {new / old:8.3f} (medians); per round {statistics.median(paired):.3f} "
          f"(median; range {paired[0]:.3f} to {paired[-1]:.3f})")  # fmt: skip
    print(f"the new fields alone {alone * 1e6:.1f} us per row ({alone / old:.4%} of a step)")
    print(f"writing a row (console, metrics.jsonl, TensorBoard): new {write_new * 1e3:.2f} ms, old "
          f"{write_old * 1e3:.2f} ms; the difference with the fields is {(write_new - write_old + alone) / old:.2%} "
          f"of a step")  # fmt: skip
    if args.json:
        result = {"device": what, "new_s": new, "old_s": old, "ratio": new / old, "paired": paired, "fields_s": alone,
                  "write_new_s": write_new, "write_old_s": write_old}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
