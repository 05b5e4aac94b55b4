"""Rank discovery (megagpt/launch.py) from torchrun, srun and mpirun environments, without launching anything
(the real launchers are exercised in tests/e2e/test_launchers.py)."""

from __future__ import annotations

import builtins
import sys
import types

import pytest
import torch

from megagpt.errors import UserError
from megagpt.launch import discover_launch, expand_hostlist, first_host, resolve_device


def test_one_process_and_torchrun():
    assert discover_launch({}).source == "single process"
    info = discover_launch({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"})
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size, info.source) == (3, 8, 1, 4, "torchrun")
    assert info.master_addr is None  # torchrun sets MASTER_ADDR itself
    with pytest.raises(UserError, match="sets RANK, WORLD_SIZE but not LOCAL_RANK"):
        discover_launch({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(UserError, match="rank 4 is outside a world of 4"):
        discover_launch({"RANK": "4", "WORLD_SIZE": "4", "LOCAL_RANK": "0"})
    with pytest.raises(UserError, match="RANK='x' is not an integer"):
        discover_launch({"RANK": "x", "WORLD_SIZE": "4", "LOCAL_RANK": "0"})


SRUN = {
    "SLURM_STEP_ID": "0",
    "SLURM_JOB_ID": "123456",
    "SLURM_PROCID": "9",
    "SLURM_NTASKS": "16",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
    "SLURM_JOB_NODELIST": "gpu[007-008]",
}


def test_srun_one_task_per_gpu():
    info = discover_launch(SRUN)
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size, info.source) == (9, 16, 1, 8, "slurm")
    assert (info.master_addr, info.master_port) == ("gpu007", 20000 + 123456 % 20000)
    uneven = discover_launch({**SRUN, "SLURM_STEP_TASKS_PER_NODE": "5(x1),3", "SLURM_PROCID": "6", "SLURM_NTASKS": "8"})
    assert uneven.local_world_size == 3  # node 1 of "5,3"
    # torchrun inside an srun task is torchrun; a batch script outside srun (no step) is one process.
    torchrun_in_srun = {**SRUN, "RANK": "0", "WORLD_SIZE": "16", "LOCAL_RANK": "0"}
    assert discover_launch(torchrun_in_srun).source == "torchrun"
    batch_script = {k: v for k, v in SRUN.items() if k != "SLURM_STEP_ID"}
    assert discover_launch(batch_script).source == "single process"


def test_srun_environments_that_do_not_add_up_are_named():
    with pytest.raises(UserError, match="sets SLURM_PROCID, SLURM_LOCALID but not SLURM_NTASKS"):
        discover_launch({k: v for k, v in SRUN.items() if k != "SLURM_NTASKS"})
    with pytest.raises(UserError, match="SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID: rank 16 is outside"):
        discover_launch({**SRUN, "SLURM_PROCID": "16"})
    with pytest.raises(UserError, match="local rank 8 of 8"):
        discover_launch({**SRUN, "SLURM_LOCALID": "8"})
    with pytest.raises(UserError, match="no SLURM_JOB_NODELIST"):
        discover_launch({k: v for k, v in SRUN.items() if k != "SLURM_JOB_NODELIST"})


def test_slurm_host_lists():
    assert expand_hostlist("gpu[001-003,007],login1") == ["gpu001", "gpu002", "gpu003", "gpu007", "login1"]
    assert expand_hostlist("rack[1-2]-node[08-09]") == ["rack1-node08", "rack1-node09", "rack2-node08", "rack2-node09"]
    assert expand_hostlist("a,b[3]") == ["a", "b3"]
    assert first_host("node[0099-0101]") == "node0099"
    with pytest.raises(UserError, match="unbalanced brackets"):
        expand_hostlist("gpu[1-2")


def test_mpirun_open_mpi_and_mpich():
    open_mpi = {
        "OMPI_COMM_WORLD_RANK": "2",
        "OMPI_COMM_WORLD_SIZE": "4",
        "OMPI_COMM_WORLD_LOCAL_RANK": "2",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29400",
    }
    info = discover_launch(open_mpi)
    assert (info.rank, info.world_size, info.local_rank, info.source) == (2, 4, 2, "mpi")
    assert (info.master_addr, info.master_port) == ("10.0.0.1", 29400)
    mpich = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2", **open_mpi}
    del mpich["OMPI_COMM_WORLD_RANK"], mpich["OMPI_COMM_WORLD_SIZE"]
    assert discover_launch(mpich).rank == 1
    with pytest.raises(UserError, match="sets OMPI_COMM_WORLD_RANK but not OMPI_COMM_WORLD_SIZE"):
        discover_launch({"OMPI_COMM_WORLD_RANK": "0"})


def test_mpirun_without_mpi4py_or_master_says_what_to_do(monkeypatch):
    real_import = builtins.__import__

    def no_mpi4py(name, *args, **kwargs):
        if name.startswith("mpi4py"):
            raise ImportError("no mpi4py")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mpi4py)
    ranks = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}
    local = {"OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    with pytest.raises(UserError, match="without MASTER_ADDR / MASTER_PORT, and mpi4py .* is not installed: pip"):
        discover_launch({**ranks, **local})
    with pytest.raises(UserError, match="without OMPI_COMM_WORLD_LOCAL_RANK / OMPI_COMM_WORLD_LOCAL_SIZE .* and "
                       "mpi4py .* is not installed: pip install 'megagpt\\[mpi\\]'"):  # fmt: skip
        discover_launch({**ranks, "MASTER_ADDR": "n1", "MASTER_PORT": "29400"})


def test_mpi_without_local_rank_variables_asks_mpi_which_ranks_share_the_node(monkeypatch):
    """PMI_RANK / PMI_SIZE alone (an MPI that does not export local ranks): the node's ranks come from MPI's
    shared-memory split, not from the world (which would make rank 5 of 8 on two nodes ask for GPU 5 of 4)."""
    node = types.SimpleNamespace(Get_rank=lambda: 1, Get_size=lambda: 4)
    world = types.SimpleNamespace(Split_type=lambda kind: node if kind == "shared" else None)
    fake = types.ModuleType("mpi4py")
    fake.MPI = types.SimpleNamespace(COMM_WORLD=world, COMM_TYPE_SHARED="shared")
    monkeypatch.setitem(sys.modules, "mpi4py", fake)
    info = discover_launch({"PMI_RANK": "5", "PMI_SIZE": "8", "MASTER_ADDR": "n1", "MASTER_PORT": "29400"})
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (5, 8, 1, 4)


def test_each_local_rank_takes_its_gpu_or_the_one_it_was_bound_to(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: chosen[-1])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert resolve_device("auto", 3, 8) == torch.device("cuda", 3)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(UserError, match="8 processes on this node but 1 visible GPUs"):  # not 8 ranks on one GPU
        resolve_device("cuda", 3, 8)
    bound = {"CUDA_VISIBLE_DEVICES": "3"}  # srun --gpus-per-task=1: each task sees its own
    assert resolve_device("cuda", 3, 8, "slurm", bound) == torch.device("cuda", 0)
    assert resolve_device("cuda", 3, 8, "mpi", bound) == torch.device("cuda", 0)  # a wrapper script binds
    # torchrun never binds GPUs per process: with CUDA_VISIBLE_DEVICES=0 its 8 processes share one GPU.
    with pytest.raises(UserError, match="8 processes on this node but 1 visible GPUs"):
        resolve_device("cuda", 3, 8, "torchrun", {"CUDA_VISIBLE_DEVICES": "0"})
    # A Slurm step with one GPU on the node (--gres=gpu:1) for 8 tasks: all 8 see the same one.
    with pytest.raises(UserError, match="8 processes on this node but 1 visible GPUs"):
        resolve_device("cuda", 3, 8, "slurm", {"CUDA_VISIBLE_DEVICES": "0", "SLURM_STEP_GPUS": "0"})
    assert resolve_device("cuda", 3, 8, "slurm", {**bound, "SLURM_STEP_GPUS": "0,1,2,3,4,5,6,7"}) == torch.device(
        "cuda", 0
    )
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with pytest.raises(UserError, match="8 processes on this node but 4 visible GPUs"):
        resolve_device("auto", 5, 8)
    assert resolve_device("cpu", 5, 8) == torch.device("cpu")


def test_mpirun_inside_a_slurm_allocation_is_mpi():
    """mpirun starts its per-node daemons with srun; its ranks inherit that step's one-task-per-node variables."""
    env = {**SRUN, "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
           "OMPI_COMM_WORLD_RANK": "9", "OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "8", "MASTER_ADDR": "gpu007", "MASTER_PORT": "29400"}  # fmt: skip
    info = discover_launch(env)
    assert (info.source, info.rank, info.world_size, info.local_rank) == ("mpi", 9, 16, 1)
