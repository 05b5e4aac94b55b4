"""Training samples for a GPT: Megatron-style document shuffling, sample windows, blending, synthetic data.

A ``GPTDataset`` turns the documents of one split of an ``IndexedDataset`` into ``num_samples`` windows of
``seq_length + 1`` tokens (inputs and shifted labels come from the same window). Like Megatron's GPTDataset it
builds three index arrays once and caches them as .npy files:

    document_index  (epochs * docs,)   the split's document ids, shuffled anew for every epoch, concatenated:
                                       the order in which documents form one long token stream
    sample_index    (num_samples + 1, 2)  row k = (position in document_index, token offset in that document)
                                       where window k starts; window k runs to row k + 1 inclusive, so
                                       consecutive windows share one token (the last label of k is the first
                                       input of k + 1) and every stream token is a label exactly once
    shuffle_index   (num_samples,)     the order in which windows are served

Documents already end with the EOD token (tools/preprocess_data.py appends it), so windows that cross a
document boundary see it, as in Megatron and GPT-3. Everything is vectorized numpy: no per-token Python loops.

``build_datasets`` is the entry point the trainer uses: ``data.path`` (or per-split paths), ``data.split`` and
``data.synthetic`` in, (train, valid, test) out.

What follows Megatron Core and what does not (``data.megatron_compat``, on by default):

- the same as Megatron: the .bin/.idx format; split boundaries (data/spec.py); the split unit (sequences, as
  Megatron's GPTDataset, which equals documents for data from tools/preprocess_data.py); each blend component's
  size, ceil(ceil(N * w) * 1.005), and the blend's length, sum(ceil(N * w)); the greedy blend order; weightless
  blends weighted by one epoch of each dataset; per-split paths; windows of seq_length + 1 tokens with one token
  of overlap;
- different, on purpose: the order of windows within a dataset. megagpt shuffles the documents anew for every
  epoch (every document once per epoch; Megatron shuffles all epochs' copies together, so a document can come
  twice before another once) and builds only the first N windows of that stream, not whole epochs with a
  separately shuffled last one. So the same data and seed give the same split and blend sizes as Megatron, but
  not the same samples in the same order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from megagpt.data.indexed_dataset import IndexedDataset, create_temp_file
from megagpt.data.spec import Blend, is_set, parse_blend, parse_split, split_ranges
from megagpt.data.tokenizer import VOCAB_SIZE
from megagpt.errors import DataError

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "valid", "test")
# Bump when the index-building algorithm changes, so stale caches are not reused.
_INDEX_VERSION = 1
# Megatron Core's mid_level_dataset_surplus: each blend component builds 0.5% more samples than its share.
BLEND_SURPLUS = 0.005


def split_documents(num_documents: int, split: str, megatron_compat: bool = True) -> list[tuple[int, int]]:
    """Three contiguous (start, end) ranges for train, valid, test; see data/spec.py's split_ranges."""
    return split_ranges(num_documents, split, megatron_compat)


class GPTDataset(Dataset):
    """``num_samples`` windows of ``seq_length + 1`` tokens over documents ``doc_range`` of ``indexed``.

    ``unit`` says what ``doc_range`` counts and what is shuffled: "document" (megagpt's earlier unit) or
    "sequence" (Megatron's GPTDataset, which splits and shuffles sequences; the same thing for data from
    tools/preprocess_data.py, which writes one sequence per document and none for an empty text).
    ``num_samples=None`` asks for one epoch: every token of the range a label once, (tokens - 1) // seq_length
    windows (Megatron's size for a weightless blend's component).

    ``dataset[i]`` is a LongTensor of seq_length + 1 tokens: inputs ``[:-1]``, labels ``[1:]``.
    The same (data, range, num_samples, seq_length, seed) always gives the same samples in the same order.
    """

    def __init__(
        self,
        indexed: IndexedDataset,
        doc_range: tuple[int, int],
        num_samples: int | None,
        seq_length: int,
        seed: int,
        cache_dir: str | os.PathLike | None = None,
        name: str = "train",
        unit: str = "document",
    ) -> None:
        if unit not in ("document", "sequence"):
            raise ValueError(f"unit must be 'document' or 'sequence', got {unit!r}")
        self.indexed = indexed
        self.unit = unit
        self.doc_range = (int(doc_range[0]), int(doc_range[1]))
        self.seq_length = int(seq_length)
        self.seed = int(seed)
        self.name = name
        # Unit d (a document or a sequence) is tokens[offsets[d]:offsets[d + 1]] of the flat .bin.
        if unit == "document":
            self._doc_offsets = indexed.document_token_offsets()
        else:
            self._doc_offsets = indexed.sequence_token_offsets()
        start, end = self.doc_range
        num_units = len(self._doc_offsets) - 1
        if not 0 <= start <= end <= num_units:
            raise ValueError(f"{unit} range {self.doc_range} outside the {num_units} {unit}s")
        doc_lengths = np.diff(self._doc_offsets[start : end + 1])
        if num_samples is None:
            num_samples = max(int(doc_lengths.sum()) - 1, 0) // max(self.seq_length, 1)
            if num_samples < 1:
                raise DataError(
                    f"the {name} split of {indexed.prefix} holds {int(doc_lengths.sum())} tokens, fewer than one "
                    f"sample of seq_length + 1 = {self.seq_length + 1}; give it more data or drop it from the blend"
                )
        self.num_samples = int(num_samples)
        if self.num_samples < 1 or self.seq_length < 1:
            raise ValueError(f"num_samples ({num_samples}) and seq_length ({seq_length}) must be positive")
        self._check_tokens(int(doc_lengths.sum()))
        self._load_or_build_indices(doc_lengths, cache_dir)

    def _check_tokens(self, tokens_per_epoch: int) -> None:
        """Refuse a split with no tokens or less than one sample of them; warn when it is read many times over."""
        (start, end), unit, name, prefix = self.doc_range, self.unit, self.name, self.indexed.prefix
        if tokens_per_epoch == 0:
            what = f"no {unit}s" if start == end else "no tokens"
            raise DataError(
                f"the {name} split of {prefix} has {what} ({unit}s [{start}, {end})) but "
                f"{self.num_samples} {name} samples are asked for; give {name} a larger share in data.split "
                "(train,valid,test, e.g. '969,30,1') or ask for 0 of its samples."
            )
        if tokens_per_epoch < self.seq_length + 1:
            raise DataError(
                f"the {name} split of {prefix} holds {tokens_per_epoch} tokens, fewer than one sample of "
                f"seq_length + 1 = {self.seq_length + 1}: every sample would repeat the same tokens; give it more "
                f"data (a larger corpus or share in data.split) or a shorter model.seq_length"
            )
        # Said on every run, not only when the indices are built: a small corpus is seen many times over.
        epochs = -(-(self.num_samples * self.seq_length + 1) // tokens_per_epoch)
        if epochs > 1:
            logger.warning(
                "the %s split of %s (%d tokens) is read %d times over for its %d samples: %d epochs",
                name, prefix, tokens_per_epoch, epochs, self.num_samples, epochs,
            )  # fmt: skip

    def _load_or_build_indices(self, doc_lengths: np.ndarray, cache_dir) -> None:
        """The three index arrays from the cache, or built and cached, keyed by everything they depend on."""
        indexed = self.indexed
        cache_dir = os.path.dirname(os.path.abspath(indexed.prefix)) if cache_dir is None else os.fspath(cache_dir)
        description = {
            "class": "GPTDataset",
            "version": _INDEX_VERSION,
            "prefix": os.path.abspath(indexed.prefix),
            "doc_range": list(self.doc_range),
            **({"unit": self.unit} if self.unit != "document" else {}),  # document-unit caches keep their names
            "num_samples": self.num_samples,
            "seq_length": self.seq_length,
            "seed": self.seed,
            # The lengths stand in for the data itself: a re-preprocessed dataset at the same prefix gets new indices.
            "doc_lengths_sha1": hashlib.sha1(doc_lengths.astype(np.int64).tobytes()).hexdigest(),
        }
        stem = f"{os.path.basename(indexed.prefix)}-{self.name}-{_hash(description)}"
        arrays = _load_cached(cache_dir, stem, ("document_index", "sample_index", "shuffle_index"))
        if arrays is None or not self._shapes_ok(*arrays):
            arrays = self._build_indices(doc_lengths)
            _save_cached(cache_dir, stem, dict(zip(("document_index", "sample_index", "shuffle_index"), arrays)))
        self.document_index, self.sample_index, self.shuffle_index = arrays
        self.cache_stem = os.path.join(cache_dir, stem)

    def _shapes_ok(self, document_index, sample_index, shuffle_index) -> bool:
        return sample_index.shape == (self.num_samples + 1, 2) and shuffle_index.shape == (self.num_samples,)

    def _build_indices(self, doc_lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.RandomState(self.seed)
        start, end = self.doc_range
        num_docs = end - start
        tokens_per_epoch = int(doc_lengths.sum())
        # Window k covers stream tokens [k * seq, (k + 1) * seq] inclusive, so num_samples windows need
        # num_samples * seq + 1 tokens: the fewest whole epochs that hold them.
        tokens_needed = self.num_samples * self.seq_length + 1
        num_epochs = -(-tokens_needed // tokens_per_epoch)

        # A fresh permutation per epoch, so every document appears exactly once per epoch. (Megatron shuffles
        # all epochs' copies together, which can serve a document twice before another once.)
        order = np.concatenate([rng.permutation(num_docs) for _ in range(num_epochs)])
        document_index = (order + start).astype(np.int32 if end < 2**31 else np.int64)

        # Where each document of the stream begins, then where each window begins: (stream position, offset).
        stream_lengths = doc_lengths[document_index - start]
        stream_offsets = np.zeros(len(stream_lengths) + 1, dtype=np.int64)
        np.cumsum(stream_lengths, out=stream_offsets[1:])
        starts = np.arange(self.num_samples + 1, dtype=np.int64) * self.seq_length
        # 'right' minus one picks the last document beginning at or before the position, which skips empty
        # documents; every position is < the stream length, so the result is a valid document.
        position = np.searchsorted(stream_offsets, starts, side="right") - 1
        sample_index = np.stack([position, starts - stream_offsets[position]], axis=1)

        shuffle_index = rng.permutation(self.num_samples).astype(np.int64)
        logger.info(
            "built %s indices for %s: %d samples of %d tokens from %d documents x %d epochs",
            self.name,
            self.indexed.prefix,
            self.num_samples,
            self.seq_length + 1,
            num_docs,
            num_epochs,
        )
        return document_index, sample_index, shuffle_index

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for the {self.name} dataset of {self.num_samples}")
        k = int(self.shuffle_index[i])
        (doc_beg, offset_beg), (doc_end, offset_end) = self.sample_index[k], self.sample_index[k + 1]
        tokens = self.indexed.tokens
        parts = []
        for position in range(int(doc_beg), int(doc_end) + 1):  # a loop over documents, never over tokens
            doc = int(self.document_index[position])
            first = self._doc_offsets[doc] + (offset_beg if position == doc_beg else 0)
            last = self._doc_offsets[doc] + offset_end + 1 if position == doc_end else self._doc_offsets[doc + 1]
            parts.append(tokens[first:last])
        sample = np.concatenate(parts).astype(np.int64)
        assert len(sample) == self.seq_length + 1, (len(sample), self.seq_length)
        return torch.from_numpy(sample)


class BlendedDataset(Dataset):
    """Megatron's blend: sample i comes from the dataset whose share so far is furthest below its weight.

    Deterministic greedy error minimisation (Megatron's ``build_blending_indices``): at step i pick
    argmax_d (w_d * max(i, 1) - count_d), first d on ties. Every prefix of the blend matches the weights to
    within a sample per dataset. The seed is part of the cache key only; the blend order itself has no randomness.
    """

    def __init__(
        self,
        datasets: Sequence[Dataset],
        weights: Sequence[float],
        num_samples: int,
        seed: int = 0,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        if len(datasets) != len(weights) or not datasets:
            raise ValueError(f"need one weight per dataset, got {len(datasets)} datasets and {len(weights)} weights")
        total = float(sum(weights))
        if total <= 0 or any(w < 0 for w in weights):
            raise DataError(f"blend weights {list(weights)} must be non-negative with a positive sum; fix data.path.")
        self.datasets = list(datasets)
        self.weights = [float(w) / total for w in weights]
        self.num_samples = int(num_samples)
        self.seed = int(seed)

        description = {"class": "BlendedDataset", "weights": self.weights, "num_samples": self.num_samples}
        description["datasets"] = [getattr(d, "cache_stem", repr(d)) for d in self.datasets]
        stem = f"blend-{_hash(description)}"
        arrays = _load_cached(cache_dir, stem, ("dataset_index", "dataset_sample_index")) if cache_dir else None
        if arrays is None or len(arrays[0]) != self.num_samples:
            arrays = _build_blending_indices(self.weights, self.num_samples)
            if cache_dir:
                _save_cached(cache_dir, stem, {"dataset_index": arrays[0], "dataset_sample_index": arrays[1]})
        self.dataset_index, self.dataset_sample_index = arrays

        needed = np.bincount(self.dataset_index, minlength=len(self.datasets))
        for d, (dataset, count) in enumerate(zip(self.datasets, needed)):
            if count > len(dataset):
                raise ValueError(f"blend component {d} has {len(dataset)} samples but the blend needs {count}")

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for a blend of {self.num_samples}")
        return self.datasets[self.dataset_index[i]][int(self.dataset_sample_index[i])]


def _build_blending_indices(weights: list[float], num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset id, sample index within that dataset) per blended sample, by Megatron's greedy rule.

    Inherently sequential (each pick depends on all earlier ones), so it is a tight pure-Python loop over
    samples: about a second per few million samples; the result is cached by the caller.
    """
    dataset_index = np.empty(num_samples, dtype=np.int16)
    dataset_sample_index = np.empty(num_samples, dtype=np.int64)
    counts = [0] * len(weights)
    candidates = list(enumerate(weights))
    for i in range(num_samples):
        steps = float(max(i, 1))
        best, best_error = 0, -math.inf
        for d, w in candidates:
            error = w * steps - counts[d]
            if error > best_error:
                best, best_error = d, error
        dataset_index[i] = best
        dataset_sample_index[i] = counts[best]
        counts[best] += 1
    return dataset_index, dataset_sample_index


class SyntheticDataset(Dataset):
    """Deterministic random tokens: sample i depends only on (seed, i), never on what else was read.

    For tests and benchmarks that must not depend on a corpus; the loss cannot fall below log(vocab_size).
    """

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int = VOCAB_SIZE, seed: int = 0) -> None:
        self.num_samples = int(num_samples)
        self.seq_length = int(seq_length)
        self.vocab_size = int(vocab_size)
        self.seed = int(seed)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for a synthetic dataset of {self.num_samples}")
        # A fresh generator per sample (seed mixed with a large prime) makes samples independent of access order.
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + i) % 2**63)
        return torch.randint(0, self.vocab_size, (self.seq_length + 1,), generator=generator, dtype=torch.int64)


def build_datasets(
    path: str | Sequence | None,
    split: str,
    seq_length: int,
    seed: int,
    num_samples: tuple[int, int, int],
    cache_dir: str | os.PathLike | None = None,
    synthetic: bool = False,
    vocab_size: int = VOCAB_SIZE,
    megatron_compat: bool = True,
    split_paths: Sequence[str | Sequence | None] | None = None,
) -> tuple[Dataset | None, Dataset | None, Dataset | None]:
    """(train, valid, test) for data.path / data.split (or the per-split paths); a split with 0 samples asked
    for is None.

    ``split_paths`` (Megatron's --train-data-path / --valid-data-path / --test-data-path) gives each split its
    own data, used whole; data.split does not apply then. Every prefix is opened (and so validated) before any
    index is built, so a wrong path fails at once. A blend splits each of its datasets by ``split`` and blends
    the matching splits (sizes in _build_blend).
    """
    if len(num_samples) != 3 or any(int(n) < 0 for n in num_samples):
        raise ValueError(f"num_samples must be three non-negative counts (train, valid, test), got {num_samples}")
    counts = [int(n) for n in num_samples]
    if synthetic:
        # Distinct seeds per split (seed * 3 + k is one-to-one) so validation never replays training samples.
        return tuple(
            SyntheticDataset(n, seq_length, vocab_size, seed * 3 + k) if n > 0 else None for k, n in enumerate(counts)
        )
    whole = split_paths is not None and any(is_set(p) for p in split_paths)
    if whole:
        if is_set(path):
            raise DataError(
                "data.path and the per-split paths (data.train_path, data.valid_path, data.test_path) are both "
                "set; give one or the other"
            )
        blends = [
            parse_blend(p, megatron_compat, f"data.{SPLIT_NAMES[k]}_path") if is_set(p) else None
            for k, p in enumerate(split_paths)
        ]
    else:
        if not is_set(path):
            raise DataError(
                "data.path is empty; set it to a dataset prefix from tools/preprocess_data.py or use data.synthetic."
            )
        parse_split(split)  # a bad split string fails before any file is touched
        blends = [parse_blend(path, megatron_compat)] * 3
    for k, (blend, n) in enumerate(zip(blends, counts)):
        if blend is None and n > 0:
            raise DataError(
                f"{n} {SPLIT_NAMES[k]} samples are asked for but data.{SPLIT_NAMES[k]}_path is not set; set it, "
                "or use data.path with data.split"
            )
    prefixes = dict.fromkeys(p for b in blends if b is not None for p in b.prefixes)
    indexed = {prefix: IndexedDataset(prefix) for prefix in prefixes}
    unit = "sequence" if megatron_compat else "document"

    def make(prefix: str, k: int, n: int | None) -> GPTDataset:
        ds = indexed[prefix]
        num_units = len(ds) if unit == "sequence" else ds.num_documents
        units = (0, num_units) if whole else split_ranges(num_units, split, megatron_compat)[k]
        return GPTDataset(ds, units, n, seq_length, seed, cache_dir, SPLIT_NAMES[k], unit)

    datasets: list[Dataset | None] = []
    for k, (blend, n) in enumerate(zip(blends, counts)):
        if n == 0:
            datasets.append(None)
        elif len(blend.prefixes) == 1 and (blend.weights is None or not megatron_compat):
            datasets.append(make(blend.prefixes[0], k, n))
        else:
            blend_cache = cache_dir if cache_dir is not None else os.path.dirname(os.path.abspath(blend.prefixes[0]))
            datasets.append(_build_blend(blend, n, megatron_compat, lambda p, m, k=k: make(p, k, m), seed, blend_cache))
    return tuple(datasets)


def _build_blend(blend: Blend, n: int, megatron_compat: bool, make, seed: int, cache_dir) -> BlendedDataset:
    """A blend of ``blend``'s datasets for n samples; ``make(prefix, count)`` builds one component.

    - weighted, Megatron's sizes (megatron_compat): component d builds ceil(ceil(n * w_d) * 1.005) samples
      (0.5% surplus) and the blend is sum_d ceil(n * w_d) long, a little longer than n, as in Megatron Core's
      BlendedMegatronDatasetBuilder. A weighted list with one prefix is a blend of one, as there.
    - weighted, megagpt's earlier sizes: ceil(n * w_d * 1.005) + 1 per component, a blend of exactly n.
    - weightless (a list of prefixes): each component is one epoch of its split and the weights are those
      sizes, as in Megatron; asking for more samples than they hold together is refused.
    A dataset with weight 0 is left out (Megatron would build an empty dataset the greedy rule could still
    pick on a tie).
    """
    if blend.weights is None:
        parts = [make(prefix, None) for prefix in blend.prefixes]
        sizes = [len(part) for part in parts]
        if n > sum(sizes):
            raise DataError(
                f"the weightless blend {list(blend.prefixes)} holds {sum(sizes)} samples (one epoch of each "
                f"dataset's split, as Megatron builds it) but {n} are asked for; give weights "
                "([w1, prefix1, w2, prefix2, ...]) so datasets repeat as needed, or train on fewer samples"
            )
        return BlendedDataset(parts, sizes, n, seed, cache_dir=cache_dir)
    weighted = [(w, prefix) for w, prefix in zip(blend.weights, blend.prefixes) if w > 0]
    weights = [w for w, _ in weighted]
    if megatron_compat:
        targets = [math.ceil(n * w) for w in weights]
        parts = [make(prefix, math.ceil(t * (1 + BLEND_SURPLUS))) for t, (_, prefix) in zip(targets, weighted)]
        return BlendedDataset(parts, weights, sum(targets), seed, cache_dir=cache_dir)
    parts = [make(prefix, math.ceil(w * n * (1 + BLEND_SURPLUS)) + 1) for w, prefix in weighted]
    return BlendedDataset(parts, weights, n, seed, cache_dir=cache_dir)


def _hash(description: dict) -> str:
    return hashlib.sha1(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


def _load_cached(cache_dir: str | os.PathLike, stem: str, names: Sequence[str]) -> tuple[np.ndarray, ...] | None:
    paths = [os.path.join(cache_dir, f"{stem}-{name}.npy") for name in names]
    if not all(os.path.isfile(p) for p in paths):
        return None
    try:
        # mmap: every data loader worker and every rank on a node shares one copy in the page cache.
        return tuple(np.load(p, mmap_mode="r", allow_pickle=False) for p in paths)
    except (OSError, ValueError) as e:
        logger.warning("rebuilding unreadable index cache %s: %s", paths[0], e)
        return None


def _save_cached(cache_dir: str | os.PathLike, stem: str, arrays: dict[str, np.ndarray]) -> None:
    """Each array to a temporary file, renamed into place: ranks that race to write the same (deterministic)
    cache never expose a half-written file to each other. A read-only cache_dir only costs a rebuild next time."""
    try:
        os.makedirs(cache_dir, exist_ok=True)
        for name, array in arrays.items():
            final = os.path.join(cache_dir, f"{stem}-{name}.npy")
            fd, tmp = create_temp_file(final)
            try:
                with os.fdopen(fd, "wb") as f:
                    np.save(f, array, allow_pickle=False)
                os.replace(tmp, final)
            except BaseException:
                os.remove(tmp)
                raise
    except OSError as e:
        logger.warning("cannot cache dataset indices in %s (%s); set a writable cache_dir to reuse them", cache_dir, e)
