"""Raw text -> GPT-2 tokens -> Megatron P.bin/P.idx; the reusable core of tools/preprocess_data.py.

Inputs are ``.jsonl`` (one JSON object per line, the text under a key, one document per line) or ``.txt`` (the whole
file is one document). Reading happens in this process, tokenizing in a pool of worker processes, writing in
this process again, in document order.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from megagpt.data.indexed_dataset import IndexedDatasetBuilder, best_dtype
from megagpt.data.tokenizer import EOD_ID, VOCAB_SIZE, get_tokenizer
from megagpt.errors import DataError

JSONL_SUFFIXES = (".jsonl",)
TEXT_SUFFIXES = (".txt",)


@dataclass(frozen=True)
class PreprocessSummary:
    prefix: str
    documents: int
    tokens: int
    seconds: float


def read_jsonl_texts(path: str, json_key: str = "text") -> Iterator[str]:
    """The ``json_key`` field of each line of a .jsonl file; blank lines are skipped."""
    with _open_text(path) as f:
        for line_number, line in enumerate(_decoded_lines(f, path), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(
                    f"{path} line {line_number} is not valid JSON; each line must be one object like "
                    f'{{"{json_key}": "..."}}.'
                ) from None
            if not isinstance(record, dict) or json_key not in record:
                raise DataError(
                    f"{path} line {line_number} has no {json_key!r} field; pass --json-key to name the field "
                    "that holds the text."
                )
            text = record[json_key]
            if not isinstance(text, str):
                raise DataError(
                    f"{path} line {line_number}: field {json_key!r} is a {type(text).__name__}, not a string; "
                    "pass --json-key to name the field that holds the text."
                )
            yield text


def read_text_document(path: str) -> str:
    """A whole .txt file as one document."""
    with _open_text(path) as f:
        try:
            return f.read()
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8.") from None


def iter_input_texts(paths: Iterable[str], json_key: str = "text") -> Iterator[str]:
    """Documents from several inputs in the given order: every line of a .jsonl, or a whole .txt.

    Every path is checked now, before the first document is read, so a typo in the last input fails at once
    rather than after hours of tokenizing the others.
    """
    paths = [os.fspath(path) for path in paths]
    if not paths:
        raise DataError("no input files given; pass --input FILE (.jsonl or .txt) at least once.")
    for path in paths:
        if not os.path.isfile(path):
            raise DataError(f"input file {path} does not exist; check the --input path.")
        if not path.endswith(JSONL_SUFFIXES + TEXT_SUFFIXES):
            raise DataError(f"input file {path} is neither .jsonl nor .txt; rename it to say which format it is.")
    return _iter_texts(paths, json_key)


def _iter_texts(paths: list[str], json_key: str) -> Iterator[str]:
    for path in paths:
        if path.endswith(JSONL_SUFFIXES):
            yield from read_jsonl_texts(path, json_key)
        else:
            yield read_text_document(path)


def _open_text(path: str):
    try:
        return open(path, encoding="utf-8")
    except OSError as e:
        raise DataError(f"cannot read input file {path} ({e.strerror}); check the --input path.") from None


def _decoded_lines(f, path: str) -> Iterator[str]:
    try:
        yield from f
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason}); convert it to UTF-8.") from None


def encode_document(text: str, append_eod: bool = True, megatron_compat: bool = True) -> np.ndarray:
    """GPT-2 token ids of one document, with the end-of-document token appended.

    megatron_compat (the default) gives Megatron's tokens: a literal "<|endoftext|>" in the text is the
    end-of-text token (as Megatron Core's GPT-2 tokenizer, built on Hugging Face's, encodes it), and an empty
    text gives no tokens at all, not even the end-of-document one (Megatron appends it only to a non-empty
    document), which the writer stores as a document with no sequence. Without it, megagpt's earlier rule: the
    literal string is ordinary text (raw data cannot inject document boundaries) and every text, empty or not,
    ends with the end-of-document token.
    """
    tokenizer = get_tokenizer()
    if megatron_compat:
        ids = tokenizer.encode(text, allowed_special={"<|endoftext|>"}, disallowed_special=())
        if append_eod and ids:
            ids.append(EOD_ID)
    else:
        ids = tokenizer.encode_ordinary(text)
        if append_eod:
            ids.append(EOD_ID)
    return np.asarray(ids, dtype=np.int32)


@dataclass(frozen=True)
class _Encoder:
    """A picklable encode function for the worker pool (a lambda or closure would not pickle)."""

    append_eod: bool
    megatron_compat: bool

    def __call__(self, text: str) -> np.ndarray:
        return encode_document(text, self.append_eod, self.megatron_compat)


def tokenize_documents(
    texts: Iterable[str], workers: int = 1, append_eod: bool = True, chunksize: int = 16, megatron_compat: bool = True
) -> Iterator[np.ndarray]:
    """Token ids per document, in input order, tokenized by ``workers`` processes (1: in this process).

    The tokenizer and the pool are created now, not on first iteration: a missing package fails here with one
    clear error, and the workers fork before a progress bar starts its monitor thread (forking a process that
    runs threads can deadlock), inheriting the built tokenizer instead of each parsing the vocabulary again.
    """
    encode = _Encoder(append_eod, megatron_compat)
    get_tokenizer()
    if workers <= 1:
        return map(encode, texts)
    return _tokenize_in_pool(multiprocessing.Pool(workers), encode, iter(texts), workers, chunksize)


def _tokenize_in_pool(pool, encode, texts: Iterator[str], workers: int, chunksize: int) -> Iterator[np.ndarray]:
    # Texts go to the pool in bounded batches drawn in this process, rather than handing the iterator to imap:
    # imap drains it from a helper thread (every text in memory at once), where an input error (a bad .jsonl
    # line) would not reach the caller cleanly.
    batch_size = workers * chunksize * 8  # enough to keep every worker busy between batches
    with pool:  # terminates the workers however this generator ends
        while batch := list(itertools.islice(texts, batch_size)):
            yield from pool.imap(encode, batch, chunksize=chunksize)


def write_dataset(
    prefix: str, docs: Iterable[np.ndarray], dtype=None, progress: bool = False, megatron_compat: bool = True
) -> tuple[int, int]:
    """Write token arrays as P.bin/P.idx (atomically: nothing appears unless every document made it).

    Returns (documents, tokens). dtype defaults to the smallest one for GPT-2's vocabulary (uint16). With
    megatron_compat an empty array is a document with no sequence (Megatron's), else one empty sequence.
    """
    dtype = best_dtype(VOCAB_SIZE) if dtype is None else dtype
    num_tokens = 0
    bar = tqdm(docs, unit=" docs", file=sys.stderr, disable=not progress, desc=os.path.basename(prefix))
    with bar, IndexedDatasetBuilder(prefix, dtype) as builder:
        for tokens in bar:
            builder.add_document(tokens, [] if megatron_compat and len(tokens) == 0 else None)
            num_tokens += len(tokens)
            bar.set_postfix(tokens=num_tokens, refresh=False)
        # Raised inside the builder: its temporaries go, and the files at prefix stay as they were.
        if builder.num_documents == 0 or num_tokens == 0:
            raise DataError(
                f"the input holds no text ({builder.num_documents} documents, 0 tokens), so nothing was written and "
                f"any dataset at {prefix} is left as it was; check the input files (and --json-key for .jsonl)"
            )
    return builder.num_documents, num_tokens


def preprocess(
    inputs: Iterable[str],
    output_prefix: str,
    workers: int = 1,
    json_key: str = "text",
    append_eod: bool = True,
    progress: bool = False,
    megatron_compat: bool = True,
) -> PreprocessSummary:
    """Tokenize ``inputs`` (.jsonl / .txt) into ``output_prefix``.bin/.idx; see tools/preprocess_data.py."""
    start = time.perf_counter()
    texts = iter_input_texts(inputs, json_key)
    docs = tokenize_documents(texts, workers=workers, append_eod=append_eod, megatron_compat=megatron_compat)
    documents, tokens = write_dataset(output_prefix, docs, progress=progress, megatron_compat=megatron_compat)
    return PreprocessSummary(output_prefix, documents, tokens, time.perf_counter() - start)
