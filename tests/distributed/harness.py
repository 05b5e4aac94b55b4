"""Run a function in a gloo world of N CPU processes and collect what each rank returns.

    results = run_world(4, check_something, arg1, arg2)   # check_something(rank, world_size, arg1, arg2)

The function must live at module level (spawned processes import it by name). Put several checks into one
world: a spawn costs seconds. A rank that raises fails the test with its rank and traceback; a world that
hangs is killed after `timeout` seconds, naming the ranks that never reported.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import traceback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn, args, results) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    try:
        import datetime

        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)  # N ranks share the machine's cores
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=120))
        try:
            results.put((rank, "ok", fn(rank, world_size, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))


def run_world(world_size: int, fn, *args, timeout: float = 600.0) -> list:
    """fn(rank, world_size, *args) on every rank of a fresh gloo world; returns the results in rank order."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, results)) for r in range(world_size)]
    for p in procs:
        p.start()
    outcome: dict[int, object] = {}
    try:
        while len(outcome) < world_size:
            try:
                rank, status, value = results.get(timeout=timeout)
            except queue.Empty:
                missing = sorted(set(range(world_size)) - set(outcome))
                raise AssertionError(
                    f"ranks {missing} of a world of {world_size} did not finish in {timeout:.0f}s"
                ) from None
            if status == "error":
                raise AssertionError(f"rank {rank} of a world of {world_size} failed:\n{value}")
            outcome[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [outcome[r] for r in range(world_size)]
