"""The checkpoint format: tensor pieces that say which part of which global tensor they hold, whatever the layout,
and the metadata that describes a checkpoint (the one place metadata.json is defined, read and written).

A checkpoint is one folder (checkpoint/save.py writes it atomically, checkpoint/publish.py makes it visible):

    step_00000100/
      metadata.json      written last: format, step, consumed samples, the layout that saved it, the model config,
                         precision, loss scaler, Adam's step count, each rank file's size and sha256, and an index
                         of which file holds which piece (so a loading rank opens only the files it needs)
      rank_00000.pt ...  one per rank: {"chunks": [its pieces], "rng": this rank's random states}

A piece is a flat range of one parameter's weight or optimizer state (the range the optimizer calls a piece, or a
whole tensor-parallel shard). On disk a rank file lists its pieces under the key "chunks", the name they had
before a model chunk of the pipeline took that word; the key stays, so every checkpoint ever written still loads:

    {"kind": "weight" | "exp_avg" | "exp_avg_sq" | "main",   # main: the fp32 main weight of a bf16/fp16 model
     "name": "blocks.5.attn.qkv.weight",                     # global: layer indices do not depend on the stage
     "dim": 0, "tp_rank": 1, "tp_size": 2,                   # tensor parallelism: the shard along dim (-1: whole)
     "shape": [192, 64],                                     # the shard's shape
     "start": 0, "end": 12288,                               # the flat range of the shard it holds (ZeRO-1: a slice)
     "data": tensor}                                         # 1-D, end - start elements

Loading into any layout is then one procedure: assemble a parameter's full tensor from its pieces (each tp shard
from its flat ranges, then the shards concatenated along dim), and cut the loading rank's shard, and its flat
range, out of it. Only the padded vocabulary depends on tp: the embedding's padding rows (never seen by the loss)
are trimmed or zero-filled to the new padded size.

Rank files load with torch.load(weights_only=True): a checkpoint cannot run code. A missing, truncated or altered
file is an error naming it, checked against the size and sha256 in metadata.json (checkpoint/reader.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megagpt.errors import UserError
from megagpt.parallel.params import spec_of

FORMAT = 1
METADATA = "metadata.json"
PIECES_KEY = "chunks"  # where a rank file lists its pieces (the on-disk name, kept for old checkpoints)
MOMENTS = ("exp_avg", "exp_avg_sq")  # Adam's state of a parameter, saved per piece


class CheckpointError(UserError):
    """A checkpoint that is missing, incomplete, corrupt, or contradicts the config."""


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def rank_file_payload(pieces: list[dict], rng: dict | None) -> dict:
    """What one rank file holds: its pieces, and its random states (None: re-seeded on load)."""
    return {"format": FORMAT, PIECES_KEY: pieces, "rng": rng}


# data.split's default when checkpoints did not record their data rules yet: a fact of those runs, kept apart from
# today's default (config.py), which may change.
SPLIT_BEFORE_DATA_RULES = "969,30,1"


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
        spec = spec_of(param)
        split = spec.tp_split and tp_size > 1
        dim = spec.tp_split_dim if split else -1
        return TensorShard(name, tuple(param.shape), dim, tp_rank if split else 0, tp_size if split else 1)

    def full_shape(self) -> tuple[int, ...]:
        if self.dim < 0:
            return self.shape
        return tuple(n * self.tp_size if d == self.dim else n for d, n in enumerate(self.shape))

    def piece(self, kind: str, data: torch.Tensor, start: int = 0, copy_out=None) -> dict:
        """The piece of kind `kind` holding data, the flat range [start, start + data.numel()) of this shard.
        copy_out(data) makes its host copy (an asynchronous save's reused buffers); by default a new tensor."""
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
            "data": copy_out(data) if copy_out is not None else data.to("cpu", copy=True),
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


def piece_index(pieces: list[dict], file: str) -> list[list]:
    """The metadata's index entries of one rank file: [kind, name, file, position in its list of pieces]."""
    return [[piece["kind"], piece["name"], file, i] for i, piece in enumerate(pieces)]


def sha256_of(path: Path) -> str:
    """A file's sha256, read back (loading verifies with it; saving hashes while writing: HashingWriter)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class HashingWriter:
    """A binary file that hashes and counts what is written through it: torch.save writes a rank file front to
    back, so its sha256 and size come out of the write itself, without reading the file again (saving 2.4 TB
    once instead of writing it and reading it back). hashlib releases the GIL on large blocks."""

    def __init__(self, file):
        self.file = file
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.bytes += memoryview(data).nbytes
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()

    def record(self) -> dict:
        """The file's entry in metadata.json's files: {"bytes", "sha256"}."""
        return {"bytes": self.bytes, "sha256": self.sha256.hexdigest()}


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


# ----------------------------------------------------------------------------------------------------------------
# metadata.json


def layout_record(tp: int, pp: int, dp: int, vpp: int, zero: int) -> dict:
    """The layout a checkpoint was written for, as metadata.json records it (a load compares it with its own)."""
    return {"tp": tp, "pp": pp, "dp": dp, "vpp": vpp, "zero": zero, "world_size": tp * pp * dp}


def data_rules_of(cfg) -> dict:
    """What decides which samples a run reads and in what order, besides the seed and train_samples."""
    return {"split": cfg.data.split, "megatron_compat": cfg.data.megatron_compat}


# What every metadata.json must hold, and of which type, before anything reads it.
REQUIRED_METADATA = {
    "step": int,
    "consumed_samples": int,
    "model": dict,
    "layout": dict,
    "files": dict,
    "index": list,
}


@dataclass
class CheckpointMetadata:
    """metadata.json: what a checkpoint is (step, data position, model, layout, precision) and what it holds (each
    rank file's size and sha256, and the index of its pieces). Written by training saves, resharding and the
    conversion from Hugging Face alike (to_json), read by every loader (from_json)."""

    step: int
    consumed_samples: int  # the data position: samples the run has trained on
    model: dict  # the model section of the config that trained it
    layout: dict  # layout_record() of the run that wrote it
    train_samples: int | None = None  # the run's total samples: its data shuffle depends on them
    data_rules: dict | None = None  # {"split", "megatron_compat"}: how the run cut and ordered its data
    adam_step: float = 0.0  # Adam's step count (bias correction)
    precision: str = "fp32"
    seed: int = 1234
    loss_scaler: dict | None = None  # fp16's LossScaler.state_dict()
    resharded_from: dict | None = None  # {"path", "layout"} of the checkpoint resharding read
    converted_from: dict | None = None  # {"path", "model_type"} of the Hugging Face model it was converted from
    files: dict = field(default_factory=dict)  # {rank file: {"bytes", "sha256"}}
    index: list = field(default_factory=list)  # piece_index() entries of every rank file
    format: int = FORMAT

    # Written only when set, so that a checkpoint's metadata.json says nothing of what did not happen to it (or,
    # for data_rules, of data it was not trained on).
    PROVENANCE = ("resharded_from", "converted_from", "data_rules")
    ORDER = ("format", "step", "consumed_samples", "train_samples", "adam_step", "layout", "precision", "seed",
             "model", "loss_scaler", *PROVENANCE, "files", "index")  # fmt: skip

    def trained_data_rules(self) -> dict:
        """How the run that wrote this cut its splits and ordered its samples. Without a record: a checkpoint that
        trained from before data.megatron_compat existed (megagpt's earlier rules, the default split), or one that
        never trained here (converted from Hugging Face: today's defaults)."""
        if self.data_rules is not None:
            return dict(self.data_rules)
        trained_before = self.consumed_samples > 0 and self.converted_from is None
        return {"split": SPLIT_BEFORE_DATA_RULES, "megatron_compat": not trained_before}

    def to_json(self) -> str:
        values = dataclasses.asdict(self)
        record = {key: values[key] for key in self.ORDER if key not in self.PROVENANCE or values[key] is not None}
        return json.dumps(record, indent=1)

    @classmethod
    def from_json(cls, text: str, where: Path) -> CheckpointMetadata:
        """The metadata in text (the contents of where), checked: a damaged or foreign file is an error naming
        what is wrong with it, not a KeyError in a loader."""
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{where} is not valid JSON ({e}); the checkpoint is damaged") from None
        if not isinstance(record, dict):
            raise CheckpointError(f"{where} holds a {type(record).__name__}, not an object; it is damaged")
        if record.get("format") != FORMAT:
            raise CheckpointError(f"{where} has format {record.get('format')}; this megagpt reads {FORMAT}")
        for key, kind in REQUIRED_METADATA.items():
            if not isinstance(record.get(key), kind):
                what = "lacks" if key not in record else f"has a {type(record[key]).__name__} as"
                raise CheckpointError(
                    f"{where} {what} '{key}' (a {kind.__name__ if isinstance(kind, type) else 'number'} is "
                    f"required): the checkpoint is damaged or was not written by megagpt"
                )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(key for key in record if key not in known)
        if unknown:
            raise CheckpointError(
                f"{where} holds {', '.join(repr(key) for key in unknown)}, which no megagpt writes: the checkpoint "
                f"is damaged or was not written by megagpt"
            )
        return cls(**record)
