"""ParallelContext: the layout of one process (its groups and device), built once by the launcher and passed down.

This is the only module that creates process groups. Layers receive the `Group` they communicate over as
an argument; there is no global default to fall back to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megagpt.parallel.topology import Topology


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
    device: torch.device

    @property
    def is_logging_rank(self) -> bool:
        return self.rank == 0

    @property
    def coords(self) -> tuple[int, int, int]:
        return self.topology.coords(self.rank)

    @staticmethod
    def single_process(device: torch.device | str = "cpu") -> ParallelContext:
        """One process holding the whole model: every group has one rank."""
        return ParallelContext(Topology(1, 1, 1), 0, Group.solo(), Group.solo(), Group.solo(), torch.device(device))
