"""The .bin/.idx format, byte for byte against Megatron's layout, and its errors."""

import os
import pickle
import struct

import numpy as np
import pytest

from megagpt.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, best_dtype, write_indexed_dataset
from megagpt.errors import DataError

DOCS = [[1, 2, 3], [65535, 0], [], [7, 8, 9, 10]]


def expected_idx_bytes(dtype_code, itemsize, docs):
    """The .idx Megatron writes, composed field by field from its spec (not from our writer)."""
    lengths = [len(d) for d in docs]
    pointers, position = [], 0
    for n in lengths:
        pointers.append(position)
        position += n * itemsize
    document_indices = list(range(len(docs) + 1))  # one sequence per document
    return (
        b"MMIDIDX\x00\x00"
        + struct.pack("<Q", 1)
        + struct.pack("<B", dtype_code)
        + struct.pack("<Q", len(docs))
        + struct.pack("<Q", len(document_indices))  # Megatron stores len(document_indices) = documents + 1
        + struct.pack(f"<{len(lengths)}i", *lengths)
        + struct.pack(f"<{len(pointers)}q", *pointers)
        + struct.pack(f"<{len(document_indices)}q", *document_indices)
    )


def build(prefix, docs, dtype=np.uint16):
    builder = IndexedDatasetBuilder(str(prefix), dtype)
    for doc in docs:
        builder.add_document(doc)
    builder.finalize()
    return str(prefix)


def test_uint16_bytes_match_megatron_spec(tmp_path):
    prefix = build(tmp_path / "d", DOCS)
    assert open(prefix + ".idx", "rb").read() == expected_idx_bytes(8, 2, DOCS)
    tokens = [t for d in DOCS for t in d]
    assert open(prefix + ".bin", "rb").read() == struct.pack(f"<{len(tokens)}H", *tokens)
    # The header is 34 bytes, as Megatron's reader hard-codes for its fast path.
    assert open(prefix + ".idx", "rb").read()[34:38] == struct.pack("<i", 3)


def test_round_trip(tmp_path):
    ds = IndexedDataset(build(tmp_path / "d", DOCS))
    assert len(ds) == 4 and ds.num_documents == 4 and ds.num_tokens == 9
    assert ds.dtype == np.uint16
    assert [ds[i].tolist() for i in range(len(ds))] == DOCS
    assert ds.sequence_lengths.tolist() == [3, 2, 0, 4]
    assert ds.document_indices.tolist() == [0, 1, 2, 3, 4]
    assert ds.get(3, offset=1, length=2).tolist() == [8, 9]
    assert ds.get(3, offset=2).tolist() == [9, 10]
    assert ds.document_token_offsets().tolist() == [0, 3, 5, 5, 9]
    with pytest.raises(IndexError):
        ds.get(0, offset=2, length=2)
    clone = pickle.loads(pickle.dumps(ds))  # data loader workers re-open by prefix
    assert clone[3].tolist() == [7, 8, 9, 10]


def test_big_vocab_uses_int32(tmp_path):
    assert best_dtype(50257) == np.uint16 and best_dtype(65536) == np.uint16
    assert best_dtype(65537) == np.int32 and best_dtype(100277) == np.int32
    docs = [[100_000, 5], [70_000]]
    prefix = build(tmp_path / "big", docs, best_dtype(100277))
    assert open(prefix + ".idx", "rb").read() == expected_idx_bytes(4, 4, docs)
    assert open(prefix + ".bin", "rb").read() == struct.pack("<3i", 100_000, 5, 70_000)
    ds = IndexedDataset(prefix)
    assert ds.dtype == np.int32 and [ds[i].tolist() for i in range(2)] == docs


def test_reads_megatron_multi_sequence_documents(tmp_path):
    # Megatron's --split-sentences writes several sequences per document: 2 documents, sequences (2, 1) and (3).
    lengths, document_indices = [2, 1, 3], [0, 2, 3]
    idx = (
        b"MMIDIDX\x00\x00"
        + struct.pack("<QBQQ", 1, 8, 3, 3)
        + struct.pack("<3i", *lengths)
        + struct.pack("<3q", 0, 4, 6)
        + struct.pack("<3q", *document_indices)
    )
    (tmp_path / "m.idx").write_bytes(idx)
    (tmp_path / "m.bin").write_bytes(struct.pack("<6H", 10, 11, 12, 20, 21, 22))
    ds = IndexedDataset(tmp_path / "m")
    assert len(ds) == 3 and ds.num_documents == 2
    assert ds[1].tolist() == [12]
    assert ds.document_token_offsets().tolist() == [0, 3, 6]


def test_empty_dataset(tmp_path):
    ds = IndexedDataset(build(tmp_path / "e", []))
    assert len(ds) == 0 and ds.num_documents == 0 and ds.num_tokens == 0


def test_missing_files_name_the_prefix(tmp_path):
    with pytest.raises(DataError, match="nothing_here.*preprocess_data"):
        IndexedDataset(tmp_path / "nothing_here")
    prefix = build(tmp_path / "d", DOCS)
    os.remove(prefix + ".bin")
    with pytest.raises(DataError, match=r"d\.bin"):
        IndexedDataset(prefix)


def test_truncated_bin(tmp_path):
    prefix = build(tmp_path / "d", DOCS)
    data = open(prefix + ".bin", "rb").read()
    open(prefix + ".bin", "wb").write(data[:-2])
    with pytest.raises(DataError, match=r"d\.bin.*truncated"):
        IndexedDataset(prefix)


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda idx: b"TNTIDX\x00\x00" + idx[7:],  # another format's magic
        lambda idx: b"garbage!!" + idx[9:],
        lambda idx: idx[:9] + struct.pack("<Q", 2) + idx[17:],  # version 2
        lambda idx: idx[:17] + struct.pack("<B", 9) + idx[18:],  # no such dtype code
        lambda idx: idx[:20],  # shorter than the header
    ],
    ids=["other-magic", "garbage", "version", "dtype-code", "short"],
)
def test_foreign_index_is_rejected(tmp_path, corrupt):
    prefix = build(tmp_path / "d", DOCS)
    idx = open(prefix + ".idx", "rb").read()
    open(prefix + ".idx", "wb").write(corrupt(idx))
    with pytest.raises(DataError, match=r"d\.idx is not a Megatron mmap indexed dataset"):
        IndexedDataset(prefix)


def test_truncated_or_inconsistent_index(tmp_path):
    prefix = build(tmp_path / "d", DOCS)
    idx = open(prefix + ".idx", "rb").read()
    open(prefix + ".idx", "wb").write(idx[:-8])
    with pytest.raises(DataError, match=r"d\.idx.*truncated"):
        IndexedDataset(prefix)
    pointers_at = 34 + 4 * len(DOCS)
    bad_pointer = idx[: pointers_at + 8] + struct.pack("<q", 999) + idx[pointers_at + 16 :]  # second pointer
    open(prefix + ".idx", "wb").write(bad_pointer)
    with pytest.raises(DataError, match=r"d\.idx is corrupt"):
        IndexedDataset(prefix)


def leftovers(folder):
    return sorted(os.listdir(folder))


def test_failed_build_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedDatasetBuilder(tmp_path / "d", np.uint16) as builder:
            builder.add_document([1, 2, 3])
            raise RuntimeError("crash while writing")
    assert leftovers(tmp_path) == []
    with pytest.raises(DataError, match="outside uint16"):
        write_indexed_dataset(tmp_path / "d", [[1, 2], [70_000]])
    assert leftovers(tmp_path) == []


def test_failed_rebuild_keeps_the_old_dataset(tmp_path):
    prefix = build(tmp_path / "d", DOCS)
    with pytest.raises(RuntimeError):
        with IndexedDatasetBuilder(prefix, np.uint16) as builder:
            builder.add_document([4, 4])
            raise RuntimeError("crash")
    assert leftovers(tmp_path) == ["d.bin", "d.idx"]
    assert IndexedDataset(prefix)[0].tolist() == [1, 2, 3]
