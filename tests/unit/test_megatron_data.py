"""data.megatron_compat: Megatron Core's split boundaries, split unit, blend sizes, path syntax and per-split paths.

The golden values are computed by hand from Megatron Core's published rules (megatron/core/datasets):
- splits: ``convert_split_vector_to_split_matrix`` turns the normalized split vector into cumulative bookends
  (0, a, a+b, 1) and ``_build_megatron_dataset_splits`` takes range i as
  [round(bookend_i * n), round(bookend_{i+1} * n)) with Python's round (half to even), over
  ``numel_low_level_dataset``: the number of sequences;
- blends: ``_get_size_per_split_per_dataset`` asks component d for ceil(ceil(N * w_d) * (1 + 0.005)) samples and
  the blend is sum_d ceil(N * w_d) long;
- paths: ``get_blend_from_list``: pairs of (weight, prefix), or prefixes only (weighted by dataset size);
  ``--data-path`` is a whitespace-separated list.
"""

import math

import numpy as np
import pytest

from megagpt.config import config_from_dict, validate
from megagpt.data.gpt_dataset import BlendedDataset, GPTDataset, build_datasets
from megagpt.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, write_indexed_dataset
from megagpt.data.spec import Blend, parse_blend, split_ranges
from megagpt.errors import ConfigError, DataError

SEQ = 8


@pytest.mark.parametrize(
    "n, split, megatron, earlier",
    [
        # 0.45 * 30 = 13.5 -> 14 (half to even); (0.45 + 0.1) * 30 = 16.5 -> 16. Per part: 13.5 -> 14, 3, 14 = 31,
        # one too many, taken off every boundary after the first.
        (30, "45,10,45", [(0, 14), (14, 16), (16, 30)], [(0, 13), (13, 16), (16, 30)]),
        # 0.969 * 12345 = 11962.3 -> 11962; per part 11962 + 370 + 12 = 12344, one short, added to each boundary.
        (12345, "969,30,1", [(0, 11962), (11962, 12333), (12333, 12345)], [(0, 11963), (11963, 12333), (12333, 12345)]),
        # 0.95 * 10 = 9.5 -> 10 (half to even): validation gets one document; per part 9 + 0 + 0 (0.5 -> 0), one
        # short, so train takes all ten.
        (10, "90,5,5", [(0, 9), (9, 10), (10, 10)], [(0, 10), (10, 10), (10, 10)]),
    ],
)
def test_split_boundaries_are_megatrons(n, split, megatron, earlier):
    assert split_ranges(n, split) == megatron
    assert split_ranges(n, split, megatron_compat=False) == earlier


def test_path_syntax():
    assert parse_blend("0.3 data/a 0.7 data/b") == Blend(("data/a", "data/b"), (0.3, 0.7))
    assert parse_blend([3, "a", 1, "b"]) == Blend(("a", "b"), (0.75, 0.25))
    assert parse_blend(["a", "b"]) == Blend(("a", "b"), None)  # weightless: weighted by dataset size
    assert parse_blend("a b c") == Blend(("a", "b", "c"), None)
    assert parse_blend("data/a") == Blend(("data/a",), None)
    assert parse_blend("1.0 data/a") == Blend(("data/a",), (1.0,))
    # Without compat a string is one prefix, spaces and all.
    assert parse_blend("my corpus/a", megatron_compat=False) == Blend(("my corpus/a",), None)
    for bad in ([0.5, "a", "b"], ["a", 0.5, "b", 0.5], [0.5, "a", "b", "c"], [-1, "a", 1, "b"], [0, "a", 0, "b"], []):
        with pytest.raises(DataError, match="data.path"):
            parse_blend(bad)


@pytest.fixture
def sentence_split(tmp_path):
    """12 documents of 1-3 sequences each (Megatron's --split-sentences layout), plus one empty document (no
    sequence, as Megatron writes an empty text): 24 sequences in all. Token value = position in the .bin."""
    rng = np.random.default_rng(1)
    prefix = tmp_path / "sentences"
    position = 0
    with IndexedDatasetBuilder(str(prefix), np.int32) as builder:
        for d in range(13):
            if d == 6:
                builder.add_document([], [])
                continue
            lengths = rng.integers(5, 20, size=1 + d % 3).tolist()
            builder.add_document(np.arange(position, position + sum(lengths)), lengths)
            position += sum(lengths)
    return IndexedDataset(prefix)


def test_split_unit_is_the_sequence(sentence_split, tmp_path):
    indexed = sentence_split
    assert (len(indexed), indexed.num_documents) == (24, 13)
    train, valid, _ = build_datasets(str(indexed.prefix), "80,20,0", SEQ, 1, (40, 5, 0), cache_dir=tmp_path)
    # round(0.8 * 24) = round(19.2) = 19 sequences for training, the last 5 for validation.
    assert (train.unit, train.doc_range, valid.doc_range) == ("sequence", (0, 19), (19, 24))
    offsets = indexed.sequence_token_offsets()
    for dataset, (start, end) in ((train, (0, 19)), (valid, (19, 24))):
        tokens = np.concatenate([dataset[i].numpy() for i in range(len(dataset))])
        assert offsets[start] <= tokens.min() and tokens.max() < offsets[end]  # the split's sequences only
    # The earlier unit: documents, 0.8 * 13 = 10.4 -> 10 of them.
    old_train, *_ = build_datasets(
        str(indexed.prefix), "80,20,0", SEQ, 1, (40, 5, 0), cache_dir=tmp_path, megatron_compat=False
    )
    assert (old_train.unit, old_train.doc_range) == ("document", (0, 10))


def _two_datasets(tmp_path, sizes=(60, 60)):
    prefixes = []
    for k, docs in enumerate(sizes):
        prefix = tmp_path / f"d{k}"
        write_indexed_dataset(prefix, [np.full(10, 1000 * k + d) for d in range(docs)], np.int32)
        prefixes.append(str(prefix))
    return prefixes


def test_blend_sizes_are_megatrons(tmp_path):
    a, b = _two_datasets(tmp_path)
    train, *_ = build_datasets([0.3, a, 0.7, b], "1", SEQ, 1, (1000, 0, 0), cache_dir=tmp_path)
    assert isinstance(train, BlendedDataset)
    # ceil(ceil(1000 * 0.3) * 1.005) = ceil(301.5) = 302; ceil(703.5) = 704; length 300 + 700.
    assert [len(d) for d in train.datasets] == [302, 704] and len(train) == 1000
    old, *_ = build_datasets([0.3, a, 0.7, b], "1", SEQ, 1, (1000, 0, 0), cache_dir=tmp_path, megatron_compat=False)
    assert [len(d) for d in old.datasets] == [303, 705] and len(old) == 1000
    # N * w not whole: ceil(333.3) = 334 and ceil(666.7) = 667, so the blend is 1001 long, one more than asked.
    third, *_ = build_datasets("1 " + a + " 2 " + b, "1", SEQ, 1, (1000, 0, 0), cache_dir=tmp_path)
    assert len(third) == math.ceil(1000 / 3) + math.ceil(2000 / 3) == 1001
    assert [len(d) for d in third.datasets] == [math.ceil(334 * 1.005), math.ceil(667 * 1.005)]
    # The greedy order keeps every prefix within a sample of the weights.
    picks = np.asarray(third.dataset_index[:999])
    assert abs((picks == 1).sum() - 666) <= 1
    # A weighted list of one prefix is a blend of one, as in Megatron.
    one, *_ = build_datasets([1.0, a], "1", SEQ, 1, (100, 0, 0), cache_dir=tmp_path)
    assert isinstance(one, BlendedDataset) and [len(d) for d in one.datasets] == [math.ceil(100 * 1.005)]


def test_weightless_blend_weights_by_size(tmp_path):
    a, b = _two_datasets(tmp_path, sizes=(30, 90))
    train, *_ = build_datasets([a, b], "1", SEQ, 1, (100, 0, 0), cache_dir=tmp_path)
    # One epoch of each: (300 - 1) // 8 = 37 and (900 - 1) // 8 = 112 windows, weights 37 : 112.
    assert [len(d) for d in train.datasets] == [37, 112] and len(train) == 100
    assert train.weights == pytest.approx([37 / 149, 112 / 149])
    with pytest.raises(DataError, match="weightless blend .* holds 149 samples .* 150 are asked for"):
        build_datasets(f"{a} {b}", "1", SEQ, 1, (150, 0, 0), cache_dir=tmp_path)


def test_per_split_paths(tmp_path):
    a, b = _two_datasets(tmp_path, sizes=(40, 20))
    train, valid, test = build_datasets(None, "969,30,1", SEQ, 1, (30, 10, 0), tmp_path, split_paths=(a, b, None))
    assert isinstance(train, GPTDataset) and isinstance(valid, GPTDataset) and test is None
    assert train.doc_range == (0, 40) and valid.doc_range == (0, 20)  # each used whole; data.split does not apply
    assert all(int(valid[i].max()) >= 1000 for i in range(len(valid)))
    with pytest.raises(DataError, match="both set"):
        build_datasets(a, "1", SEQ, 1, (30, 0, 0), tmp_path, split_paths=(a, None, None))
    with pytest.raises(DataError, match="data.valid_path is not set"):
        build_datasets(None, "1", SEQ, 1, (30, 10, 0), tmp_path, split_paths=(a, None, None))


def _validate(*overrides):
    validate(config_from_dict({"preset": "tiny-cpu"}, ["data.synthetic=false", *overrides]))


def test_config_keys():
    _validate("data.path=0.3 a 0.7 b")
    _validate("data.train_path=a", "data.valid_path=[0.5, b, 0.5, c]")
    _validate("data.train_path=a", "train.eval_iters=0")
    with pytest.raises(ConfigError, match="both set"):
        _validate("data.path=a", "data.train_path=a")
    with pytest.raises(ConfigError, match="needs validation data, but data.valid_path is not set"):
        _validate("data.train_path=a")
    with pytest.raises(ConfigError, match="data.train_path is not"):
        _validate("data.valid_path=a")
    with pytest.raises(ConfigError, match="neither a prefix nor a blend"):
        _validate("data.path=0.3 a b")
    _validate("data.path=0.3 a b", "data.megatron_compat=false")  # one prefix with spaces in it
    with pytest.raises(ConfigError, match="data.valid_path '0.3 a b' is neither a prefix nor a blend"):
        _validate("data.train_path=a", "data.valid_path=0.3 a b")


def test_checkpoints_record_the_data_rules_and_a_resume_under_other_rules_is_told(monkeypatch, tmp_path):
    from megagpt.checkpoint import load
    from megagpt.checkpoint.format import CheckpointMetadata, data_rules_of

    cfg = config_from_dict({"preset": "tiny-cpu"}, ["data.synthetic=false", "data.path=a", "data.split=90,5,5"])
    meta = CheckpointMetadata(step=3, consumed_samples=24, model={}, layout={}, data_rules=data_rules_of(cfg))
    again = CheckpointMetadata.from_json(meta.to_json(), tmp_path / "metadata.json")
    assert again.trained_data_rules() == {"split": "90,5,5", "megatron_compat": True}
    # A checkpoint from before the key existed was cut and ordered by megagpt's earlier rules.
    older = CheckpointMetadata(step=3, consumed_samples=24, model={}, layout={})
    assert '"data_rules"' not in older.to_json()
    assert older.trained_data_rules() == {"split": "969,30,1", "megatron_compat": False}
    converted = CheckpointMetadata(step=0, consumed_samples=0, model={}, layout={}, converted_from={"path": "x"})
    assert converted.trained_data_rules() == {"split": "969,30,1", "megatron_compat": True}  # never trained here

    warnings = []

    class Recorder:
        def warning(self, message):
            warnings.append(message)

    class Saved:
        path, step = tmp_path / "step_00000003", 3

    monkeypatch.setattr(load, "get_logger", lambda: Recorder())
    Saved.meta = again
    load._warn_if_the_data_rules_changed(Saved, cfg)
    assert warnings == []
    Saved.meta = older
    load._warn_if_the_data_rules_changed(Saved, cfg)
    assert len(warnings) == 1
    assert "data.split=969,30,1 then, 90,5,5 now" in warnings[0]
    assert "data.megatron_compat=False then, True now" in warnings[0]
