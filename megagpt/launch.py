"""Which process am I? Rank discovery from the launcher's environment.

Plain `python` is one process. torchrun sets RANK, WORLD_SIZE and LOCAL_RANK (with MASTER_ADDR/MASTER_PORT).
A partial set of these variables is an error rather than a guess.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from megagpt.errors import UserError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class LaunchInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int  # processes on this node
    source: str  # "single process" or "torchrun"


def _int_env(env: dict, name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise UserError(
            f"environment variable {name}={env[name]!r} is not an integer; fix the launch command"
        ) from None


def discover_launch(env: dict | None = None) -> LaunchInfo:
    env = dict(os.environ) if env is None else env
    present = [name for name in TORCHRUN_VARS if name in env]
    if not present:
        return LaunchInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, source="single process")
    if len(present) != len(TORCHRUN_VARS):
        missing = [name for name in TORCHRUN_VARS if name not in env]
        raise UserError(
            f"the environment sets {', '.join(present)} but not {', '.join(missing)}; launch with torchrun, "
            f"or unset these variables to run one process"
        )
    rank, world_size, local_rank = (_int_env(env, name) for name in TORCHRUN_VARS)
    if not 0 <= rank < world_size:
        raise UserError(f"RANK={rank} is outside WORLD_SIZE={world_size}; fix the launch command")
    local_world_size = _int_env(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else world_size
    return LaunchInfo(rank, world_size, local_rank, local_world_size, source="torchrun")


def resolve_device(requested: str, local_rank: int, local_world_size: int = 1) -> torch.device:
    """train.device: auto -> cuda:local_rank when a GPU is present, else cpu. Each local rank takes its own GPU."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
        if local_world_size > torch.cuda.device_count():
            raise UserError(
                f"{local_world_size} processes on this node but {torch.cuda.device_count()} visible GPUs; launch at "
                f"most {torch.cuda.device_count()} per node (--nproc_per_node) or use train.device=cpu"
            )
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def set_cpu_threads(local_world_size: int) -> None:
    """Share the node's cores among its processes, so N ranks on one CPU do not oversubscribe it."""
    cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // local_world_size))
