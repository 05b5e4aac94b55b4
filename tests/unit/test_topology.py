import itertools

import pytest
import torch

from megagpt.parallel.topology import Topology


def test_rank_order_is_tp_fastest_then_dp_then_pp():
    topo = Topology(tp=2, dp=2, pp=2)
    assert topo.tp_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert topo.dp_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert topo.pp_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert topo.embedding_groups() == topo.pp_groups()
    assert topo.coords(5) == (1, 0, 1) and topo.rank(1, 0, 1) == 5


@pytest.mark.parametrize("tp, dp, pp", [(1, 1, 1), (4, 1, 1), (1, 4, 1), (2, 3, 4), (8, 8, 16)])
def test_groups_partition_the_world_and_coords_round_trip(tp, dp, pp):
    topo = Topology(tp, dp, pp)
    world = range(topo.world_size)
    for groups, size in ((topo.tp_groups(), tp), (topo.dp_groups(), dp), (topo.pp_groups(), pp)):
        assert sorted(itertools.chain(*groups)) == list(world)  # every rank in exactly one group
        assert all(len(g) == size for g in groups)
    for rank in world:
        assert topo.rank(*topo.coords(rank)) == rank
    for group in topo.tp_groups():  # a tp group is contiguous: inside one node
        assert group == list(range(group[0], group[0] + tp))
    for group in topo.embedding_groups():
        assert len(group) == min(pp, 2)
        assert topo.coords(group[0])[2] == 0 and topo.coords(group[-1])[2] == pp - 1


def test_out_of_range_rank():
    with pytest.raises(ValueError, match="rank 8 is outside a world of 8"):
        Topology(2, 2, 2).coords(8)


def test_nccl_is_bound_to_the_rank_gpu_and_stop_flags_get_a_gloo_group(monkeypatch):
    """On CUDA: init_process_group(device_id=...) creates the NCCL communicator on this rank's GPU at once, and
    a gloo group over the world carries the per-step stop flags as CPU tensors (no wait for the GPU's queue)."""
    import torch.distributed as dist

    from megagpt.parallel.context import ParallelContext

    calls = {"init": None, "groups": []}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.update(init=(backend, kw)))
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_backend", lambda: "nccl")
    monkeypatch.setattr(dist, "new_group", lambda ranks, **kw: calls["groups"].append((ranks, kw)) or object())
    ctx = ParallelContext.initialize(Topology(1, 2, 1), 1, torch.device("cuda", 1))
    backend, kwargs = calls["init"]
    assert backend == "nccl" and kwargs["device_id"] == torch.device("cuda", 1)
    assert calls["groups"][-1][1].get("backend") == "gloo" and calls["groups"][-1][0] == [0, 1]
    assert ctx.host is not ctx.world_group and ctx.host.ranks == (0, 1)
    assert ParallelContext.single_process().host.size == 1
