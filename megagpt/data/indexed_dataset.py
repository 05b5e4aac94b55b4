"""Megatron-LM's mmap indexed dataset: token ids in ``P.bin``, their layout in ``P.idx``.

Bit-compatible both ways with ``megatron/core/datasets/indexed_dataset.py`` (``IndexedDataset`` /
``IndexedDatasetBuilder``, formerly ``MMapIndexedDataset``), so data preprocessed by either tool trains in the other.

``P.bin`` is every sequence's token ids back to back, in the index's dtype, native little-endian, no header.

``P.idx`` (all integers little-endian)::

    offset  size     field
    0       9        magic b"MMIDIDX\\x00\\x00"
    9       8        version, uint64 = 1
    17      1        dtype code, uint8 (Megatron's DType: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64,
                     6 float64, 7 float32, 8 uint16)
    18      8        S = number of sequences, uint64
    26      8        N = number of entries in document_indices, uint64 (= number of documents + 1)
    34      4*S      sequence_lengths, int32: tokens per sequence
    ...     8*S      sequence_pointers, int64: byte offset of each sequence in P.bin
    ...     8*N      document_indices, int64: sequence index where each document starts, then S;
                     document d is sequences [document_indices[d], document_indices[d + 1])

Megatron's header field at offset 26 is ``len(document_indices)``, i.e. one more than the number of documents.
Our preprocessing writes one sequence per document; Megatron's ``--split-sentences`` writes several, and we
read those too. Megatron's optional multimodal trailer (one int8 mode per sequence) is accepted and ignored.
"""

from __future__ import annotations

import os
import struct
import tempfile
from pathlib import Path

import numpy as np

from megagpt.errors import DataError

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document_indices length
assert _HEADER.size == 34

# Megatron's DType enum: code -> numpy dtype.
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
_CODE_OF_DTYPE = {dtype: code for code, dtype in DTYPE_CODES.items()}

_PREPROCESS_HINT = "create it with `python tools/preprocess_data.py --input FILE --output-prefix PREFIX`"


def index_path(prefix: str | os.PathLike) -> str:
    return f"{os.fspath(prefix)}.idx"


def data_path(prefix: str | os.PathLike) -> str:
    return f"{os.fspath(prefix)}.bin"


def create_temp_file(final_path: str) -> tuple[int, str]:
    """Open a temporary file beside ``final_path`` for an atomic ``os.replace`` later; returns (fd, temp path).

    mkstemp creates mode 0600; we widen it to what a plain ``open`` would give (0666 minus umask) so the
    renamed file is readable by the other users of a shared cluster, as a normally written file would be.
    """
    folder, name = os.path.split(os.path.abspath(final_path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    return fd, tmp


def best_dtype(vocab_size: int) -> np.dtype:
    """The smallest token dtype Megatron can read for ids 0 .. vocab_size - 1: uint16 for GPT-2, else int32."""
    return np.dtype(np.uint16) if vocab_size - 1 <= np.iinfo(np.uint16).max else np.dtype(np.int32)


class IndexedDatasetBuilder:
    """Writes ``P.bin`` / ``P.idx``, one sequence per ``add_document`` call.

    Everything goes to temporary files beside the outputs, renamed into place by ``finalize()``, so an
    interrupted build never leaves a half-written P.bin or P.idx that a later run would mistake for data.
    Use it as a context manager so an exception removes the temporary files::

        with IndexedDatasetBuilder(prefix, np.uint16) as builder:
            for tokens in documents:
                builder.add_document(tokens)
        # finalize() ran on leaving the block without an exception
    """

    def __init__(self, prefix: str | os.PathLike, dtype: np.dtype | type = np.uint16) -> None:
        self.prefix = os.fspath(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODE_OF_DTYPE:
            raise ValueError(
                f"dtype {self.dtype} has no Megatron DType code; use one of {sorted(map(str, _CODE_OF_DTYPE))}"
            )
        folder = os.path.dirname(os.path.abspath(self.prefix))
        try:
            os.makedirs(folder, exist_ok=True)
            fd, self._tmp_bin = create_temp_file(data_path(self.prefix))
        except OSError as e:
            raise DataError(
                f"cannot write {data_path(self.prefix)} ({e.strerror}); choose a writable output prefix."
            ) from None
        self._bin = os.fdopen(fd, "wb")
        self._tmp_idx: str | None = None
        self._sequence_lengths: list[int] = []
        self._document_indices: list[int] = [0]
        self._finalized = False
        # Document ids outside the dtype's range would wrap around silently on the cast below.
        self._limits = np.iinfo(self.dtype) if self.dtype.kind in "iu" else None

    @property
    def num_documents(self) -> int:
        return len(self._document_indices) - 1

    def add_document(self, tokens, sequence_lengths=None) -> None:
        """Append one document (a 1-D sequence of token ids) as a single sequence, or as the sequences
        ``sequence_lengths`` cut it into, as Megatron's builder takes them: sentence-split documents, or ``[]``
        for a document with no sequence (what Megatron's preprocessing writes for an empty text)."""
        array = np.asarray(tokens)
        if array.ndim != 1:
            raise ValueError(f"a document must be a 1-D sequence of token ids, got shape {array.shape}")
        lengths = [int(array.size)] if sequence_lengths is None else [int(n) for n in sequence_lengths]
        if sum(lengths) != array.size or any(n < 0 for n in lengths):
            raise ValueError(f"sequence lengths {lengths} do not cut a document of {array.size} tokens")
        if (
            self._limits is not None
            and array.size
            and (array.min() < self._limits.min or array.max() > self._limits.max)
        ):
            bad = array.max() if array.max() > self._limits.max else array.min()
            raise DataError(
                f"document {self.num_documents} for {data_path(self.prefix)} has token id {int(bad)} outside "
                f"{self.dtype}; build it with best_dtype(vocab_size) instead."
            )
        self._bin.write(array.astype(self.dtype, copy=False).tobytes(order="C"))
        self._sequence_lengths.extend(lengths)
        self._document_indices.append(len(self._sequence_lengths))

    def finalize(self) -> None:
        """Write the index and move both files into place: ``.bin`` first, so a visible ``.idx`` means both are done."""
        if self._finalized:
            return
        try:
            self._write_index_and_rename()
        except BaseException:
            self.abort()
            raise
        self._finalized = True

    def _write_index_and_rename(self) -> None:
        self._bin.close()
        lengths = np.asarray(self._sequence_lengths, dtype=np.int32)
        pointers = _sequence_pointers(lengths, self.dtype.itemsize)
        document_indices = np.asarray(self._document_indices, dtype=np.int64)
        fd, self._tmp_idx = create_temp_file(index_path(self.prefix))
        with os.fdopen(fd, "wb") as f:
            f.write(
                _HEADER.pack(
                    INDEX_MAGIC, INDEX_VERSION, _CODE_OF_DTYPE[self.dtype], len(lengths), len(document_indices)
                )
            )
            f.write(lengths.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(document_indices.tobytes(order="C"))
        # An old P.idx next to the new P.bin would describe the wrong data if we died between the two renames.
        if os.path.exists(index_path(self.prefix)):
            os.remove(index_path(self.prefix))
        os.replace(self._tmp_bin, data_path(self.prefix))
        os.replace(self._tmp_idx, index_path(self.prefix))

    def abort(self) -> None:
        """Drop the temporary files; the outputs are left as they were before this builder started."""
        if self._finalized:
            return
        self._bin.close()
        for path in (self._tmp_bin, self._tmp_idx):
            if path is not None and os.path.exists(path):
                os.remove(path)
        self._finalized = True

    def __enter__(self) -> IndexedDatasetBuilder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


def _sequence_pointers(lengths: np.ndarray, itemsize: int) -> np.ndarray:
    """Byte offset of each sequence in the .bin: the exclusive prefix sum of lengths, in bytes."""
    pointers = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
    return pointers * itemsize


def _header_problem(magic: bytes, version: int, code: int) -> str | None:
    if magic != INDEX_MAGIC:
        return "bad magic"
    if version != INDEX_VERSION:
        return f"version {version}, not {INDEX_VERSION}"
    if code not in DTYPE_CODES:
        return f"unknown dtype code {code}"
    return None


class IndexedDataset:
    """Read-only, memory-mapped view of ``P.bin`` / ``P.idx``; item i is sequence i as a numpy array.

    Opening validates the whole layout (magic, version, dtype, sizes, pointers) so a bad file fails here with
    one sentence, not later inside a data loader worker.
    """

    def __init__(self, prefix: str | os.PathLike) -> None:
        self.prefix = os.fspath(prefix)
        idx_file, bin_file = index_path(self.prefix), data_path(self.prefix)
        for path in (idx_file, bin_file):
            if not os.path.isfile(path):
                if self.prefix.endswith((".bin", ".idx")):
                    raise DataError(f"{path} does not exist; give the dataset prefix without .bin or .idx.")
                raise DataError(f"dataset prefix {self.prefix} has no {path}; {_PREPROCESS_HINT}.")

        idx_size = os.path.getsize(idx_file)
        with open(idx_file, "rb") as f:
            header = f.read(_HEADER.size)
        if len(header) < _HEADER.size:
            raise DataError(f"{idx_file} is not a Megatron mmap indexed dataset (too short); {_PREPROCESS_HINT}.")
        magic, version, code, num_sequences, num_doc_indices = _HEADER.unpack(header)
        reason = _header_problem(magic, version, code)
        if reason:
            raise DataError(f"{idx_file} is not a Megatron mmap indexed dataset ({reason}); {_PREPROCESS_HINT}.")
        self.dtype = DTYPE_CODES[code]

        expected = _HEADER.size + 12 * num_sequences + 8 * num_doc_indices
        # Megatron's multimodal datasets append one int8 mode per sequence; we do not use them.
        if idx_size not in (expected, expected + num_sequences):
            raise DataError(
                f"{idx_file} has {idx_size} bytes but its header describes {expected}; "
                f"the file is truncated or corrupt, so {_PREPROCESS_HINT} again."
            )

        index = np.memmap(idx_file, dtype=np.uint8, mode="r")
        offset = _HEADER.size
        self.sequence_lengths = np.frombuffer(index, dtype=np.int32, count=num_sequences, offset=offset)
        offset += self.sequence_lengths.nbytes
        self.sequence_pointers = np.frombuffer(index, dtype=np.int64, count=num_sequences, offset=offset)
        offset += self.sequence_pointers.nbytes
        self.document_indices = np.frombuffer(index, dtype=np.int64, count=num_doc_indices, offset=offset)

        self._check_layout(idx_file, bin_file)
        # np.memmap refuses empty files; an empty dataset is still a valid dataset.
        num_tokens = int(self.sequence_lengths.sum(dtype=np.int64))
        self.tokens = np.memmap(bin_file, dtype=self.dtype, mode="r") if num_tokens else np.empty(0, self.dtype)

    def _check_layout(self, idx_file: str, bin_file: str) -> None:
        lengths, docs = self.sequence_lengths, self.document_indices
        if (
            len(docs) == 0
            or docs[0] != 0
            or docs[-1] != len(lengths)
            or np.any(np.diff(docs) < 0)
            or np.any(lengths < 0)
            or not np.array_equal(self.sequence_pointers, _sequence_pointers(lengths, self.dtype.itemsize))
        ):
            raise DataError(
                f"{idx_file} is corrupt (inconsistent lengths, pointers or documents); {_PREPROCESS_HINT} again."
            )
        expected = int(lengths.sum(dtype=np.int64)) * self.dtype.itemsize
        actual = os.path.getsize(bin_file)
        if actual != expected:
            raise DataError(
                f"{bin_file} has {actual} bytes but {idx_file} describes {expected}; the .bin is truncated or belongs "
                f"to another index, so {_PREPROCESS_HINT} again."
            )

    @staticmethod
    def exists(prefix: str | os.PathLike) -> bool:
        return os.path.isfile(index_path(prefix)) and os.path.isfile(data_path(prefix))

    def __len__(self) -> int:
        """Number of sequences (equal to the number of documents for data from tools/preprocess_data.py)."""
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``offset : offset + length`` of sequence i (to its end when length is None), without copying."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence {i} out of range for {self.prefix} with {len(self)} sequences")
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize
        size = int(self.sequence_lengths[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens [{offset}, {offset + length}) out of range for sequence {i} of length {size}")
        return self.tokens[start + offset : start + offset + length]

    def sequence_token_offsets(self) -> np.ndarray:
        """int64 array of len(self) + 1 entries: sequence i is ``tokens[offsets[i]:offsets[i + 1]]``.

        Valid because the .bin stores sequences contiguously in order (checked on open via the pointers).
        """
        sequence_offsets = np.zeros(len(self) + 1, dtype=np.int64)
        np.cumsum(self.sequence_lengths, dtype=np.int64, out=sequence_offsets[1:])
        return sequence_offsets

    def document_token_offsets(self) -> np.ndarray:
        """int64 array of num_documents + 1 entries: document d is ``tokens[offsets[d]:offsets[d + 1]]``."""
        return self.sequence_token_offsets()[self.document_indices]

    # Memory maps do not pickle (they would be copied whole); a spawned data loader worker re-opens the files instead.
    def __getstate__(self) -> dict:
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["prefix"])

    def __repr__(self) -> str:
        return (
            f"IndexedDataset({self.prefix!r}, dtype={self.dtype}, documents={self.num_documents}, "
            f"sequences={len(self)}, tokens={self.num_tokens})"
        )


def write_indexed_dataset(prefix: str | os.PathLike, documents, dtype: np.dtype | type = np.uint16) -> Path:
    """Write an iterable of token sequences as P.bin/P.idx, atomically; returns the prefix as a Path."""
    with IndexedDatasetBuilder(prefix, dtype) as builder:
        for tokens in documents:
            builder.add_document(tokens)
    return Path(prefix)
