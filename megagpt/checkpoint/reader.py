"""Reading a checkpoint folder: its metadata at once, each rank file (checked against its size and sha256) when a
tensor it holds is first asked for, and a parameter's full tensors assembled from their pieces in any layout.

    saved = SavedCheckpoint("runs/ck/step_00000100")   # or paths.open_checkpoint("runs/ck"): its latest
    saved.weight("blocks.0.attn.qkv.weight")           # the fp32 main weight if the run kept one, else the weight
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from megagpt.checkpoint.format import (
    METADATA,
    PIECES_KEY,
    CheckpointError,
    CheckpointMetadata,
    TensorShard,
    fit_vocab_rows,
    rank_file,
    sha256_of,
)


class SavedCheckpoint:
    """A checkpoint folder, read lazily: metadata at once, each rank file (checked against its sha256) when a
    tensor it holds is first asked for."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path / METADATA
        if self.path.is_file():
            raise CheckpointError(
                f"checkpoint {self.path} is a file; give a checkpoint folder (step_N) or a checkpoint.dir to "
                f"checkpoint.load"
            )
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint {self.path} does not exist; check checkpoint.load")
        if not meta_path.exists():
            raise CheckpointError(
                f"{self.path} has no {METADATA}: it is not a complete checkpoint (a save that was interrupted?); "
                f"load an earlier one"
            )
        self.meta = CheckpointMetadata.from_json(meta_path.read_text(), meta_path)
        self._files: dict[str, dict] = {}
        self._index: dict[tuple[str, str], list[tuple[str, int]]] | None = None

    @property
    def step(self) -> int:
        return int(self.meta.step)

    def file(self, name: str) -> dict:
        """A rank file's contents, verified; tensors are memory-mapped, read when used."""
        if name not in self._files:
            path = self.path / name
            expected = self.meta.files.get(name)
            if expected is None:
                raise CheckpointError(f"{path} is not listed in {self.path / METADATA}")
            if not path.exists():
                raise CheckpointError(f"checkpoint file {path} is missing")
            size = path.stat().st_size
            if size != expected["bytes"]:
                raise CheckpointError(
                    f"checkpoint file {path} has {size} bytes, {expected['bytes']} were written: it is truncated "
                    f"or was replaced"
                )
            if sha256_of(path) != expected["sha256"]:
                raise CheckpointError(f"checkpoint file {path} fails its sha256 check: it is corrupt")
            try:
                self._files[name] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
                raise CheckpointError(f"checkpoint file {path} cannot be read safely ({e})") from None
        return self._files[name]

    def rank_payload(self, rank: int) -> dict | None:
        name = rank_file(rank)
        return self.file(name) if name in self.meta.files else None

    def _pieces_index(self) -> dict[tuple[str, str], list[tuple[str, int]]]:
        if self._index is None:
            self._index = {}
            for kind, name, file, position in self.meta.index:
                self._index.setdefault((kind, name), []).append((file, position))
        return self._index

    def has(self, kind: str) -> bool:
        return any(k == kind for k, _ in self._pieces_index())

    def names(self, kind: str) -> list[str]:
        """The parameters that have a tensor of this kind, sorted."""
        return sorted({name for k, name in self._pieces_index() if k == kind})

    def full(self, kind: str, name: str) -> torch.Tensor | None:
        """The whole tensor `kind` of parameter `name`, assembled from its pieces; None if the checkpoint has none."""
        refs = self._pieces_index().get((kind, name))
        if not refs:
            return None
        pieces = [self.file(file)[PIECES_KEY][i] for file, i in refs]
        first = pieces[0]
        dim, tp_size, shape = first["dim"], first["tp_size"], tuple(first["shape"])
        numel = int(torch.Size(shape).numel())
        shards: dict[int, torch.Tensor] = {}
        covered: dict[int, list[tuple[int, int]]] = {}
        for piece in pieces:
            if (piece["dim"], piece["tp_size"], tuple(piece["shape"])) != (dim, tp_size, shape):
                raise CheckpointError(f"{kind} of {name}: its chunks disagree on the tensor-parallel split")
            flat = shards.setdefault(piece["tp_rank"], torch.empty(numel, dtype=piece["data"].dtype))
            flat[piece["start"] : piece["end"]] = piece["data"]
            covered.setdefault(piece["tp_rank"], []).append((piece["start"], piece["end"]))
        wanted = range(tp_size) if dim >= 0 else range(1)
        for tp_rank in wanted:
            position = 0
            for start, end in sorted(covered.get(tp_rank, [])):
                if start > position:
                    break
                position = max(position, end)
            if position < numel:
                raise CheckpointError(
                    f"{kind} of {name}: tensor-parallel shard {tp_rank} is incomplete in {self.path} "
                    f"(elements from {position} of {numel} are in no rank file)"
                )
        if dim < 0:
            return shards[0].view(shape)
        return torch.cat([shards[t].view(shape) for t in range(tp_size)], dim)

    def weight(self, name: str) -> torch.Tensor | None:
        """A parameter's full weight: the fp32 main weight where the saving run kept one (a bf16 model's weight is
        its rounding), else the model weight; None if the checkpoint has neither."""
        main = self.full("main", name)
        return main if main is not None else self.full("weight", name)


def full_weight(saved: SavedCheckpoint, shard: TensorShard, vocab_size: int) -> torch.Tensor | None:
    """saved.weight() of the shard's parameter, its padded vocabulary rows fitted to the shard's layout."""
    return _fitted(saved.weight(shard.name), shard, vocab_size)


def full_state(saved: SavedCheckpoint, kind: str, shard: TensorShard, vocab_size: int) -> torch.Tensor | None:
    """The full optimizer state `kind` (exp_avg, exp_avg_sq) of the shard's parameter, fitted as full_weight."""
    return _fitted(saved.full(kind, shard.name), shard, vocab_size)


def _fitted(full: torch.Tensor | None, shard: TensorShard, vocab_size: int) -> torch.Tensor | None:
    if full is not None and shard.name.endswith("wte.weight"):
        full = fit_vocab_rows(full, shard, vocab_size)
    return full
