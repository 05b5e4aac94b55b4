"""The checkpoint format: tensor chunks that say which part of which global tensor they hold, whatever the layout.

A checkpoint is one folder (train/checkpoint.py writes it atomically):

    step_00000100/
      metadata.json      written last: format, step, consumed samples, the layout that saved it, the model config,
                         precision, loss scaler, Adam's step count, each rank file's size and sha256, and an index
                         of which file holds which chunk (so a loading rank opens only the files it needs)
      rank_00000.pt ...  one per rank: {"chunks": [...], "rng": this rank's random states}

A chunk is a piece of one parameter's weight or optimizer state:

    {"kind": "weight" | "exp_avg" | "exp_avg_sq" | "main",   # main: the fp32 main weight of a bf16/fp16 model
     "name": "blocks.5.attn.qkv.weight",                     # global: layer indices do not depend on the stage
     "dim": 0, "tp_rank": 1, "tp_size": 2,                   # tensor parallelism: the shard along dim (-1: whole)
     "shape": [192, 64],                                     # the shard's shape
     "start": 0, "end": 12288,                               # the flat range of the shard it holds (ZeRO-1: a slice)
     "data": tensor}                                         # 1-D, end - start elements

Loading into any layout is then one procedure: assemble a parameter's full tensor from its chunks (each tp shard
from its flat ranges, then the shards concatenated along dim), and cut the loading rank's shard, and its flat
range, out of it. Only the padded vocabulary depends on tp: the embedding's padding rows (never seen by the loss)
are trimmed or zero-filled to the new padded size.

Rank files load with torch.load(weights_only=True): a checkpoint cannot run code. A missing, truncated or altered
file is an error naming it, checked against the size and sha256 in metadata.json.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from megagpt.errors import UserError

FORMAT = 1
METADATA = "metadata.json"


class CheckpointError(UserError):
    """A checkpoint that is missing, incomplete, corrupt, or contradicts the config."""


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


@dataclass(frozen=True)
class TensorShard:
    """How this rank holds a parameter: the global name, its local shape, and the tensor-parallel split."""

    name: str
    shape: tuple[int, ...]
    dim: int  # partition dim, -1 when every tp rank holds it whole
    tp_rank: int
    tp_size: int

    @staticmethod
    def of(name: str, param: torch.Tensor, tp_rank: int, tp_size: int) -> TensorShard:
        split = getattr(param, "tensor_parallel", False) and tp_size > 1
        dim = param.partition_dim if split else -1
        return TensorShard(name, tuple(param.shape), dim, tp_rank if split else 0, tp_size if split else 1)

    def full_shape(self) -> tuple[int, ...]:
        if self.dim < 0:
            return self.shape
        return tuple(n * self.tp_size if d == self.dim else n for d, n in enumerate(self.shape))

    def chunk(self, kind: str, data: torch.Tensor, start: int = 0) -> dict:
        data = data.detach().reshape(-1)
        return {
            "kind": kind,
            "name": self.name,
            "dim": self.dim,
            "tp_rank": self.tp_rank,
            "tp_size": self.tp_size,
            "shape": list(self.shape),
            "start": start,
            "end": start + data.numel(),
            # A copy in host memory: no second copy of the state on the GPU, and no view that would make
            # torch.save write the whole storage it points into (a ZeRO-1 bucket).
            "data": data.to("cpu", copy=True),
        }

    def cut(self, full: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        """This shard's flat range [start, end) out of the full tensor."""
        if self.dim >= 0:
            size = self.shape[self.dim]
            full = full.narrow(self.dim, self.tp_rank * size, size)
        if tuple(full.shape) != self.shape:
            raise CheckpointError(
                f"{self.name}: the checkpoint's tensor gives a shard of {tuple(full.shape)}, "
                f"the model holds {self.shape}"
            )
        return full.reshape(-1)[start:end]


def chunk_index(chunks: list[dict], file: str) -> list[list]:
    """The metadata's index entries of one rank file: [kind, name, file, position in its chunk list]."""
    return [[chunk["kind"], chunk["name"], file, i] for i, chunk in enumerate(chunks)]


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# What every metadata.json must hold, and of which type, before anything reads it.
REQUIRED_METADATA = {
    "step": int,
    "consumed_samples": int,
    "model": dict,
    "layout": dict,
    "files": dict,
    "index": list,
}


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
        try:
            self.meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{meta_path} is not valid JSON ({e}); the checkpoint is damaged") from None
        if not isinstance(self.meta, dict):
            raise CheckpointError(f"{meta_path} holds a {type(self.meta).__name__}, not an object; it is damaged")
        if self.meta.get("format") != FORMAT:
            raise CheckpointError(f"{meta_path} has format {self.meta.get('format')}; this megagpt reads {FORMAT}")
        for key, kind in REQUIRED_METADATA.items():
            if not isinstance(self.meta.get(key), kind):
                what = "lacks" if key not in self.meta else f"has a {type(self.meta[key]).__name__} as"
                raise CheckpointError(
                    f"{meta_path} {what} '{key}' (a {kind.__name__ if isinstance(kind, type) else 'number'} is "
                    f"required): the checkpoint is damaged or was not written by megagpt"
                )
        self._files: dict[str, dict] = {}
        self._index: dict[tuple[str, str], list[tuple[str, int]]] | None = None

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    def file(self, name: str) -> dict:
        """A rank file's contents, verified; tensors are memory-mapped, read when used."""
        if name not in self._files:
            path = self.path / name
            expected = self.meta["files"].get(name)
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
        return self.file(name) if name in self.meta["files"] else None

    def _build_index(self) -> dict[tuple[str, str], list[tuple[str, int]]]:
        index: dict[tuple[str, str], list[tuple[str, int]]] = {}
        for kind, name, file, position in self.meta["index"]:
            index.setdefault((kind, name), []).append((file, position))
        return index

    def has(self, kind: str) -> bool:
        if self._index is None:
            self._index = self._build_index()
        return any(k == kind for k, _ in self._index)

    def full(self, kind: str, name: str) -> torch.Tensor | None:
        """The whole tensor `kind` of parameter `name`, assembled from its chunks; None if the checkpoint has none."""
        if self._index is None:
            self._index = self._build_index()
        refs = self._index.get((kind, name))
        if not refs:
            return None
        chunks = [self.file(file)["chunks"][i] for file, i in refs]
        first = chunks[0]
        dim, tp_size, shape = first["dim"], first["tp_size"], tuple(first["shape"])
        numel = int(torch.Size(shape).numel())
        shards: dict[int, torch.Tensor] = {}
        covered: dict[int, list[tuple[int, int]]] = {}
        for chunk in chunks:
            if (chunk["dim"], chunk["tp_size"], tuple(chunk["shape"])) != (dim, tp_size, shape):
                raise CheckpointError(f"{kind} of {name}: its chunks disagree on the tensor-parallel split")
            flat = shards.setdefault(chunk["tp_rank"], torch.empty(numel, dtype=chunk["data"].dtype))
            flat[chunk["start"] : chunk["end"]] = chunk["data"]
            covered.setdefault(chunk["tp_rank"], []).append((chunk["start"], chunk["end"]))
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


def fit_vocab_rows(full: torch.Tensor, target: TensorShard, vocab_size: int) -> torch.Tensor:
    """The token embedding is padded to a multiple that depends on tp: keep its real rows, trim the padding or
    extend it with zeros (padding rows never reach the loss)."""
    rows = target.full_shape()[0]
    if full.shape[0] == rows:
        return full
    if rows < vocab_size or full.shape[1:] != target.full_shape()[1:]:
        raise CheckpointError(
            f"{target.name}: the checkpoint holds {tuple(full.shape)}, the model {target.full_shape()}"
        )
    if full.shape[0] > rows:
        return full[:rows]
    return torch.cat([full, full.new_zeros(rows - full.shape[0], *full.shape[1:])])
