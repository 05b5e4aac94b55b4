import math

import pytest
import torch

from megagpt.model.facts import layer_kinds, layer_window
from megagpt.model.gpt import GPT, residual_init_std
from megagpt.parallel.context import Group
from tests.conftest import tiny_config


def test_layers_follow_the_attention_pattern():
    cfg = tiny_config("model.attention_pattern=[dense,local,local]", "model.num_layers=6").model
    windows = [layer_window(cfg, layer) for layer in range(6)]
    assert windows == [None, 16, 16, None, 16, 16]
    assert layer_kinds(cfg) == ["dense", "local", "local"] * 2
    model = GPT(cfg, Group.solo())
    assert [block.attn.window for block in model.blocks.values()] == windows


def _model(*overrides):
    torch.manual_seed(0)
    cfg = tiny_config(*overrides).model
    return GPT(cfg, Group.solo()), cfg


def test_forward_shapes_and_initial_loss():
    model, cfg = _model()
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length + 1))
    logits = model(tokens[:, :-1])
    assert logits.shape == (2, cfg.seq_length, cfg.vocab_size)  # padded rows trimmed
    loss = model(tokens[:, :-1], tokens[:, 1:])
    # small init: nearly uniform predictions over the real vocabulary
    assert loss.item() == pytest.approx(math.log(cfg.vocab_size), abs=0.05)


def test_model_is_causal():
    model, cfg = _model()
    tokens = torch.randint(0, cfg.vocab_size, (1, cfg.seq_length))
    changed = tokens.clone()
    changed[0, 40:] = (changed[0, 40:] + 1) % cfg.vocab_size
    torch.testing.assert_close(model(tokens)[:, :40], model(changed)[:, :40])


def test_padded_vocabulary_never_enters_the_loss():
    model, cfg = _model()
    assert model.padded_vocab_size == 50304 and model.wte.weight.shape[0] == 50304
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length + 1))
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    assert model.wte.weight.grad[cfg.vocab_size :].abs().max() == 0
    assert model.wte.weight.grad[: cfg.vocab_size].abs().max() > 0


def test_init_follows_gpt2():
    model, cfg = _model("model.hidden_size=256")
    block = model.blocks["0"]
    assert block.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.mlp.fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    for proj in (block.attn.proj, block.mlp.proj):
        assert proj.weight.std().item() == pytest.approx(residual_init_std(cfg), rel=0.05)
        assert proj.bias.abs().max() == 0
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.equal(model.ln_f.weight, torch.ones_like(model.ln_f.weight))


def test_qkv_bias_switch():
    with_bias, _ = _model()
    without, _ = _model("model.qkv_bias=false")
    assert with_bias.blocks["0"].attn.qkv.bias is not None
    assert without.blocks["0"].attn.qkv.bias is None
    assert without.blocks["0"].attn.proj.bias is not None


def test_tiny_model_overfits_one_batch():
    model, cfg = _model("model.vocab_size=256", "model.make_vocab_size_divisible_by=1")
    tokens = torch.randint(0, 256, (4, cfg.seq_length + 1), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    first = None
    for _ in range(80):
        loss = model(tokens[:, :-1], tokens[:, 1:])
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert first == pytest.approx(math.log(256), abs=0.1)
    assert loss.item() < 0.2, f"loss {first:.2f} -> {loss.item():.2f}: the model did not memorise one batch"


def test_mlp_is_gelu_tanh_of_width_4h():
    model, cfg = _model()
    mlp = model.blocks["0"].mlp
    assert mlp.fc.weight.shape == (4 * cfg.hidden_size, cfg.hidden_size)
    x = torch.randn(2, 5, cfg.hidden_size)
    hidden = x @ mlp.fc.weight.T + mlp.fc.bias
    expected = torch.nn.functional.gelu(hidden, approximate="tanh") @ mlp.proj.weight.T + mlp.proj.bias
    torch.testing.assert_close(mlp(x), expected)
    exact = torch.nn.functional.gelu(hidden) @ mlp.proj.weight.T + mlp.proj.bias
    assert not torch.allclose(mlp(x), exact, rtol=0, atol=1e-7)  # the tanh approximation, not erf


def test_optimizer_has_gpt3_settings_and_no_decay_on_vectors():
    from megagpt.parallel.context import ParallelContext
    from megagpt.parallel.data_parallel import GradBuckets
    from megagpt.train.optimizer import MainParamOptimizer

    model, _ = _model()
    ctx = ParallelContext.single_process()
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = MainParamOptimizer(GradBuckets(model.parameters(), ctx.dp_group, 1e9), tiny_config().optim, ctx)
    decay, no_decay = optimizer.adam.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert (decay["betas"], decay["eps"]) == ((0.9, 0.95), 1e-8)
    model_param = {id(main): param for param, _, _, main in optimizer.pieces}
    decayed = {names[id(model_param[id(p)])] for p in decay["params"]}
    not_decayed = {names[id(model_param[id(p)])] for p in no_decay["params"]}
    assert "wte.weight" in decayed and "blocks.0.attn.qkv.weight" in decayed
    assert "blocks.0.ln_1.weight" in not_decayed and "blocks.0.attn.qkv.bias" in not_decayed
    assert "ln_f.bias" in not_decayed and "blocks.0.mlp.proj.bias" in not_decayed
    assert decayed | not_decayed == set(names.values()) and not decayed & not_decayed
    # An fp32 model is its own main weight: the pieces are views of the parameters, updated in place.
    assert not optimizer.copies_back
    assert all(main.data_ptr() == param.data_ptr() for param, _, _, main in optimizer.pieces)


def test_evaluation_runs_local_layers_on_the_backend_training_uses(monkeypatch):
    """With dropout, training runs local layers blocked (Flex has no dropout). Evaluation turns dropout off, but
    must not switch them to Flex: on GPU that would bring the first torch.compile hours into a run. So "auto"
    decides with the configured dropout in both modes (on CPU pick_backend never picks Flex for training, so the
    choice itself is watched here, with a GPU's answer)."""
    import megagpt.model.gpt as gpt
    from megagpt.model.attention import pick_backend

    asked = []

    def gpu_pick_backend(q, k, v, *, window, dropout_p):
        asked.append((window, dropout_p))
        return "blocked" if window is not None and dropout_p > 0 else pick_backend(q, k, v, window=window, dropout_p=0)

    monkeypatch.setattr(gpt, "pick_backend", gpu_pick_backend)
    model, cfg = _model("model.dropout=0.1")
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length + 1))
    model.eval()
    with torch.no_grad():
        model(tokens[:, :-1], tokens[:, 1:])
    local = [dropout for window, dropout in asked if window is not None]
    assert local == [0.1] * (cfg.num_layers // 2)  # eval asked with training's dropout, so it stays blocked


def test_building_the_model_leaves_the_gpu_generators_alone(monkeypatch):
    """Each part's weights come from its own seed; reseeding the CUDA generators there (torch.manual_seed does)
    would silently reset every GPU's dropout stream whenever a model is built."""
    from megagpt.model.gpt import seeded

    def forbidden(seed):
        raise AssertionError("seeded() reseeded the CUDA generators")

    monkeypatch.setattr(torch.cuda, "manual_seed_all", forbidden)
    monkeypatch.setattr(torch.cuda, "manual_seed", forbidden)
    before = torch.random.get_rng_state()
    with seeded(7, 1):
        first = torch.rand(3)
    with seeded(7, 1):
        again = torch.rand(3)
    assert torch.equal(first, again) and torch.equal(torch.random.get_rng_state(), before)
    GPT(tiny_config().model, Group.solo(), init_seed=3)  # the whole build, every part seeded
