"""Pure rank arithmetic for the (tp, dp, pp) layout; no processes, no torch.distributed.

Ranks are ordered tp fastest, then dp, then pp, so a tensor-parallel group sits inside a node:

    rank = tp_rank + tp * (dp_rank + dp * pp_rank)

Example, tp=2, dp=2, pp=2 (8 ranks):
    tp groups: [0, 1] [2, 3] [4, 5] [6, 7]
    dp groups: [0, 2] [1, 3] [4, 6] [5, 7]
    pp groups: [0, 4] [1, 5] [2, 6] [3, 7]
    embedding groups (first and last pipeline stage, which share the tied embedding): the same as pp here

With pp=4 the pp group [0, 8, 16, 24] has the embedding group [0, 24]; with pp=1 a rank is both stages and
its embedding group is itself.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topology:
    tp: int = 1
    dp: int = 1
    pp: int = 1

    @property
    def world_size(self) -> int:
        return self.tp * self.dp * self.pp

    def rank(self, tp_rank: int, dp_rank: int, pp_rank: int) -> int:
        return tp_rank + self.tp * (dp_rank + self.dp * pp_rank)

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(tp_rank, dp_rank, pp_rank) of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside a world of {self.world_size}")
        return rank % self.tp, (rank // self.tp) % self.dp, rank // (self.tp * self.dp)

    def tp_groups(self) -> list[list[int]]:
        return [[self.rank(t, d, p) for t in range(self.tp)] for p in range(self.pp) for d in range(self.dp)]

    def dp_groups(self) -> list[list[int]]:
        return [[self.rank(t, d, p) for d in range(self.dp)] for p in range(self.pp) for t in range(self.tp)]

    def pp_groups(self) -> list[list[int]]:
        return [[self.rank(t, d, p) for p in range(self.pp)] for d in range(self.dp) for t in range(self.tp)]

    def embedding_groups(self) -> list[list[int]]:
        """First and last stage of each pipeline: they hold the two uses of the tied token embedding."""
        return [sorted({ranks[0], ranks[-1]}) for ranks in self.pp_groups()]
