"""What a checkpoint saves, component by component: each one's state_dict() / load_state_dict() round trip (the
optimizer's pieces, the tensor-parallel RNG, the training position; the loss scaler's is in test_loss_scaler.py),
and metadata.json's dataclass: written and read back alike, damaged or foreign files refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megagpt.checkpoint.format import CheckpointError, CheckpointMetadata, layout_record
from megagpt.parallel.context import ParallelContext
from megagpt.parallel.data_parallel import GradBuckets
from megagpt.parallel.random import TensorParallelRNG
from megagpt.train.optimizer import MainParamOptimizer
from megagpt.train.trainer import TrainState
from tests.conftest import tiny_config


def optimizer_for(dtype: torch.dtype, seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)).to(dtype)
    ctx = ParallelContext.single_process()
    return model, MainParamOptimizer(GradBuckets(model.parameters(), ctx.dp_group, 1e9), tiny_config().optim, ctx)


def train_step(model, optimizer, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.main_grad.copy_(torch.randn(param.main_grad.shape, generator=generator))
    optimizer.step(1e-2)


def retargeted(state: dict, optimizer: MainParamOptimizer) -> dict:
    """state (another optimizer's state_dict) naming this optimizer's parameters, piece for piece."""
    mine = optimizer.state_dict()["pieces"]
    return {**state, "pieces": [{**theirs, "param": own["param"]} for theirs, own in zip(state["pieces"], mine)]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_optimizer_state_round_trips_and_training_continues_exactly(dtype):
    model, optimizer = optimizer_for(dtype, seed=1)
    for step in range(2):
        train_step(model, optimizer, seed=10 + step)
    state = optimizer.state_dict()
    assert state["step"] == 2.0 and state["sharded"] is False
    assert len(state["pieces"]) == 4  # two weights, two biases; zero=0: each parameter whole
    assert all(("main" in piece) == (dtype != torch.float32) for piece in state["pieces"])  # main: only a copy

    other_model, other = optimizer_for(dtype, seed=2)
    if dtype == torch.float32:  # an fp32 model's main weights are its parameters: a checkpoint loads them so
        other_model.load_state_dict(model.state_dict())
    other.load_state_dict(retargeted(state, other))
    loaded = other.state_dict()
    assert loaded["step"] == 2.0
    for mine, theirs in zip(state["pieces"], loaded["pieces"]):
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in ("exp_avg", "exp_avg_sq", "main") if k in mine)

    train_step(model, optimizer, seed=12)
    train_step(other_model, other, seed=12)
    for a, b in zip(model.parameters(), other_model.parameters()):
        assert torch.equal(a, b)  # the same step from the same state: bit for bit


def test_the_optimizer_loads_any_part_of_its_state_and_refuses_a_piece_it_lacks():
    model, optimizer = optimizer_for(torch.float32, seed=1)
    first, second = optimizer.state_dict()["pieces"][:2]
    optimizer.load_state_dict({"pieces": [{"param": first["param"], "start": 0, "exp_avg": torch.ones(first["end"])}]})
    state = optimizer.state_dict()
    assert torch.equal(state["pieces"][0]["exp_avg"], torch.ones(first["end"]))
    assert not state["pieces"][0]["exp_avg_sq"].any() and not state["pieces"][1]["exp_avg"].any()
    assert state["step"] == 0.0  # no "step" given: Adam's count untouched
    with pytest.raises(KeyError, match="no piece starting at 5"):
        optimizer.load_state_dict({"pieces": [{"param": second["param"], "start": 5}]})


def test_the_tensor_parallel_rng_state_round_trips_and_reseeds_like_a_new_one():
    rng = TensorParallelRNG(5, tp_rank=1)
    with rng.fork():
        torch.rand(3)
    saved = rng.state_dict()
    with rng.fork():
        expected = torch.rand(3)
    assert not torch.equal(saved["tp_state"], rng.state_dict()["tp_state"])  # a copy, not the live state
    other = TensorParallelRNG(99, tp_rank=1)
    other.load_state_dict(saved)
    with other.fork():
        assert torch.equal(torch.rand(3), expected)

    torch.manual_seed(0)
    default = torch.get_rng_state()
    other.reseed(7)
    assert torch.equal(other.state_dict()["tp_state"], TensorParallelRNG(7, tp_rank=1).state_dict()["tp_state"])
    assert torch.equal(torch.get_rng_state(), default)  # the default stream is left where it was


def test_the_training_position_round_trips():
    state = TrainState(step=7, consumed_samples=56, history=[{"step": 7}])
    fresh = TrainState()
    fresh.load_state_dict(state.state_dict())
    assert (fresh.step, fresh.consumed_samples) == (7, 56)
    assert state.state_dict() == {"step": 7, "consumed_samples": 56}


# ----------------------------------------------------------------------------------------------------------------
# metadata.json

WHERE = Path("ck/step_00000003/metadata.json")


def metadata(**changes) -> CheckpointMetadata:
    fields = dict(
        step=3, consumed_samples=24, train_samples=48, adam_step=3.0, layout=layout_record(2, 1, 2, 1, 1),
        precision="fp16", seed=1234, model={"num_layers": 4, "hidden_size": 64}, loss_scaler={"scale": 1024.0},
        files={"rank_00000.pt": {"bytes": 10, "sha256": "ab"}}, index=[["weight", "wte.weight", "rank_00000.pt", 0]],
    )  # fmt: skip
    return CheckpointMetadata(**{**fields, **changes})


def test_metadata_round_trips_in_the_order_earlier_versions_wrote():
    meta = metadata()
    text = meta.to_json()
    assert CheckpointMetadata.from_json(text, WHERE) == meta
    assert list(json.loads(text)) == [
        "format", "step", "consumed_samples", "train_samples", "adam_step", "layout", "precision", "seed", "model",
        "loss_scaler", "files", "index",
    ]  # fmt: skip
    assert json.loads(text)["layout"] == {"tp": 2, "pp": 1, "dp": 2, "vpp": 1, "zero": 1, "world_size": 4}
    # Provenance is written only where there is some, and read back.
    resharded = metadata(resharded_from={"path": "a", "layout": layout_record(1, 1, 1, 1, 0)})
    assert CheckpointMetadata.from_json(resharded.to_json(), WHERE) == resharded
    assert "converted_from" not in json.loads(resharded.to_json())


def test_metadata_as_the_first_format_wrote_it_reads():
    """A metadata.json of a converted model, key for key as hf.py wrote it before the dataclass existed."""
    written = {
        "step": 0, "consumed_samples": 0, "train_samples": None, "adam_step": 0.0, "precision": "fp32", "seed": 1234,
        "model": {"num_layers": 2}, "loss_scaler": None,
        "layout": {"tp": 1, "pp": 1, "dp": 1, "vpp": 1, "zero": 0, "world_size": 1},
        "converted_from": {"path": "/hf", "model_type": "gpt2"}, "format": 1, "files": {}, "index": [],
    }  # fmt: skip
    meta = CheckpointMetadata.from_json(json.dumps(written), WHERE)
    assert meta.converted_from == {"path": "/hf", "model_type": "gpt2"} and meta.layout == layout_record(1, 1, 1, 1, 0)
    assert json.loads(meta.to_json()) == written


def test_damaged_or_foreign_metadata_is_refused_naming_the_field():
    record = json.loads(metadata().to_json())
    for key in ("step", "consumed_samples", "model", "layout", "files", "index"):
        missing = {k: v for k, v in record.items() if k != key}
        with pytest.raises(
            CheckpointError, match=f"metadata.json lacks '{key}' .* required\\): the checkpoint is damaged"
        ):
            CheckpointMetadata.from_json(json.dumps(missing), WHERE)
    with pytest.raises(CheckpointError, match="metadata.json has a str as 'step' \\(a int is required\\)"):
        CheckpointMetadata.from_json(json.dumps({**record, "step": "3"}), WHERE)
    with pytest.raises(CheckpointError, match="metadata.json holds 'shards', which no megagpt writes: the checkpoint"):
        CheckpointMetadata.from_json(json.dumps({**record, "shards": 2}), WHERE)
    with pytest.raises(CheckpointError, match="metadata.json has format 2; this megagpt reads 1"):
        CheckpointMetadata.from_json(json.dumps({**record, "format": 2}), WHERE)
    with pytest.raises(CheckpointError, match="metadata.json is not valid JSON"):
        CheckpointMetadata.from_json("{", WHERE)
    with pytest.raises(CheckpointError, match="holds a list, not an object"):
        CheckpointMetadata.from_json("[1, 2]", WHERE)
