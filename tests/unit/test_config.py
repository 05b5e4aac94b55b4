import pytest
import yaml

from megagpt.config import Config, config_from_dict, dump_config, load_config, padded_vocab_size, validate
from megagpt.errors import ConfigError


def test_yaml_preset_and_overrides_compose(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("preset: gpt3-125m\ntrain:\n  iters: 7\noptim:\n  lr: 6e-4\n")  # YAML reads 6e-4 as a string
    cfg = load_config(path, ["train.iters=9", "model.attention_pattern=[dense]", "logging.dir=out/x=1"])
    assert cfg.model.num_layers == 12 and cfg.model.hidden_size == 768  # from the preset
    assert cfg.train.iters == 9  # the command line beats the file, which beats the preset
    assert cfg.optim.lr == pytest.approx(6e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.model.attention_pattern == ["dense"]
    assert cfg.logging.dir == "out/x=1"  # str values are taken verbatim


def test_dumped_config_loads_back_identically(tmp_path):
    cfg = config_from_dict({"preset": "demo-cpu"}, ["train.batch_rampup=[8,8,100]", "data.path=[0.3,a,0.7,b]"])
    dump_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["batch_rampup"] == [8, 8, 100]


@pytest.mark.parametrize(
    "raw, overrides, expected",
    [
        ({"model": {"num_layer": 2}}, [], "unknown config key 'model.num_layer'"),
        ({"modle": {}}, [], "unknown config section 'modle'"),
        ({}, ["train.iters=ten"], "config key 'train.iters' got 'ten', but it must be int"),
        ({}, ["train.iters=1.5"], "must be int"),
        ({"train": {"precision": "fp8"}}, [], "must be one of 'fp32', 'bf16', 'fp16'"),
        ({}, ["model.qkv_bias=maybe"], "'model.qkv_bias' got 'maybe', but it must be bool"),
        ({}, ["iters=3"], "must look like section.key=value"),
        ({"preset": "gpt3-9000b"}, [], "unknown preset 'gpt3-9000b'"),
    ],
)
def test_bad_keys_and_types_are_named(raw, overrides, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace("[", r"\[")):
        config_from_dict(raw, overrides)


def test_every_bad_key_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        config_from_dict({}, ["model.num_layerz=1", "train.iters=x", "optim.lr=0.1"])
    assert "unknown config key 'model.num_layerz'" in str(info.value)
    assert "config key 'train.iters' got 'x'" in str(info.value)


def test_degenerate_layouts_are_sentences_not_crashes():
    # world smaller than tp * pp (dp would be 0) with a batch ramp-up, and a zero micro-batch
    assert "world size 1 is not divisible by parallel.tp * parallel.pp = 2" in _problems(
        "parallel.tp=2", "train.batch_rampup=[2,2,10]"
    )
    assert "train.micro_batch_size=0 must be at least 1" in _problems(
        "train.micro_batch_size=0", "train.batch_rampup=[2,2,10]"
    )


def test_missing_config_file_is_one_sentence(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a folder; pass a YAML file"):
        load_config(tmp_path)


def test_unreadable_or_ambiguous_config_files_are_one_sentence(tmp_path):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"preset: tiny-cpu\n# caf\xe9\n")
    with pytest.raises(ConfigError, match=r"is not UTF-8 text \(byte 0xe9 at offset 22\); save it as UTF-8"):
        load_config(latin1)
    twice = tmp_path / "twice.yaml"
    twice.write_text("preset: tiny-cpu\ntrain:\n  iters: 3\n  iters: 5\n")
    with pytest.raises(ConfigError, match=r"twice.yaml: key 'iters' appears twice in one mapping \(lines 3 and 4\)"):
        load_config(twice)
    once = tmp_path / "once.yaml"
    once.write_text("preset: tiny-cpu\ntrain:\n  iters: 3\nmodel:\n  dropout: 0.1\n")
    assert load_config(once).train.iters == 3


def _problems(*overrides, world_size=1):
    cfg = config_from_dict({"preset": "tiny-cpu"}, list(overrides))
    with pytest.raises(ConfigError) as info:
        validate(cfg, world_size)
    return str(info.value)


def test_validate_names_every_offending_value():
    msg = _problems(
        "model.num_heads=5", "model.seq_length=128", "model.max_position_embeddings=64", "train.global_batch_size=7"
    )
    assert "model.num_heads=5 does not divide model.hidden_size=64" in msg
    assert "model.seq_length=128 is above the position table" in msg
    assert "train.global_batch_size=7 is not divisible by micro_batch_size * dp" in msg


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.attention_pattern=[dense,global]", "allowed kinds: dense, local"),
        ("model.dropout=1.0", "model.dropout=1.0 must be in [0, 1)"),
        ("optim.min_lr=1.0", "optim.min_lr=1.0 must be between 0"),
        ("optim.warmup_iters=50", "decay must end after warm-up"),
        ("data.split=90,x,10", "data.split '90,x,10' is not valid"),
        ("train.batch_rampup=[2,4,100]", "not a multiple of increment 4"),
        ("train.batch_rampup=[3,5,100]", "must be multiples of micro_batch_size * dp"),
        ("parallel.zero=4", "parallel.zero=4 must be 0, 1, 2 or 3"),
        ("train.loss_scale=128", "train.loss_scale=128.0 only applies to train.precision=fp16 (got fp32)"),
        ("parallel.pp=3", "model.num_layers=4 does not split into parallel.pp * parallel.vpp = 3 * 1 = 3 equal stages"),
        ("parallel.vpp=2", "parallel.vpp=2 interleaves pipeline stages, so it needs parallel.pp > 1"),
        ("parallel.timeout_s=0", "parallel.timeout_s=0.0 must be positive"),
        ("parallel.tp=3", "parallel.tp=3 does not divide model.num_heads=4"),
        ("parallel.grad_bucket_mb=0", "parallel.grad_bucket_mb=0.0 must be positive"),
        ("checkpoint.save_interval=10", "checkpoint.save_interval needs checkpoint.dir"),
        ("data.synthetic=false", "data.path is not set"),
        ("data.path=corpus", "data.path=corpus is set but data.synthetic=true would train on random tokens"),
    ],
)
def test_validate_rejects_impossible_values(override, expected):
    assert expected in _problems(override)


def test_fp16_loss_scaler_settings_are_checked():
    msg = _problems(
        "train.precision=fp16",
        "train.min_loss_scale=8",
        "train.initial_loss_scale=4",
        "train.loss_scale_backoff=1",
        "train.hysteresis=0",
    )
    assert "train.min_loss_scale=8.0 must be positive and at most train.initial_loss_scale" in msg
    assert "train.loss_scale_backoff=1.0 must be in (0, 1)" in msg
    assert "train.hysteresis must be at least 1" in msg
    validate(config_from_dict({"preset": "tiny-cpu"}, ["train.precision=fp16", "parallel.zero=1"]))


def test_data_blend_and_validation_split_checks():
    assert "is neither a prefix nor a blend" in _problems("data.synthetic=false", "data.path=[0.5,a,b]")
    assert "needs a validation split" in _problems("data.synthetic=false", "data.path=x", "data.split=1,0,0")


def test_interleaved_schedule_needs_micro_batches_in_multiples_of_pp():
    cfg = config_from_dict(
        {"preset": "tiny-cpu"}, ["parallel.pp=2", "parallel.vpp=2", "model.num_layers=4", "train.global_batch_size=6"]
    )
    with pytest.raises(ConfigError, match="multiples of micro_batch_size \\* dp \\* pp = 4"):
        validate(cfg, 2)
    validate(config_from_dict({"preset": "tiny-cpu"}, ["parallel.pp=2", "parallel.vpp=2"]), 2)


def test_world_size_must_match_layout():
    msg = _problems("parallel.tp=2", world_size=3)
    assert "world size 3 is not divisible by parallel.tp * parallel.pp = 2" in msg
    assert "sequence_parallel shards the sequence, but parallel.tp=4 does not divide model.seq_length=66" in _problems(
        "parallel.tp=4",
        "parallel.sequence_parallel=true",
        "model.seq_length=66",
        "model.max_position_embeddings=66",
        world_size=4,
    )
    # dp = 4 / 2 = 2, so micro-batches of 2 need a global batch that 4 divides
    assert "train.global_batch_size=6 is not divisible by micro_batch_size * dp = 2 * 2" in _problems(
        "parallel.tp=2", "train.global_batch_size=6", world_size=4
    )


def test_all_shipped_configs_validate():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
    assert len(configs) == 10
    for path in configs:
        validate(load_config(path), 1)


def test_vocab_padding_rule():
    cfg = Config()
    assert padded_vocab_size(cfg.model) == 50304
    assert padded_vocab_size(cfg.model, tp=8) == 51200


def test_flex_attention_is_refused_where_it_cannot_train():
    msg = _problems("model.attention_backend=flex", "model.dropout=0.1", "train.device=cpu")
    assert "model.attention_backend=flex has no attention dropout but model.dropout=0.1" in msg
    assert "model.attention_backend=flex trains only on CUDA" in msg
    with pytest.raises(ConfigError, match="model.attention_backend"):
        config_from_dict({"preset": "tiny-cpu"}, ["model.attention_backend=splash"])
    for backend in ("auto", "sdpa", "blocked", "fused_softmax"):
        validate(config_from_dict({"preset": "tiny-cpu"}, [f"model.attention_backend={backend}", "model.dropout=0.1"]))


def test_flex_attention_follows_train_device_auto(monkeypatch):
    flex = ["model.attention_backend=flex", "model.dropout=0.0", "train.device=auto"]
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert "train.device=auto runs on the CPU" in _problems(*flex)
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # auto means cuda on a machine with a GPU
    validate(config_from_dict({"preset": "tiny-cpu"}, flex))


def test_pipeline_schedule_must_fit_the_chunk_layout():
    layout = ("parallel.pp=2", "model.num_layers=4")
    assert "parallel.pp_schedule=1f1b runs one model chunk per rank, but parallel.vpp=2" in _problems(
        *layout, "parallel.vpp=2", "parallel.pp_schedule=1f1b", world_size=2
    )
    assert "parallel.pp_schedule=interleaved needs several model chunks per rank" in _problems(
        *layout, "parallel.pp_schedule=interleaved", world_size=2
    )
    assert "parallel.pp_schedule=zb-h2 runs one model chunk per rank, but parallel.vpp=2" in _problems(
        *layout, "parallel.vpp=2", "parallel.pp_schedule=zb-h2", world_size=2
    )
    assert "parallel.pp_schedule=zb-h1 fills the pipeline's bubble, but parallel.pp=1 has none" in _problems(
        "parallel.pp_schedule=zb-h1"
    )
    assert "parallel.pp_schedule=zb-h1 is not built for parallel.zero=2" in _problems(
        *layout, "parallel.zero=2", "parallel.pp_schedule=zb-h1", world_size=2
    )
    for name in ("auto", "zb-h1", "zb-h2", "1f1b"):
        validate(config_from_dict({"preset": "tiny-cpu"}, [*layout, f"parallel.pp_schedule={name}"]), 2)
    for name in ("auto", "interleaved"):
        cfg = config_from_dict({"preset": "tiny-cpu"}, [*layout, "parallel.vpp=2", f"parallel.pp_schedule={name}"])
        validate(cfg, 2)
    with pytest.raises(ConfigError, match="must be one of 'auto', '1f1b', 'interleaved', 'zb-h1', 'zb-h2'"):
        config_from_dict({"preset": "tiny-cpu"}, ["parallel.pp_schedule=zb-v"])
