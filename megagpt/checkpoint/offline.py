"""Writing a checkpoint from one process, rank file by rank file (resharding, conversion from Hugging Face), with
the same temporary folder, metadata, atomic publish and `latest` as a training run's save."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from megagpt.checkpoint.format import CheckpointMetadata, piece_index, rank_file, rank_file_payload
from megagpt.checkpoint.paths import complete_checkpoints, process_tag, step_folder, temporary_folder
from megagpt.checkpoint.publish import publish_checkpoint, write_rank_file
from megagpt.errors import UserError


class OfflineCheckpointWriter:
    """Writes a checkpoint folder from one process, rank file by rank file (tools: resharding, conversion), with
    the same atomic publish and `latest` as a training run's save."""

    def __init__(self, root: str | Path, step: int):
        self.root = Path(root)
        existing = complete_checkpoints(self.root) if self.root.is_dir() else []
        if existing:  # a training run's folder: publishing here would repoint its latest (and may replace a step)
            raise UserError(
                f"{self.root} already holds {len(existing)} checkpoint(s) (newest {existing[-1].name}); write into a "
                f"new or empty folder"
            )
        self.final = self.root / step_folder(step)
        self.tmp = temporary_folder(self.root, step, process_tag())
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.files: dict[str, dict] = {}
        self.index: list[list] = []

    def add_rank(self, rank: int, pieces: list[dict]) -> None:
        path = self.tmp / rank_file(rank)
        self.files[path.name] = write_rank_file(rank_file_payload(pieces, None), path)  # rng None: seeded on load
        self.index += piece_index(pieces, path.name)

    def finish(self, metadata: CheckpointMetadata) -> Path:
        """Publish the folder with metadata (its files and index replaced by what was written here)."""
        return publish_checkpoint(
            self.tmp, self.final, dataclasses.replace(metadata, files=self.files, index=self.index)
        )
