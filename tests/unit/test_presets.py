import pytest

from megagpt.batch_rampup import samples_after
from megagpt.config import config_from_dict, padded_vocab_size, validate
from megagpt.model.facts import num_parameters
from megagpt.model.gpt import GPT
from megagpt.parallel.context import Group
from megagpt.presets import GPT3_SIZES, PRESETS
from megagpt.train.schedules import total_train_samples


@pytest.mark.parametrize("name", list(GPT3_SIZES))
def test_gpt3_preset_matches_the_paper(name):
    paper_params, layers, hidden, heads, batch, lr, _ = GPT3_SIZES[name]
    cfg = config_from_dict({"preset": name, "data": {"path": "unused"}})
    validate(cfg, 1)
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.seq_length) == (layers, hidden, 2048)
    assert cfg.model.hidden_size % cfg.model.num_heads == 0
    assert cfg.model.attention_pattern == ["dense", "local"]  # layer 0 dense, as GPT-Neo's attention_types
    assert (cfg.model.local_window, cfg.model.attention_backend) == (256, "auto")
    assert cfg.optim.lr == lr and cfg.optim.min_lr == pytest.approx(lr / 10)
    assert (cfg.optim.beta1, cfg.optim.beta2, cfg.optim.weight_decay) == (0.9, 0.95, 0.1)
    # The paper's token budgets, counted through the batch ramp-up from 32k tokens
    assert cfg.train.batch_rampup[0] * 2048 == 32768
    t = cfg.train

    def tokens_after(steps):
        return samples_after(steps, t.global_batch_size, t.batch_rampup) * 2048

    assert total_train_samples(t) * 2048 == pytest.approx(300e9, rel=1e-4)
    assert tokens_after(cfg.optim.warmup_iters) == pytest.approx(375e6, rel=0.01)
    assert tokens_after(cfg.optim.decay_iters) == pytest.approx(260e9, rel=1e-4)
    assert num_parameters(cfg.model) == pytest.approx(paper_params, rel=0.02)


def test_paper_table_values():
    # Spot checks against Table 2.1, so a typo in the table above cannot hide.
    assert GPT3_SIZES["gpt3-175b"][1:6] == (96, 12288, 96, 1536, 0.6e-4)
    assert GPT3_SIZES["gpt3-13b"][2] == 5120  # the paper's 5140 is a typo 40 heads do not divide
    assert GPT3_SIZES["gpt3-125m"][1:6] == (12, 768, 12, 256, 6.0e-4)


@pytest.mark.parametrize("name", ["tiny-cpu", "demo-cpu"])
def test_parameter_formula_counts_the_real_module(name):
    cfg = config_from_dict({"preset": name}, ["model.qkv_bias=false"] if name == "demo-cpu" else [])
    model = GPT(cfg.model, Group.solo())
    actual = sum(p.numel() for p in model.parameters())
    assert actual == num_parameters(cfg.model, vocab_rows=padded_vocab_size(cfg.model))


def test_tiny_presets_exist():
    assert {"tiny-cpu", "demo-cpu"} <= set(PRESETS)


def test_a_model_that_cannot_be_exported_says_so_at_launch(tmp_path, caplog):
    from megagpt.parallel.context import ParallelContext
    from megagpt.train.run import pretrain

    base = ["train.iters=1", "train.eval_iters=0", "logging.tensorboard=false", "logging.memory_report=false"]
    for qkv_bias, warned in (("true", True), ("false", False)):
        caplog.clear()
        cfg = config_from_dict(
            {"preset": "tiny-cpu"}, [*base, f"model.qkv_bias={qkv_bias}", f"logging.dir={tmp_path / qkv_bias}"]
        )
        with caplog.at_level("WARNING"):
            pretrain(cfg, ParallelContext.single_process())
        assert ("this model will not export to Hugging Face" in caplog.text) == warned
