"""ParallelContext: the layout of one process (its groups and device), built once by the launcher and passed down.

This is the only module that creates process groups. Layers receive the `Group` they communicate over as
an argument; there is no global default to fall back to.
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megagpt.errors import UserError
from megagpt.parallel.topology import Topology


class RendezvousError(UserError):
    """The ranks did not all meet at the rendezvous within parallel.timeout_s."""


def rendezvous_failure(error: Exception, rank: int, world_size: int, timeout: datetime.timedelta) -> str:
    """One sentence for a failed rendezvous: who, where, how many came, how long it waited."""
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    joined = re.search(r"(\d+)/(\d+) clients joined", str(error))
    came = f"; {joined.group(1)} of {joined.group(2)} ranks joined" if joined else ""
    return (
        f"rank {rank} of a world of {world_size} could not meet the other ranks at {where} within "
        f"{timeout.total_seconds():.0f}s (parallel.timeout_s){came}: {reason}; start every rank with the same "
        f"MASTER_ADDR, MASTER_PORT and world size, and check that rank 0 runs and its port is reachable"
    )


@dataclass(frozen=True)
class Group:
    """The ranks one collective spans, this process's index among them, and the torch ProcessGroup.

    `handle` is None for a group of one rank: collectives over it are no-ops and need no torch.distributed.
    """

    ranks: tuple[int, ...]
    index: int
    handle: object = None

    @property
    def size(self) -> int:
        return len(self.ranks)

    @staticmethod
    def solo(rank: int = 0) -> Group:
        return Group(ranks=(rank,), index=0)


@dataclass(frozen=True)
class ParallelContext:
    topology: Topology
    rank: int
    tp_group: Group
    dp_group: Group
    pp_group: Group
    embedding_group: Group  # first and last pipeline stage: the two holders of the tied token embedding
    world_group: Group
    device: torch.device
    # The world over gloo, for small agreements on CPU tensors (the stop flags each step) that must not wait for
    # the GPU's queue; on CPU runs the world group itself.
    host_group: Group | None = None

    @property
    def host(self) -> Group:
        return self.host_group if self.host_group is not None else self.world_group

    @property
    def is_logging_rank(self) -> bool:
        return self.rank == 0

    @property
    def coords(self) -> tuple[int, int, int]:
        return self.topology.coords(self.rank)

    @staticmethod
    def single_process(device: torch.device | str = "cpu") -> ParallelContext:
        """One process holding the whole model: every group has one rank."""
        solo = Group.solo()
        return ParallelContext(Topology(1, 1, 1), 0, solo, solo, solo, solo, solo, torch.device(device))

    @staticmethod
    def planned(topology: Topology, rank: int, device: torch.device | str = "meta") -> ParallelContext:
        """Rank `rank`'s groups without processes or communication: for building that rank's shards offline (a
        checkpoint resharded for a layout, a layout checked on the meta device). Collectives over it fail."""

        def my_group(rank_lists: list[list[int]]) -> Group:
            for ranks in rank_lists:
                if rank in ranks:
                    return Group(tuple(ranks), ranks.index(rank))
            return Group.solo(rank)

        return ParallelContext(
            topology,
            rank,
            my_group(topology.tp_groups()),
            my_group(topology.dp_groups()),
            my_group(topology.pp_groups()),
            my_group(topology.embedding_groups()),
            Group(tuple(range(topology.world_size)), rank),
            torch.device(device),
        )

    @staticmethod
    def initialize(
        topology: Topology,
        rank: int,
        device: torch.device,
        timeout: datetime.timedelta = datetime.timedelta(minutes=10),
    ) -> ParallelContext:
        """Join the default process group (env://: MASTER_ADDR/MASTER_PORT) and build the tp, dp and pp groups.

        Every rank creates every group, in the same order (torch.distributed requires it), and keeps the ones it
        belongs to. gloo on CPU, nccl on CUDA.
        """
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            # device_id binds the NCCL communicator to this rank's GPU now, not at its first collective.
            device_id = None
            if device.type == "cuda":
                device_id = torch.device(
                    "cuda", device.index if device.index is not None else torch.cuda.current_device()
                )
            try:
                dist.init_process_group(
                    backend, rank=rank, world_size=topology.world_size, timeout=timeout, device_id=device_id
                )
            except dist.DistError as e:  # the rendezvous: a rank that never came, an address nobody listens at
                raise RendezvousError(rendezvous_failure(e, rank, topology.world_size, timeout)) from None
        if dist.get_world_size() != topology.world_size:
            raise ValueError(f"the process group has {dist.get_world_size()} ranks, the layout {topology.world_size}")

        def my_group(rank_lists: list[list[int]]) -> Group:
            mine = Group.solo(rank)  # a middle pipeline stage is in no embedding group
            for ranks in rank_lists:
                handle = dist.new_group(ranks, timeout=timeout) if len(ranks) > 1 else None
                if rank in ranks:
                    mine = Group(tuple(ranks), ranks.index(rank), handle)
            return mine

        tp = my_group(topology.tp_groups())
        dp = my_group(topology.dp_groups())
        pp = my_group(topology.pp_groups())
        embedding = my_group(topology.embedding_groups())
        world = Group(tuple(range(topology.world_size)), rank, dist.group.WORLD)
        host = world
        if dist.get_backend() != "gloo" and world.size > 1:
            host = Group(world.ranks, rank, dist.new_group(list(world.ranks), timeout=timeout, backend="gloo"))
        return ParallelContext(topology, rank, tp, dp, pp, embedding, world, torch.device(device), host)
