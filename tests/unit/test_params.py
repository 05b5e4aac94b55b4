"""The parameter contract (parallel/params.py): each parameter's ParamSpec, as the layers set it and as
finalize_grads, the gradient norm and checkpoints read it. Models are built on the meta device for planned ranks
of a tp=2, pp=2 layout, with no processes."""

from __future__ import annotations

import pytest
import torch

import megagpt.parallel.grads as grads_module
from megagpt.checkpoint.format import TensorShard
from megagpt.checkpoint.rank_state import writes_weight
from megagpt.model.build import build_model
from megagpt.parallel.context import ParallelContext
from megagpt.parallel.grads import finalize_grads, global_grad_norm
from megagpt.parallel.params import ParamSpec, copy_spec, set_spec, spec_of, update_spec
from megagpt.parallel.topology import Topology
from tests.conftest import tiny_config

TP2_PP2 = Topology(tp=2, dp=1, pp=2)  # ranks 0, 1: first stage (tp 0, 1); ranks 2, 3: last stage


def planned_chunks(rank: int, *overrides: str):
    cfg = tiny_config("parallel.tp=2", "parallel.pp=2", "parallel.sequence_parallel=true", *overrides)
    ctx = ParallelContext.planned(TP2_PP2, rank)
    with torch.device("meta"):
        return build_model(cfg, ctx), ctx


def expected_spec(name: str, first_stage: bool) -> ParamSpec:
    """What the layers promise for each parameter of the tp=2, sequence-parallel GPT."""
    if name == "wte.weight":
        return ParamSpec(tp_split_dim=0, tied_embedding=True, embedding_copy=not first_stage)
    if name == "wpe.weight" or ".ln_" in name or name.startswith("ln_f."):
        return ParamSpec(sequence_parallel=True)
    if name.endswith(("qkv.weight", "qkv.bias", "fc.weight", "fc.bias")):
        return ParamSpec(tp_split_dim=0)  # column parallel: split by output rows
    if name.endswith("proj.weight"):
        return ParamSpec(tp_split_dim=1)  # row parallel: split by input columns
    if name.endswith("proj.bias"):
        return ParamSpec(sequence_parallel=True)  # added after the reduce-scatter, on a sequence shard
    raise AssertionError(f"no expectation for {name}")


def test_unmarked_parameters_are_plain_replicas():
    param = torch.nn.Parameter(torch.zeros(3))
    assert spec_of(param) == ParamSpec()
    assert spec_of(param) == ParamSpec(tp_split_dim=None, sequence_parallel=False, tied_embedding=False)
    assert not spec_of(param).tp_split and not spec_of(param).own_bucket
    assert spec_of(param).counted_on(0) and not spec_of(param).counted_on(1)


def test_specs_are_frozen_and_consistent():
    spec = ParamSpec(tp_split_dim=1)
    with pytest.raises(AttributeError):
        spec.tp_split_dim = 0
    with pytest.raises(ValueError, match="tied_embedding"):
        ParamSpec(embedding_copy=True)


def test_update_and_copy_keep_one_attribute():
    param = torch.nn.Parameter(torch.zeros(4, 2))
    update_spec(param, tp_split_dim=0)
    update_spec(param, sequence_parallel=True)
    assert spec_of(param) == ParamSpec(tp_split_dim=0, sequence_parallel=True)
    other = torch.nn.Parameter(torch.zeros(2))
    assert copy_spec(param, other) is other and spec_of(other) == spec_of(param)
    set_spec(other, ParamSpec())
    assert spec_of(other) == ParamSpec() and spec_of(param).tp_split_dim == 0
    old_marks = {"tensor_parallel", "partition_dim", "sequence_parallel", "embedding_replica"}
    assert not old_marks & set(vars(param))


@pytest.mark.parametrize("rank", range(4))
def test_every_parameter_of_a_tp2_pp2_model_has_its_spec(rank):
    chunks, ctx = planned_chunks(rank)
    first_stage = ctx.pp_group.index == 0
    names = set()
    for name, param in chunks[0].named_parameters():
        assert spec_of(param) == expected_spec(name, first_stage), name
        names.add(name)
    assert "wte.weight" in names  # both stages hold the tied embedding
    assert ("wpe.weight" in names) == first_stage and ("ln_f.weight" in names) != first_stage


def test_the_two_embedding_meanings_stay_apart():
    """Both holders take part in the embedding all-reduce; only the last stage's copy is left out of the norm and
    the checkpoint. Folding one meaning into the other would hang the all-reduce or count the embedding twice."""
    first = spec_of(planned_chunks(0)[0][0].wte.weight)
    last = spec_of(planned_chunks(2)[0][0].wte.weight)
    assert first.tied_embedding and last.tied_embedding
    assert first.own_bucket and last.own_bucket
    assert not first.embedding_copy and last.embedding_copy
    assert first.counted_on(0) and first.counted_on(1)
    assert not last.counted_on(0) and not last.counted_on(1)
    # pp=1: the one stage embeds and projects with the same tensor, which is no copy.
    with torch.device("meta"):
        solo = build_model(tiny_config(), ParallelContext.single_process("meta"))
    assert spec_of(solo[0].wte.weight) == ParamSpec(tp_split_dim=0, tied_embedding=True)


def test_checkpoints_split_and_write_by_the_spec():
    chunks, ctx = planned_chunks(3)  # last stage, tp rank 1
    params = dict(chunks[0].named_parameters())
    row_weight = next(p for name, p in params.items() if name.endswith("attn.proj.weight"))
    shard = TensorShard.of("x", row_weight, 1, 2)
    assert (shard.dim, shard.tp_rank, shard.tp_size) == (1, 1, 2)
    assert TensorShard.of("x", params["ln_f.weight"], 1, 2).dim == -1
    embedding = params["wte.weight"]
    assert not writes_weight(embedding, TensorShard.of("wte.weight", embedding, 1, 2), tp_index=1, dp_index=0)
    first = planned_chunks(1)[0][0].wte.weight
    assert writes_weight(first, TensorShard.of("wte.weight", first, 1, 2), tp_index=1, dp_index=0)


def test_spec_survives_to_empty_when_copied_as_inference_does():
    """to_empty makes new Parameter objects, without the spec; inference.py copies it from the meta model."""
    model = planned_chunks(2)[0][0]
    planned = dict(model.named_parameters())
    model = model.to_empty(device="cpu")
    fresh = dict(model.named_parameters())
    assert all(fresh[name] is not planned[name] for name in planned)
    assert spec_of(fresh["wte.weight"]) == ParamSpec()  # dropped: the reason for the copy
    for name, param in fresh.items():
        copy_spec(planned[name], param)
    for name, param in fresh.items():
        assert spec_of(param) == expected_spec(name, first_stage=False), name


@pytest.mark.parametrize("rank", [0, 2, 3])
def test_finalize_grads_order_and_members(monkeypatch, rank):
    """dp reduction first, then one flat tp all-reduce of the sequence-parallel grads, then the tied embedding's
    sum over the embedding group on both stages (the last stage's is a copy, the first stage's is not); the norm
    counts tp slices everywhere, replicas on tp rank 0, and the embedding once."""
    chunks, ctx = planned_chunks(rank)
    named = {}
    for name, model_param in chunks[0].named_parameters():
        named[name] = copy_spec(model_param, torch.nn.Parameter(torch.zeros(model_param.shape)))
        named[name].grad = torch.ones(model_param.shape)
    params = list(named.values())
    calls = []

    class Buckets:
        def finish(self):
            calls.append(("dp finish", None, None))

    def record(tensor, group, *args, **kwargs):
        calls.append(("all_reduce", tensor.numel(), group))

    monkeypatch.setattr(grads_module, "all_reduce", record)
    finalize_grads(Buckets(), params, ctx)
    replicas = [n for n in named if expected_spec(n, ctx.pp_group.index == 0).tp_split_dim is None]
    assert replicas and all(spec_of(named[n]).sequence_parallel for n in replicas)
    assert calls == [
        ("dp finish", None, None),
        ("all_reduce", sum(named[n].numel() for n in replicas), ctx.tp_group),
        ("all_reduce", named["wte.weight"].numel(), ctx.embedding_group),
    ]

    norm = global_grad_norm(params, ctx.tp_group, ctx.pp_group)
    counted = [n for n in named if n not in replicas or ctx.tp_group.index == 0]
    if ctx.pp_group.index == 1:
        counted.remove("wte.weight")
    assert norm.item() == pytest.approx(sum(named[n].numel() for n in counted) ** 0.5)
