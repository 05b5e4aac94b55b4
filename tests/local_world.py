"""Run a function in a gloo world of N CPU processes on this machine and collect what each rank returns.

    results = run_world(4, check_something, arg1, arg2)   # check_something(rank, world_size, arg1, arg2)

The multi-process tests (tests/distributed) and the benchmarks (bench/, which put the repository root on sys.path
to import it) use it; it is a test harness, so it lives under tests/ and not in the installed package. The function
must live at module level (spawned processes import it by name). Put several checks into one world: a spawn costs
seconds.
A rank that raises fails the call with its rank and traceback; a rank that dies without a word fails it at once
with its exit code; a world that hangs is killed after `timeout` seconds, naming the ranks that never reported.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import time
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


class WorldError(AssertionError):
    """A rank failed, died or hung (an AssertionError, so a test that runs a world fails like any assertion)."""


DIED = "died"  # what run_world reports for a rank whose process exited without returning (allow_deaths=True)


def run_world(world_size: int, fn, *args, timeout: float = 600.0, allow_deaths: bool = False) -> list:
    """fn(rank, world_size, *args) on every rank of a fresh gloo world; returns the results in rank order.

    With allow_deaths, a process that exits without reporting counts as DIED instead of failing the test."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, results)) for r in range(world_size)]
    for p in procs:
        p.start()
    outcome: dict[int, object] = {}
    try:
        deadline = time.monotonic() + timeout
        while len(outcome) < world_size:
            try:
                rank, status, value = results.get(timeout=1.0)
            except queue.Empty:
                missing = sorted(set(range(world_size)) - set(outcome))
                for r in missing:
                    if procs[r].exitcode is not None and results.empty():
                        if not allow_deaths:
                            raise WorldError(
                                f"rank {r} of a world of {world_size} died with exit code {procs[r].exitcode} "
                                f"without reporting"
                            ) from None
                        outcome[r] = DIED
                if time.monotonic() > deadline:
                    raise WorldError(
                        f"ranks {missing} of a world of {world_size} did not finish in {timeout:.0f}s"
                    ) from None
                continue
            if status == "error":
                # The exception's own line first, so pytest's one-line summary names the rank and the cause.
                cause = value.strip().splitlines()[-1]
                raise WorldError(f"rank {rank} of a world of {world_size} failed: {cause}\n{value}")
            outcome[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [outcome[r] for r in range(world_size)]
