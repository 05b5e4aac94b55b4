"""Hugging Face conversion both ways (megagpt/hf.py, tools/convert_*), generation and evaluation, against tiny random
transformers models (HF_HUB_OFFLINE: nothing is downloaded). Logits agree within 1e-4 in fp32; greedy generation
agrees token for token with transformers' generate. The tp=2 x pp=2 cases are in tests/distributed/test_hf.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers  # noqa: E402  (the dev extra installs it)

from megagpt.hf import ConversionError, checkpoint_to_hf_folder, hf_folder_to_checkpoint, to_hf  # noqa: E402
from megagpt.inference import load_for_inference  # noqa: E402
from megagpt.model.generation import generate  # noqa: E402
from megagpt.parallel.context import ParallelContext  # noqa: E402
from tests.conftest import REPO, tiny_config  # noqa: E402

VOCAB, POSITIONS, WINDOW = 1000, 64, 5


def perturbed(model):
    """Random values everywhere (biases and LayerNorms too), so every tensor's mapping matters."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return model.eval()


def hf_gpt2():
    torch.manual_seed(0)  # transformers initializes from the global generator: the same model in any test order
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=POSITIONS, bos_token_id=None, eos_token_id=None
    )
    return perturbed(transformers.GPT2LMHeadModel(config))


def hf_gpt_neo():
    torch.manual_seed(0)
    config = transformers.GPTNeoConfig(
        vocab_size=VOCAB, hidden_size=64, num_layers=4, num_heads=4, max_position_embeddings=POSITIONS,
        attention_types=[[["global", "local"], 2]], window_size=WINDOW, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    return perturbed(transformers.GPTNeoForCausalLM(config))


@pytest.fixture(scope="module", params=["gpt2", "gpt_neo"])
def hf_model(request, tmp_path_factory):
    model = hf_gpt2() if request.param == "gpt2" else hf_gpt_neo()
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return model, folder


def tokens(batch=2, length=20, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_hf_models_into_megagpt_give_the_same_logits(hf_model, tmp_path):
    model, folder = hf_model
    checkpoint = hf_folder_to_checkpoint(folder, tmp_path / "ck")
    ours, cfg = load_for_inference(checkpoint, ParallelContext.single_process())
    x = tokens()
    with torch.no_grad():
        want = model(x).logits
        got = ours(x)
    assert got.shape == want.shape
    assert (got - want).abs().max() < 1e-4
    expected_pattern = ["dense"] if model.config.model_type == "gpt2" else ["dense", "local"]
    assert cfg.model.attention_pattern == expected_pattern and cfg.model.vocab_size == VOCAB
    if model.config.model_type == "gpt_neo":
        assert cfg.model.local_window == WINDOW and not cfg.model.qkv_bias
    assert (tmp_path / "ck" / "config.yaml").exists()


def test_greedy_generation_agrees_with_transformers_token_for_token(hf_model, tmp_path):
    """30 new tokens after a 6-token prompt: past GPT-Neo's window of 5, so the local layers' cache is cut."""
    model, folder = hf_model
    ours, _ = load_for_inference(hf_folder_to_checkpoint(folder, tmp_path / "ck"), ParallelContext.single_process())
    prompt = tokens(batch=2, length=6, seed=3)
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=30, min_new_tokens=30, do_sample=False, pad_token_id=0)
    got = generate(ours, prompt, 30)
    assert got.tolist() == want.tolist()
    # With an end-of-text token that row 0 produces and row 1 never does: row 0 is padded with it from there on
    # while row 1 runs to the end, as in transformers with pad_token_id = eos_token_id.
    new0, new1 = got[0, 6:].tolist(), got[1, 6:].tolist()
    eos = next(t for t in new0 if t not in new1)
    first = new0.index(eos)
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=30, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    got = generate(ours, prompt, 30, eos_id=eos)
    assert got.tolist() == want.tolist()
    assert got.shape[1] == 6 + 30 and (got[0, 6 + first :] == eos).all() and got[1, 6:].tolist() == new1


def train_megagpt(tmp_path, *overrides):
    from megagpt.train.run import pretrain

    cfg = tiny_config(
        "train.iters=3", "model.vocab_size=1000", "logging.tensorboard=false", "train.eval_iters=0",
        f"logging.dir={tmp_path / 'run'}", f"checkpoint.dir={tmp_path / 'ck'}", *overrides,
    )  # fmt: skip
    pretrain(cfg, ParallelContext.single_process())
    return tmp_path / "ck"


@pytest.mark.parametrize(
    "overrides, architecture",
    [(["model.attention_pattern=[dense]"], "GPT2LMHeadModel"), (["model.qkv_bias=false"], "GPTNeoForCausalLM")],
)
def test_a_trained_megagpt_checkpoint_into_hf_gives_our_logits(overrides, architecture, tmp_path):
    checkpoint = train_megagpt(tmp_path, *overrides)
    folder = checkpoint_to_hf_folder(checkpoint, tmp_path / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(theirs).__name__ == architecture
    ours, _ = load_for_inference(checkpoint, ParallelContext.single_process())
    x = tokens()
    with torch.no_grad():
        assert (theirs(x).logits - ours(x)).abs().max() < 1e-4


def random_local_model(qkv_bias_rows: str):
    """A megagpt model with local layers, q/k/v biases, and random values; the query bias zeroed or not."""
    from megagpt.model.gpt import GPT
    from megagpt.parallel.context import Group

    cfg = tiny_config("model.vocab_size=1000", "model.local_window=5").model
    model = perturbed(GPT(cfg, Group.solo(), init_seed=0))
    if qkv_bias_rows == "query zero":
        with torch.no_grad():
            for block in model.blocks.values():
                block.attn.qkv.bias.view(block.attn.heads, 3, -1)[:, 0] = 0.0
    return model, cfg


def test_key_and_value_biases_map_exactly_to_gpt_neo():
    """GPT-Neo has no q/k/v biases: the key bias drops out of the softmax, the value bias folds into out_proj."""
    model, cfg = random_local_model("query zero")
    from dataclasses import asdict

    config, state = to_hf({name: p.detach() for name, p in model.named_parameters()}, asdict(cfg))
    theirs = transformers.GPTNeoForCausalLM(config).eval()
    missing, unexpected = theirs.load_state_dict(state, strict=False)
    assert not unexpected and all(name == "lm_head.weight" for name in missing)  # lm_head is tied to wte
    theirs.tie_weights()
    x = tokens()
    with torch.no_grad():
        assert (theirs(x).logits - model(x)).abs().max() < 1e-4


def test_a_query_bias_is_refused_with_the_fix():
    from dataclasses import asdict

    model, cfg = random_local_model("query random")
    with pytest.raises(ConversionError, match="non-zero query bias.*model.qkv_bias=false"):
        to_hf({name: p.detach() for name, p in model.named_parameters()}, asdict(cfg))


def test_missing_files_are_named(tmp_path):
    with pytest.raises(ConversionError, match="config.json is missing"):
        hf_folder_to_checkpoint(tmp_path, tmp_path / "ck")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ConversionError, match="has no model.safetensors"):
        hf_folder_to_checkpoint(tmp_path, tmp_path / "ck")
    (tmp_path / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(ConversionError, match="cannot read the weights file .*model.safetensors"):
        hf_folder_to_checkpoint(tmp_path, tmp_path / "ck")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    result = run_tool("convert_from_hf.py", "--hf", tmp_path, "--out", tmp_path / "ck")
    assert result.returncode == 2 and "not supported" in result.stderr and "Traceback" not in result.stderr
    missing = run_tool("convert_to_hf.py", "--load", tmp_path / "nowhere", "--out", tmp_path / "hf")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    (tmp_path / "config.json").write_bytes(b'{"model_type": "gpt2", "n_embd": 6\xff}')
    with pytest.raises(ConversionError, match="config.json is not a JSON file .*the model folder is damaged"):
        hf_folder_to_checkpoint(tmp_path, tmp_path / "ck")


def run_tool(name, *args):
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / name), *map(str, args)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip


def test_the_tools_end_to_end(tmp_path):
    """convert_from_hf at tp 2 -> generate (ids) -> convert_to_hf -> transformers gives the same logits."""
    model = hf_gpt_neo()
    model.save_pretrained(tmp_path / "hf")
    converted = run_tool("convert_from_hf.py", "--hf", tmp_path / "hf", "--out", tmp_path / "ck", "--tp", "2")
    assert converted.returncode == 0, converted.stderr[-2000:]
    assert json.loads((tmp_path / "ck" / "step_00000000" / "metadata.json").read_text())["layout"]["tp"] == 2
    generated = run_tool(
        "generate.py", "--load", tmp_path / "ck", "--prompt-ids", "1,2,3", "--max-new-tokens", "8", "--greedy",
        "--output-ids",
    )  # fmt: skip
    assert generated.returncode == 0, generated.stderr[-2000:]
    ids = json.loads(generated.stdout.strip().splitlines()[-1])
    with torch.no_grad():
        want = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert ids == want[0].tolist()
    back = run_tool("convert_to_hf.py", "--load", tmp_path / "ck", "--out", tmp_path / "hf2")
    assert back.returncode == 0, back.stderr[-2000:]
    over = run_tool("convert_to_hf.py", "--load", tmp_path / "ck", "--out", tmp_path / "hf")  # a model is there
    assert over.returncode == 2 and "already holds config.json, model.safetensors" in over.stderr, over.stderr
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf2").eval()
    x = tokens()
    with torch.no_grad():
        assert (again(x).logits - model(x).logits).abs().max() < 1e-4


def test_sampling_is_seeded_and_respects_top_k():
    from megagpt.model.generation import next_tokens

    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]]).repeat(200, 1)
    draw = next_tokens(logits, False, 1.0, 2, 1.0, torch.Generator().manual_seed(0))
    assert set(draw.tolist()) == {3, 4}  # only the 2 most likely tokens
    again = next_tokens(logits, False, 1.0, 2, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(draw, again)
    nucleus = next_tokens(logits, False, 1.0, 0, 0.5, torch.Generator().manual_seed(0))
    assert set(nucleus.tolist()) == {4}  # p(4) = 0.64 already covers top_p = 0.5
    assert next_tokens(logits[:1], True, 1.0, 0, 1.0, None).item() == 4
    # top_k keeps exactly k tokens even when others tie with the k-th (common in bf16 logits).
    ties = torch.tensor([[2.0, 2.0, 2.0, 0.0]]).repeat(200, 1)
    assert len(set(next_tokens(ties, False, 1.0, 1, 1.0, torch.Generator().manual_seed(0)).tolist())) == 1


def test_gpt2_tokenizer_files_load_in_transformers(tmp_path):
    checkpoint = train_megagpt(tmp_path, "model.attention_pattern=[dense]", "model.vocab_size=50257")
    folder = checkpoint_to_hf_folder(checkpoint, tmp_path / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    assert transformers.GenerationConfig.from_pretrained(folder).eos_token_id == 50256


def test_evaluate_reports_the_loss_and_perplexity_of_a_split(tmp_path, shakespeare_prefix):
    from megagpt.data.gpt_dataset import GPTDataset, split_documents
    from megagpt.data.indexed_dataset import IndexedDataset
    from megagpt.inference import mean_loss

    checkpoint = train_megagpt(tmp_path, "model.vocab_size=50257")
    result = run_tool(
        "evaluate.py", "--load", checkpoint, "--data", shakespeare_prefix, "--split", "valid", "--max-samples", "6"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["tokens"] == 6 * 64 and report["split"] == "valid"
    assert report["perplexity"] == pytest.approx(torch.tensor(report["loss"]).exp().item(), rel=1e-6)
    # The same number computed here, on the same windows of the validation documents.
    model, cfg = load_for_inference(checkpoint, ParallelContext.single_process())
    indexed = IndexedDataset(shakespeare_prefix)
    documents = split_documents(indexed.num_documents, "969,30,1")[1]
    tokens_in_split = int(
        indexed.document_token_offsets()[documents[1]] - indexed.document_token_offsets()[documents[0]]
    )
    dataset = GPTDataset(indexed, documents, (tokens_in_split - 1) // 64, 64, cfg.train.seed, name="valid")
    loss, _ = mean_loss(model, dataset, 4, 6)
    assert report["loss"] == pytest.approx(loss, rel=1e-6)
    assert 5.0 < report["loss"] < 12.0  # an untrained-ish model on real text: near log(50257) = 10.8 or below


def test_openai_style_gpt2_folders_without_the_transformer_prefix_convert(tmp_path):
    """OpenAI's GPT-2 checkpoints store the base model's tensors as h.0.attn..., not transformer.h.0.attn..."""
    from safetensors.torch import load_file

    perturbed(transformers.GPT2Model(hf_gpt2().config)).save_pretrained(tmp_path / "hf")
    assert not any(name.startswith("transformer.") for name in load_file(str(tmp_path / "hf" / "model.safetensors")))
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    checkpoint = hf_folder_to_checkpoint(tmp_path / "hf", tmp_path / "ck")
    ours, _ = load_for_inference(checkpoint, ParallelContext.single_process())
    x = tokens()
    with torch.no_grad():
        assert (theirs(x).logits - ours(x)).abs().max() < 1e-4


def test_the_loss_pass_computes_no_gradients_under_no_grad():
    from megagpt.model.loss import linear_cross_entropy
    from megagpt.train.memory import AllocationTracker

    x = torch.randn(512, 64, requires_grad=True)
    weight = torch.randn(8192, 64, requires_grad=True)
    labels = torch.randint(0, 8192, (512,))
    with torch.no_grad(), AllocationTracker() as tracker:
        loss = linear_cross_entropy(x, weight, labels, block_rows=128)
    chunk_logits, weight_gradient = 128 * 8192 * 4, 8192 * 64 * 4
    assert tracker.peak < chunk_logits + weight_gradient // 2  # one chunk's logits, no (V, h) weight gradient
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(x @ weight.t(), labels).item(), rel=1e-5)


@pytest.mark.parametrize("preset", ["gpt3-125m", "gpt3-1.3b", "gpt3-175b"])
def test_the_gpt3_presets_export_to_hugging_face(preset):
    """A GPT-3 preset's layers, at a size a test can build: no query bias, so GPT-Neo can hold them (its random
    init has non-zero biases everywhere else, which a preset with qkv biases would carry into the query)."""
    from megagpt.config import config_from_dict
    from megagpt.hf import to_hf
    from megagpt.model.gpt import GPT
    from megagpt.parallel.context import Group

    shrink = ["model.num_layers=2", "model.hidden_size=64", "model.num_heads=4", "model.seq_length=64",
              "model.max_position_embeddings=64", "model.local_window=16", "model.vocab_size=1000"]  # fmt: skip
    cfg = config_from_dict({"preset": preset}, shrink)
    assert cfg.model.qkv_bias is False and "local" in cfg.model.attention_pattern
    model = GPT(cfg.model, Group.solo(), init_seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()  # every bias non-zero
    config, state = to_hf({n: p.detach() for n, p in model.named_parameters()}, cfg.to_dict()["model"])
    assert type(config).__name__ == "GPTNeoConfig" and state


@pytest.mark.parametrize("make", [hf_gpt2, hf_gpt_neo])
def test_a_config_that_disagrees_with_the_weights_is_named_and_a_training_folder_is_refused(make, tmp_path):
    model = make()
    model.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    wide = "n_embd" if config["model_type"] == "gpt2" else "hidden_size"
    config[wide] = 128  # the weights are 64 wide
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    result = run_tool("convert_from_hf.py", "--hf", tmp_path / "hf", "--out", tmp_path / "ck")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "transformer.wte.weight has shape [1000, 64] but the Hugging Face config says [1000, 128]" in result.stderr
    assert not (tmp_path / "ck").exists()
    # Converting into a folder that holds a training run's checkpoints would repoint its latest: refused.
    model.save_pretrained(tmp_path / "hf")
    assert run_tool("convert_from_hf.py", "--hf", tmp_path / "hf", "--out", tmp_path / "ck").returncode == 0
    latest = (tmp_path / "ck" / "latest").read_text()
    again = run_tool("convert_from_hf.py", "--hf", tmp_path / "hf", "--out", tmp_path / "ck")
    assert again.returncode == 2 and "already holds 1 checkpoint(s) (newest step_00000000)" in again.stderr
    assert (tmp_path / "ck" / "latest").read_text() == latest
