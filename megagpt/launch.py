"""Which process am I? Rank discovery from the launcher's environment: torchrun, Slurm's srun, or MPI.

    torchrun  RANK, WORLD_SIZE, LOCAL_RANK (+ LOCAL_WORLD_SIZE); it sets MASTER_ADDR / MASTER_PORT itself.
    srun      SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID (+ the tasks per node), in a job step (SLURM_STEP_ID).
              Master: the first host of SLURM_JOB_NODELIST (`scontrol show hostnames`, else the compressed list
              parsed here); port: 20000 + job id % 20000, so jobs that share a first node do not collide.
    mpirun    Open MPI's OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK,LOCAL_SIZE}, or MPICH / Intel MPI's PMI_RANK,
              PMI_SIZE, MPI_LOCALRANKID, MPI_LOCALNRANKS (without the local two, mpi4py says which ranks share
              the node). Master: MASTER_ADDR / MASTER_PORT when set, else rank 0's address and a free port, sent
              to every rank with mpi4py.
    none      one process.

The first launcher whose variables are present wins, in that order (torchrun inside an srun task is torchrun).
Variables of a launcher that are only partly there, or that contradict each other, are an error naming them,
not a guess. MASTER_ADDR / MASTER_PORT given in the environment always win.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass

import torch

from megagpt.errors import UserError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
SLURM_VARS = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
OPEN_MPI_VARS = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE")
PMI_VARS = ("PMI_RANK", "PMI_SIZE")


@dataclass(frozen=True)
class LaunchInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int  # processes on this node
    source: str  # "single process", "torchrun", "slurm" or "mpi"
    master_addr: str | None = None  # where rank 0 listens (None: torchrun set it, or one process)
    master_port: int | None = None

    def export_rendezvous(self) -> None:
        """Set MASTER_ADDR / MASTER_PORT for torch.distributed's env:// rendezvous (the user's values win)."""
        if self.master_addr is not None:
            os.environ.setdefault("MASTER_ADDR", self.master_addr)
        if self.master_port is not None:
            os.environ.setdefault("MASTER_PORT", str(self.master_port))


def _int_env(env: dict, name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise UserError(
            f"environment variable {name}={env[name]!r} is not an integer; fix the launch command"
        ) from None


def _require_all(env: dict, names: tuple[str, ...], launcher: str, fix: str) -> None:
    present = [name for name in names if name in env]
    if present and len(present) != len(names):
        missing = [name for name in names if name not in env]
        raise UserError(f"the environment sets {', '.join(present)} but not {', '.join(missing)}; {fix}")


def _check_ranks(rank: int, world: int, local: int, local_world: int, names: str) -> None:
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"{names}: rank {rank} is outside a world of {world}; fix the launch command")
    if local_world < 1 or not 0 <= local < local_world or local_world > world:
        raise UserError(
            f"{names}: local rank {local} of {local_world} on this node does not fit a world of {world}; "
            f"fix the launch command"
        )


def discover_launch(env: dict | None = None) -> LaunchInfo:
    env = dict(os.environ) if env is None else env
    _require_all(env, TORCHRUN_VARS, "torchrun", "launch with torchrun, or unset these variables to run one process")
    if all(name in env for name in TORCHRUN_VARS):
        return _from_torchrun(env)
    _require_all(env, OPEN_MPI_VARS, "mpirun", "launch with mpirun, or unset these variables")
    _require_all(env, PMI_VARS, "mpirun", "launch with mpirun / mpiexec, or unset these variables")
    mpi = all(name in env for name in OPEN_MPI_VARS) or all(name in env for name in PMI_VARS)
    if "SLURM_STEP_ID" in env:  # inside an srun job step (a batch script alone has no step id)
        _require_all(env, SLURM_VARS, "srun", "launch with srun, or unset these variables")
        if all(name in env for name in SLURM_VARS):
            # mpirun inside an allocation starts its per-node daemons with srun: the ranks then inherit that
            # step's variables (one task per node). MPI's own world is the ranks' when the two disagree.
            if not (mpi and _mpi_world_size(env) != _int_env(env, "SLURM_NTASKS")):
                return _from_slurm(env)
    if mpi:
        return _from_mpi(env)
    return LaunchInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, source="single process")


def _mpi_world_size(env: dict) -> int:
    return _int_env(env, "OMPI_COMM_WORLD_SIZE" if "OMPI_COMM_WORLD_SIZE" in env else "PMI_SIZE")


def _from_torchrun(env: dict) -> LaunchInfo:
    rank, world_size, local_rank = (_int_env(env, name) for name in TORCHRUN_VARS)
    local_world_size = _int_env(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else world_size
    _check_ranks(rank, world_size, local_rank, local_world_size, "RANK / WORLD_SIZE / LOCAL_RANK")
    return LaunchInfo(rank, world_size, local_rank, local_world_size, source="torchrun")


def _from_slurm(env: dict) -> LaunchInfo:
    rank, world_size, local_rank = (_int_env(env, name) for name in SLURM_VARS)
    local_world_size = _slurm_tasks_on_this_node(env, world_size)
    _check_ranks(rank, world_size, local_rank, local_world_size, "SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID")
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise UserError("srun set SLURM_PROCID but no SLURM_JOB_NODELIST to find the first node; fix the job")
    port = 20000 + _int_env(env, "SLURM_JOB_ID") % 20000 if "SLURM_JOB_ID" in env else 29500
    return LaunchInfo(rank, world_size, local_rank, local_world_size, "slurm", first_host(nodelist), port)


def _slurm_tasks_on_this_node(env: dict, world_size: int) -> int:
    """Tasks on this node: SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE read at this node's index
    ("4(x2),3" means 4, 4, 3 tasks on the step's three nodes)."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if not spec:
        return world_size
    counts = []
    for part in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            raise UserError(f"cannot read the tasks per node {spec!r} from the Slurm environment")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    node = _int_env(env, "SLURM_NODEID") if "SLURM_NODEID" in env else 0
    return counts[node] if node < len(counts) else counts[-1]


def _from_mpi(env: dict) -> LaunchInfo:
    if all(name in env for name in OPEN_MPI_VARS):
        rank, world_size = (_int_env(env, name) for name in OPEN_MPI_VARS)
        local_names = ("OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE")
    else:
        rank, world_size = (_int_env(env, name) for name in PMI_VARS)
        local_names = ("MPI_LOCALRANKID", "MPI_LOCALNRANKS")
    if all(name in env for name in local_names):
        local_rank, local_world_size = (_int_env(env, name) for name in local_names)
    else:  # an MPI that does not say which ranks share a node: ask MPI itself
        local_rank, local_world_size = _mpi_node_ranks(local_names)
    _check_ranks(rank, world_size, local_rank, local_world_size, "the MPI rank variables")
    addr, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    if addr is None or port is None:
        addr, port = _mpi_rendezvous(rank, addr, port)
    return LaunchInfo(rank, world_size, local_rank, local_world_size, "mpi", addr, int(port))


def _import_mpi(missing_message: str):
    """mpi4py's MPI module, or a UserError saying what it was needed for and how to install it."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise UserError(missing_message) from None
    return MPI


def _mpi_rendezvous(rank: int, addr: str | None, port: str | None) -> tuple[str, int]:
    """Rank 0's address and a free port of its host, sent to every rank over MPI."""
    MPI = _import_mpi(
        "launched by MPI without MASTER_ADDR / MASTER_PORT, and mpi4py (which would find them) is not "
        "installed: pip install 'megagpt[mpi]', or export MASTER_ADDR and MASTER_PORT to every rank"
    )
    mine = None
    if rank == 0:
        # Rank 0's host name, resolved by each rank (as torchrun does): its own resolution of itself may be a
        # loopback address (Debian maps the host name to 127.0.1.1), which other nodes cannot reach.
        mine = (addr or socket.gethostname(), int(port) if port else _free_port())
    return MPI.COMM_WORLD.bcast(mine, root=0)


def _mpi_node_ranks(missing: tuple[str, ...]) -> tuple[int, int]:
    """(rank on this node, ranks on this node), from the ranks that share this node's memory."""
    MPI = _import_mpi(
        f"launched by MPI without {' / '.join(missing)} (which ranks share a node), and mpi4py (which would "
        "find out) is not installed: pip install 'megagpt[mpi]'"
    )
    node = MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED)
    return node.Get_rank(), node.Get_size()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def first_host(nodelist: str) -> str:
    """The first host of a Slurm nodelist: `scontrol show hostnames` where it exists, else parsed here."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30
            )
            if out.returncode == 0 and out.stdout.split():
                return out.stdout.split()[0]
        except (OSError, subprocess.TimeoutExpired):
            pass
    return expand_hostlist(nodelist)[0]


def expand_hostlist(nodelist: str) -> list[str]:
    """Expand Slurm's compressed host list: "gpu[001-003,007],login-a[1-2]-ib" ->
    gpu001 gpu002 gpu003 gpu007 login-a1-ib login-a2-ib. Zero padding is kept."""
    hosts = []
    for item in _split_top_level(nodelist):
        hosts += _expand_item(item)
    if not hosts:
        raise UserError(f"the Slurm nodelist {nodelist!r} holds no host")
    return hosts


def _split_top_level(nodelist: str) -> list[str]:
    items, depth, current = [], 0, ""
    for ch in nodelist.strip():
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    if depth != 0:
        raise UserError(f"the Slurm nodelist {nodelist!r} has unbalanced brackets")
    return [item for item in items + [current] if item]


def _expand_item(item: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", item)
    if match is None:
        return [item]
    head, tail = item[: match.start()], item[match.end() :]
    values = []
    for part in match.group(1).split(","):
        low, _, high = part.partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise UserError(f"cannot read the range {part!r} in the Slurm nodelist item {item!r}")
        width = len(low)
        values += [str(n).zfill(width) for n in range(int(low), int(high or low) + 1)]
    return [expanded for value in values for expanded in _expand_item(head + value + tail)]


def resolve_device(
    requested: str, local_rank: int, local_world_size: int = 1, source: str = "torchrun", env=None
) -> torch.device:
    """train.device: auto -> cuda:local_rank when a GPU is present, else cpu. Each local rank takes its own GPU;
    a task its launcher bound to a GPU of its own (one visible) takes that one. More processes on a node than
    GPUs for them is refused here, in a sentence, rather than by NCCL's "Duplicate GPU" at the first collective."""
    env = os.environ if env is None else env
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
        visible = torch.cuda.device_count()
        if visible == 1 and _bound_to_its_own_gpu(source, local_world_size, env):
            local_rank = 0  # its one visible GPU is device 0, whatever the local rank
        elif local_world_size > visible:
            raise UserError(
                f"{local_world_size} processes on this node but {visible} visible GPUs; launch at most {visible} "
                "per node (--nproc_per_node), bind one GPU per task, or use train.device=cpu"
            )
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _bound_to_its_own_gpu(source: str, local_world_size: int, env) -> bool:
    """Whether the launcher gave this task a GPU of its own through CUDA_VISIBLE_DEVICES: srun --gpus-per-task=1
    or --gpu-bind, or an MPI wrapper script, do. torchrun never does, so there N processes that see one GPU all
    see the same one; so does a Slurm step with fewer GPUs on the node (SLURM_STEP_GPUS) than tasks."""
    if local_world_size == 1:
        return True
    if "CUDA_VISIBLE_DEVICES" not in env or source not in ("slurm", "mpi"):
        return False
    step_gpus = env.get("SLURM_STEP_GPUS") or env.get("SLURM_JOB_GPUS")
    if source == "slurm" and step_gpus:
        return len(step_gpus.split(",")) >= local_world_size
    return True


def set_cpu_threads(local_world_size: int) -> None:
    """Share the node's cores among its processes, so N ranks on one CPU do not oversubscribe it."""
    try:
        cores = len(os.sched_getaffinity(0))  # the cores this process may run on (a Slurm task's, a cgroup's)
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // local_world_size))
