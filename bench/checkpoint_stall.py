"""How long a checkpoint save stalls the training loop, synchronous against asynchronous (checkpoint.async_save),
and which background writer, a thread or a process, slows the training steps less: measured in the same run.

    python bench/checkpoint_stall.py [--layers 8] [--hidden 1024] [--seq 32] [--steps 8] [--save-every 2]
                                     [--writer-steps 3] [--dir PATH] [--json PATH]

Part 1, the stall. megagpt trains (pretrain, one process, fp32 on CPU, dense attention, synthetic tokens) a model
whose checkpoint state (weights and Adam's two moments: 12 bytes a parameter) is over 1 GB, saving every
--save-every steps, once synchronously and once with checkpoint.async_save=true. The training loop's stall of a
save is the time it spends in the checkpointer (Checkpointer.after_step, timed every step) on save steps, less
what a step without a save spends there, per save: for async saves it holds the copy-out, any wait for the save
before, and the publish at a later step boundary. The wait for the last save at the end of training is reported
apart (no step follows it). Also: the median training step (train_step) of each run, where the async run's steps
include those during which a writer ran.

Part 2, thread or process. One rank state is copied out (HostBuffers, as the async save does) and written by
save.write_files (serialise, hash while writing, fsync) (a) in a thread, (b) in a persistent process started
beforehand (spawn) that receives the buffers in shared memory; meanwhile the training thread keeps taking
train_step()s. Reported: the median step while each writer runs, against the median step with no writer, and
how long each write took. The machine is shared: compare the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

VOCAB = 50257


def config(args, run_dir: Path, *extra: str):
    from megagpt.config import config_from_dict

    overrides = [
        f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}", f"model.num_heads={args.heads}",
        f"model.seq_length={args.seq}", f"model.vocab_size={VOCAB}", "model.attention_pattern=[dense]",
        "model.dropout=0.0", "train.global_batch_size=1", "train.micro_batch_size=1", f"train.iters={args.steps}",
        "train.eval_iters=0", "data.synthetic=true", f"logging.dir={run_dir / 'run'}", "logging.tensorboard=false",
        "logging.memory_report=false", f"logging.log_interval={args.steps}", *extra,
    ]  # fmt: skip
    return config_from_dict({"preset": "tiny-cpu"}, overrides)


def timed_run(args, root: Path, async_save: bool) -> dict:
    """Part 1: one training run saving every --save-every steps; the checkpointer's time per step."""
    from megagpt.parallel.context import ParallelContext
    from megagpt.train.run import pretrain
    from megagpt.train.run_control import Checkpointer
    from megagpt.train.trainer import Trainer

    after_step, finish, train_step = Checkpointer.after_step, Checkpointer.finish_saving, Trainer.train_step
    in_checkpointer, at_end, steps = {}, [], []

    def timed_after_step(self, trainer, before_save=None):
        start = time.perf_counter()
        try:
            return after_step(self, trainer, before_save)
        finally:
            in_checkpointer[trainer.state.step] = time.perf_counter() - start

    def timed_finish(self):
        start = time.perf_counter()
        finish(self)
        at_end.append(time.perf_counter() - start)

    def timed_train_step(self):
        start = time.perf_counter()
        result = train_step(self)
        steps.append(time.perf_counter() - start)
        return result

    Checkpointer.after_step, Checkpointer.finish_saving, Trainer.train_step = (
        timed_after_step,
        timed_finish,
        timed_train_step,
    )
    ck = root / ("ck_async" if async_save else "ck_sync")
    try:
        cfg = config(args, root / ck.name, f"checkpoint.dir={ck}", f"checkpoint.save_interval={args.save_every}",
                     "checkpoint.keep=1", f"checkpoint.async_save={str(async_save).lower()}")  # fmt: skip
        pretrain(cfg, ParallelContext.single_process())
    finally:
        Checkpointer.after_step, Checkpointer.finish_saving, Trainer.train_step = after_step, finish, train_step
    saves = [s for s in in_checkpointer if s % args.save_every == 0]
    others = [t for s, t in in_checkpointer.items() if s % args.save_every != 0]
    baseline = min(others) if others else 0.0  # not the median: an async run publishes on steps between saves
    # The async run's publish lands on the step after a save: count every step's excess, not only save steps'.
    excess = sum(t - baseline for t in in_checkpointer.values())
    shutil.rmtree(ck, ignore_errors=True)
    return {
        "saves": len(saves),
        "stall_per_save_s": excess / len(saves),
        "checkpointer_on_save_steps_s": [round(in_checkpointer[s], 3) for s in saves],
        "final_wait_s": at_end[-1],
        "median_step_s": statistics.median(steps),
    }


def process_writer(jobs, done) -> None:
    """Part 2's writer process: write each (pieces, rng, path) it is sent, report the record."""
    from megagpt.checkpoint.save import write_files

    done.put("ready")
    while (job := jobs.get()) is not None:
        done.put(write_files(*job))


def steps_while(trainer, running, min_steps: int) -> list[float]:
    """Training steps taken while running() (at least min_steps), each timed."""
    times = []
    while running() or len(times) < min_steps:
        start = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - start)
    return times


def thread_or_process(args, root: Path) -> dict:
    """Part 2: the median step with no writer, with a writer thread, with a writer process."""
    import torch.multiprocessing as mp

    from megagpt.checkpoint.async_save import HostBuffers
    from megagpt.checkpoint.rank_state import random_states, rank_pieces
    from megagpt.checkpoint.save import write_files
    from megagpt.parallel.context import ParallelContext
    from megagpt.train.run import build_data, build_trainer

    cfg = config(args, root / "part2", "train.iters=1000")
    trainer = build_trainer(cfg, ParallelContext.single_process(), *build_data(cfg), None)
    trainer.train_step()  # warm-up, and Adam's moments exist
    buffers = HostBuffers()
    buffers.start()
    pieces = rank_pieces(trainer, buffers.copy)
    buffers.finish()
    state_gb = buffers.nbytes() / 1e9
    rng = random_states(trainer)
    ctx = mp.get_context("spawn")
    jobs, done = ctx.Queue(), ctx.Queue()
    worker = ctx.Process(target=process_writer, args=(jobs, done), daemon=True)
    worker.start()
    assert done.get(timeout=600) == "ready"  # its start (importing torch) is not part of a write
    for b in buffers.buffers:
        b.share_memory_()  # once, as a process writer's reused buffers would be made
    (root / "part2").mkdir(parents=True, exist_ok=True)

    idle = steps_while(trainer, lambda: False, args.writer_steps)
    start = time.perf_counter()
    thread = threading.Thread(target=write_files, args=(pieces, rng, root / "part2" / "thread.pt"))
    thread.start()
    with_thread = steps_while(trainer, thread.is_alive, args.writer_steps)
    thread_write = time.perf_counter() - start
    thread.join()

    start, record = time.perf_counter(), []
    jobs.put((pieces, rng, root / "part2" / "process.pt"))
    waiter = threading.Thread(target=lambda: record.append(done.get()))
    waiter.start()
    with_process = steps_while(trainer, waiter.is_alive, args.writer_steps)
    process_write = time.perf_counter() - start
    jobs.put(None)
    worker.join(timeout=60)
    return {
        "state_gb": round(state_gb, 3),
        "median_step_idle_s": statistics.median(idle),
        "median_step_with_thread_s": statistics.median(with_thread),
        "median_step_with_process_s": statistics.median(with_process),
        "thread_write_s": thread_write,
        "process_write_s": process_write,
        "steps": {"idle": len(idle), "thread": len(with_thread), "process": len(with_process)},
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--save-every", type=int, default=2)
    parser.add_argument("--writer-steps", type=int, default=3, help="part 2: at least this many steps per case")
    parser.add_argument("--dir", default=None, help="where checkpoints are written (default: a temporary folder)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="megagpt-ckstall-", dir=args.dir))
    params = args.layers * 12 * args.hidden**2 + VOCAB * args.hidden + args.seq * args.hidden
    print(f"model: {args.layers} layers, hidden {args.hidden}: ~{params / 1e6:.0f}M parameters, "
          f"~{params * 12 / 1e9:.2f} GB of checkpoint state (fp32 weights + Adam's moments)")  # fmt: skip
    try:
        results = {"sync": timed_run(args, root, False), "async": timed_run(args, root, True)}
        results["writer"] = thread_or_process(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    sync, asyn, writer = results["sync"], results["async"], results["writer"]
    ratio = asyn["stall_per_save_s"] / sync["stall_per_save_s"]
    print(f"stall per save: sync {sync['stall_per_save_s']:.2f}s, async {asyn['stall_per_save_s']:.2f}s "
          f"(async/sync {ratio:.3f}); async's wait at the end {asyn['final_wait_s']:.2f}s; median step: sync run "
          f"{sync['median_step_s']:.2f}s, async run {asyn['median_step_s']:.2f}s")  # fmt: skip
    idle = writer["median_step_idle_s"]
    print(f"state {writer['state_gb']:.2f} GB; median step: no writer {idle:.2f}s, writer thread "
          f"{writer['median_step_with_thread_s']:.2f}s (x{writer['median_step_with_thread_s'] / idle:.2f}, write "
          f"{writer['thread_write_s']:.1f}s), writer process {writer['median_step_with_process_s']:.2f}s "
          f"(x{writer['median_step_with_process_s'] / idle:.2f}, write {writer['process_write_s']:.1f}s); "
          f"steps {writer['steps']}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
