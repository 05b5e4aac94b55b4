"""GPT samples: windows over the shuffled document stream, splits, the index cache, blending, synthetic data."""

import math
import os

import numpy as np
import pytest
import torch

from megagpt.data.gpt_dataset import (
    BlendedDataset,
    GPTDataset,
    SyntheticDataset,
    build_datasets,
    split_documents,
)
from megagpt.data.indexed_dataset import IndexedDataset, write_indexed_dataset
from megagpt.errors import DataError

SEQ = 16


@pytest.fixture
def corpus(tmp_path):
    """30 documents of 0..40 tokens (some empty); token value = its position in the .bin, so every token is unique."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 41, size=30)
    lengths[[3, 17]] = 0
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    docs = [np.arange(offsets[d], offsets[d + 1]) for d in range(30)]
    prefix = tmp_path / "data" / "corpus"
    write_indexed_dataset(prefix, docs, np.int32)
    return IndexedDataset(prefix), docs


def make(indexed, doc_range=(0, 30), num_samples=200, seed=1234, cache_dir=None, name="train"):
    return GPTDataset(indexed, doc_range, num_samples, SEQ, seed, cache_dir, name)


def npy_files(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith(".npy"))


def test_samples_are_windows_of_the_shuffled_stream(corpus, tmp_path):
    indexed, docs = corpus
    start, end = 5, 25
    ds = make(indexed, (start, end), num_samples=200, cache_dir=tmp_path / "cache")
    num_docs = end - start

    # The document order is one fresh permutation of the split's documents per epoch.
    order = np.asarray(ds.document_index)
    assert len(order) % num_docs == 0
    for epoch in order.reshape(-1, num_docs):
        assert sorted(epoch.tolist()) == list(range(start, end))

    stream = np.concatenate([docs[d] for d in order])
    assert len(stream) >= 200 * SEQ + 1
    served = []
    for i in range(len(ds)):
        sample = ds[i]
        assert sample.dtype == torch.int64 and sample.shape == (SEQ + 1,)
        k = int(ds.shuffle_index[i])
        # Window k starts at stream token k * SEQ: consecutive windows share one token.
        assert sample.tolist() == stream[k * SEQ : k * SEQ + SEQ + 1].tolist()
        served.append(k)
    assert sorted(served) == list(range(200))  # every window exactly once
    assert served != list(range(200))  # in a shuffled order


def test_determinism_and_seed(corpus, tmp_path):
    indexed, _ = corpus
    a = make(indexed, seed=7, cache_dir=tmp_path / "a")
    b = make(indexed, seed=7, cache_dir=tmp_path / "b")  # built anew elsewhere: same samples
    c = make(indexed, seed=8, cache_dir=tmp_path / "c")
    assert all(torch.equal(a[i], b[i]) for i in range(len(a)))
    assert any(not torch.equal(a[i], c[i]) for i in range(len(a)))


def test_split_ranges():
    # megagpt's earlier rule (data.megatron_compat=false): each part rounded on its own.
    def old(n, split):
        return split_documents(n, split, megatron_compat=False)

    assert old(1000, "969,30,1") == [(0, 969), (969, 999), (999, 1000)]
    assert old(42, "969,30,1") == [(0, 41), (41, 42), (42, 42)]
    assert old(42, "95,5,0") == [(0, 40), (40, 42), (42, 42)]
    assert old(10, "1") == [(0, 10), (10, 10), (10, 10)]
    assert old(10, "0.98, 0.02") == [(0, 10), (10, 10), (10, 10)]
    # 3.33 rounds to 3 three times; the shortfall shifts every boundary after the first.
    assert old(10, "1,1,1") == [(0, 4), (4, 7), (7, 10)]
    assert old(0, "969,30,1") == [(0, 0), (0, 0), (0, 0)]
    for bad in ("", "a,b", "1,2,3,4", "0,0,0", "-1,2"):
        for compat in (True, False):
            with pytest.raises(DataError, match="data.split"):
                split_documents(10, bad, compat)


def test_cache_is_reused(corpus, tmp_path, monkeypatch):
    indexed, _ = corpus
    first = make(indexed, cache_dir=tmp_path / "cache")
    files = npy_files(tmp_path / "cache")
    assert len(files) == 3
    mtimes = [os.stat(tmp_path / "cache" / f).st_mtime_ns for f in files]

    def no_rebuild(self, doc_lengths):
        raise AssertionError("indices were rebuilt instead of loaded from the cache")

    monkeypatch.setattr(GPTDataset, "_build_indices", no_rebuild)
    second = make(indexed, cache_dir=tmp_path / "cache")
    assert npy_files(tmp_path / "cache") == files
    assert [os.stat(tmp_path / "cache" / f).st_mtime_ns for f in files] == mtimes
    assert all(torch.equal(first[i], second[i]) for i in range(len(first)))


def test_cache_is_keyed_by_every_input(corpus, tmp_path):
    indexed, _ = corpus
    cache = tmp_path / "cache"
    make(indexed, cache_dir=cache)
    variants = [dict(seed=99), dict(num_samples=201), dict(doc_range=(0, 29)), dict(name="valid")]
    for n, variant in enumerate(variants, start=2):
        make(indexed, cache_dir=cache, **variant)
        assert len(npy_files(cache)) == 3 * n, variant
    GPTDataset(indexed, (0, 30), 200, SEQ + 1, 1234, cache, "train")  # seq_length
    assert len(npy_files(cache)) == 3 * (len(variants) + 2)


def test_default_cache_is_beside_the_data(corpus):
    indexed, _ = corpus
    make(indexed)
    assert len(npy_files(os.path.dirname(indexed.prefix))) == 3


def test_empty_split_asked_for_samples(corpus, tmp_path):
    indexed, _ = corpus
    with pytest.raises(DataError, match="valid split.*no documents.*data.split"):
        make(indexed, (30, 30), name="valid", cache_dir=tmp_path)
    with pytest.raises(DataError, match="test split.*no tokens.*data.split"):
        make(indexed, (3, 4), name="test", cache_dir=tmp_path)  # document 3 is empty


def test_a_split_shorter_than_one_sample_is_refused_and_repeats_are_said_every_run(corpus, tmp_path, caplog):
    indexed, docs = corpus
    short = next(d for d, doc in enumerate(docs) if 0 < len(doc) <= SEQ)
    with pytest.raises(DataError, match=rf"holds {len(docs[short])} tokens, fewer than one sample of seq_length \+ 1"):
        make(indexed, (short, short + 1), cache_dir=tmp_path)
    tokens = sum(len(doc) for doc in docs)
    epochs = -(-(200 * SEQ + 1) // tokens)
    assert epochs > 1
    for _ in range(2):  # built, then loaded from the cache: said both times
        caplog.clear()
        with caplog.at_level("WARNING"):
            make(indexed, cache_dir=tmp_path)
        assert f"({tokens} tokens) is read {epochs} times over for its 200 samples" in caplog.text


def test_blend_realizes_weights():
    parts = [SyntheticDataset(10_000, 4, 100, seed=s) for s in range(3)]
    blend = BlendedDataset(parts, [5, 3, 2], 10_000, seed=0)  # weights are normalized
    index = np.asarray(blend.dataset_index)
    for prefix in (100, 1000, 10_000):
        shares = np.bincount(index[:prefix], minlength=3) / prefix
        assert np.allclose(shares, [0.5, 0.3, 0.2], atol=0.01), (prefix, shares)
    # Each component is read in order 0, 1, 2, ... and samples come from the right component.
    for d in range(3):
        assert np.asarray(blend.dataset_sample_index)[index == d].tolist() == list(range(int((index == d).sum())))
    assert torch.equal(blend[7], parts[index[7]][int(blend.dataset_sample_index[7])])
    again = BlendedDataset(parts, [0.5, 0.3, 0.2], 10_000, seed=0)
    assert np.array_equal(again.dataset_index, blend.dataset_index)


def test_blend_follows_megatrons_greedy_rule():
    # Step i picks argmax_d w_d * max(i, 1) - count_d, the first dataset on ties (hand-computed).
    parts = [SyntheticDataset(10, 4, 100), SyntheticDataset(10, 4, 100)]
    assert BlendedDataset(parts, [0.75, 0.25], 8).dataset_index.tolist() == [0, 1, 0, 0, 0, 1, 0, 0]
    assert BlendedDataset(parts, [1, 1], 6).dataset_index.tolist() == [0, 1, 0, 1, 0, 1]


def test_synthetic_sample_depends_only_on_seed_and_index():
    forward = SyntheticDataset(50, SEQ, 1000, seed=3)
    backward = SyntheticDataset(50, SEQ, 1000, seed=3)
    late = backward[49]
    samples = [forward[i] for i in range(50)]
    assert torch.equal(samples[49], late)
    assert all(torch.equal(samples[i], backward[i]) for i in reversed(range(50)))
    assert all(s.shape == (SEQ + 1,) and s.dtype == torch.int64 and 0 <= s.min() and s.max() < 1000 for s in samples)
    assert not torch.equal(samples[0], SyntheticDataset(50, SEQ, 1000, seed=4)[0])
    assert not torch.equal(samples[0], samples[1])


def test_build_datasets_single_prefix(corpus, tmp_path):
    indexed, _ = corpus
    train, valid, test = build_datasets(
        str(indexed.prefix), "80,20,0", SEQ, 1, (100, 10, 0), cache_dir=tmp_path, megatron_compat=False
    )
    assert test is None
    assert isinstance(train, GPTDataset) and train.doc_range == (0, 24) and len(train) == 100
    assert isinstance(valid, GPTDataset) and valid.doc_range == (24, 30) and len(valid) == 10


def test_build_datasets_blend(corpus, tmp_path):
    indexed, docs = corpus
    other = tmp_path / "other"
    write_indexed_dataset(other, [d + 10_000 for d in docs], np.int32)
    blend = [0.3, indexed.prefix, 0.7, str(other)]
    train, valid, _ = build_datasets(blend, "90,10,0", SEQ, 1, (500, 20, 0), tmp_path, megatron_compat=False)
    assert isinstance(train, BlendedDataset) and len(train) == 500
    assert [len(d) for d in train.datasets] == [math.ceil(0.3 * 500 * 1.005) + 1, math.ceil(0.7 * 500 * 1.005) + 1]
    from_other = [int(train[i][0]) >= 10_000 for i in range(len(train))]
    assert abs(np.mean(from_other) - 0.7) < 0.01
    assert len(valid) == 20


def test_build_datasets_synthetic():
    train, valid, test = build_datasets(None, "969,30,1", SEQ, 5, (20, 4, 0), synthetic=True, vocab_size=500)
    assert test is None and len(train) == 20 and len(valid) == 4
    assert not torch.equal(train[0], valid[0])  # the splits use different seeds


def test_prefix_problems_fail_before_any_work(corpus, tmp_path):
    indexed, _ = corpus
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="missing.*preprocess_data"):
        build_datasets([0.5, indexed.prefix, 0.5, str(tmp_path / "missing")], "1", SEQ, 1, (10, 0, 0), cache)
    assert not cache.exists()
    with pytest.raises(DataError, match="data.path"):
        build_datasets([0.5, indexed.prefix, 0.5], "1", SEQ, 1, (10, 0, 0), cache)
    with pytest.raises(DataError, match="data.split"):
        build_datasets(indexed.prefix, "x", SEQ, 1, (10, 0, 0), cache)
    assert not cache.exists()
