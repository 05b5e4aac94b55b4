"""Just-in-time builds of our C++/CUDA extensions that never hang and never half-load.

A build goes into its own folder, named after a key of everything that can change the binary: the sources'
contents, the flags, torch's version, its CUDA version, the Python version and, for CUDA, the GPU architectures
compiled for (TORCH_CUDA_ARCH_LIST, else the visible GPUs', pinned for the compiler). So a new torch, a new CUDA,
an edited kernel or another GPU generation (an H100 build on an A100 node) gets a new folder, and two builds
never share one.

    cache root/                  $MEGAGPT_KERNEL_CACHE, else ~/.cache/megagpt/kernels
      NAME-KEY.lock              flock'ed by the one process building; holds its pid and host
      NAME-KEY/                  torch.utils.cpp_extension's build folder (ninja)
        build.log                the compiler's output
        BUILD_OK                 written last, after the module imported: the folder is complete

One process builds while the others wait on the lock, each for at most the build timeout; a lock whose holder
died is free again (flock). On a file system without flock (Lustre mounted without it) each process builds into
a private folder and renames it into place; the first rename wins and the others use it. A folder without
BUILD_OK is a build that was killed or failed: it is deleted and built again. The compiler runs in a child
process of its own session, killed with its whole process group when it runs past the timeout, so a hung
compiler (or torch's own lock file left behind by a killed build) cannot hang training. The first build's time
is logged.

    python -m megagpt.kernels.build SPEC_JSON    # the child: builds one extension into its folder
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from megagpt.errors import UserError
from megagpt.log import get_logger

CSRC = Path(__file__).resolve().parent / "csrc"
DEFAULT_TIMEOUT_S = 900.0
_COMPLETE = "BUILD_OK"


class KernelBuildError(UserError):
    """An extension could not be built or loaded: no compiler, a compile error, a build or lock timeout."""


@dataclass(frozen=True)
class ExtensionSpec:
    """What to build: sources relative to megagpt/kernels/csrc (or absolute), and flags."""

    name: str
    sources: tuple[str, ...]
    cuda: bool = False
    cflags: tuple[str, ...] = ()
    cuda_cflags: tuple[str, ...] = ()
    ldflags: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = field(default=())  # extra environment for the compiler (tests use CXX)

    def source_paths(self) -> list[Path]:
        return [Path(s) if Path(s).is_absolute() else CSRC / s for s in self.sources]


def cache_root() -> Path:
    return Path(os.environ.get("MEGAGPT_KERNEL_CACHE") or Path.home() / ".cache" / "megagpt" / "kernels")


def cuda_arch_list() -> str:
    """The GPU architectures a CUDA build compiles for, as TORCH_CUDA_ARCH_LIST spells them ("8.0;9.0"): that
    variable if set, else the capabilities of the visible GPUs (what torch.utils.cpp_extension would pick)."""
    chosen = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if chosen:
        return chosen
    if not torch.cuda.is_available():
        return ""
    capabilities = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return ";".join(f"{major}.{minor}" for major, minor in capabilities)


def build_key(spec: ExtensionSpec) -> str:
    """A hash of everything that changes the binary."""
    h = hashlib.sha256()
    for path in spec.source_paths():
        h.update(path.name.encode())
        h.update(path.read_bytes())
    for header in sorted([*CSRC.glob("*.h"), *CSRC.glob("*.cuh")]):  # the headers the sources may include
        h.update(header.read_bytes())
    h.update(json.dumps(asdict(spec), sort_keys=True).encode())
    h.update(f"torch {torch.__version__} cuda {torch.version.cuda} py {sys.version_info[:2]}".encode())
    if spec.cuda:
        h.update(f"arch {cuda_arch_list()}".encode())
    return h.hexdigest()[:16]


def build_folder(spec: ExtensionSpec) -> Path:
    return cache_root() / f"{spec.name}-{build_key(spec)}"


@functools.cache
def load_extension(spec: ExtensionSpec, timeout_s: float | None = None):
    """The extension's Python module, built first if no complete build of this key exists.
    Raises KernelBuildError, with the build log's path, when it cannot be had within timeout_s."""
    timeout_s = (
        float(os.environ.get("MEGAGPT_KERNEL_BUILD_TIMEOUT_S", DEFAULT_TIMEOUT_S)) if timeout_s is None else timeout_s
    )
    folder = build_folder(spec)
    if (folder / _COMPLETE).exists():
        return _import(spec.name, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(folder.with_suffix(".lock"), timeout_s, spec.name) as locked:
        if (folder / _COMPLETE).exists():  # another process built it while we waited
            return _import(spec.name, folder)
        if not locked:
            return _build_unlocked(spec, folder, timeout_s)
        if folder.exists():
            get_logger().info(f"kernel build {folder} is incomplete (a killed or failed build): building it again")
            shutil.rmtree(folder)
        _build(spec, folder, timeout_s)
        return _import(spec.name, folder)


def _build(spec: ExtensionSpec, folder: Path, timeout_s: float) -> None:
    """Compile into folder, check the module imports, then mark the folder complete."""
    folder.mkdir()
    start = time.monotonic()
    _build_in_child(spec, folder, timeout_s)
    _import(spec.name, folder)
    seconds = time.monotonic() - start
    (folder / _COMPLETE).write_text(json.dumps({"seconds": round(seconds, 1), "host": socket.gethostname()}))
    get_logger().info(f"built kernel extension {spec.name} in {seconds:.0f}s into {folder}")


def _build_unlocked(spec: ExtensionSpec, folder: Path, timeout_s: float):
    """Without a lock: build into a folder of this process's own, then rename it into place (atomic); when
    another process's rename came first, use that one."""
    private = folder.with_name(f"{folder.name}.{socket.gethostname()}.{os.getpid()}")
    shutil.rmtree(private, ignore_errors=True)
    _build(spec, private, timeout_s)
    try:
        private.rename(folder)
    except OSError:  # the folder exists: a complete build won the race, or a killed one left it behind
        if not (folder / _COMPLETE).exists():
            get_logger().info(f"kernel build {folder} is incomplete and unlocked; using {private}")
            return _import(spec.name, private)
        shutil.rmtree(private, ignore_errors=True)
    return _import(spec.name, folder)


@contextlib.contextmanager
def _exclusive_lock(path: Path, timeout_s: float, name: str):
    """Hold an flock on path (yields True), or yield False when the file system has no locks."""
    with open(path, "a+") as f:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    f.seek(0)
                    holder = f.read().strip() or "an unknown process"
                    raise KernelBuildError(
                        f"waited {timeout_s:.0f}s for the build lock of kernel extension {name} ({path}), held by "
                        f"{holder}; that build is still running or hung: wait for it, kill it, or set "
                        f"MEGAGPT_KERNEL_BUILD_TIMEOUT_S higher"
                    ) from None
                time.sleep(0.1)
            except OSError as e:  # ENOLCK, EOPNOTSUPP, ...: Lustre or NFS mounted without locks
                get_logger().warning(
                    f"cannot lock {path} ({e.strerror or e}): the file system has no file locks, so each process "
                    f"builds kernel extension {name} on its own; set MEGAGPT_KERNEL_CACHE to a local disk to build "
                    f"it once"
                )
                yield False
                return
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}")
        f.flush()
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build_in_child(spec: ExtensionSpec, folder: Path, timeout_s: float) -> None:
    log_path = folder / "build.log"
    env = {**os.environ, **dict(spec.env)}
    env["PATH"] = os.pathsep.join([*_ninja_dirs(), env.get("PATH", "")])
    if spec.cuda and cuda_arch_list():
        env["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list()  # build exactly what the key says
    with open(log_path, "w") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "megagpt.kernels.build", json.dumps({**asdict(spec), "folder": str(folder)})],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group, so a timeout kills ninja and the compilers too
        )
        try:
            status = child.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            raise KernelBuildError(
                f"building kernel extension {spec.name} took longer than {timeout_s:.0f}s and was stopped; "
                f"the log is {log_path} (raise MEGAGPT_KERNEL_BUILD_TIMEOUT_S for a slow machine)"
            ) from None
    if status != 0:
        lines = log_path.read_text(errors="replace").splitlines()
        # The compiler's first errors say what is wrong; the end of the log is only torch's traceback.
        errors = [line.strip() for line in lines if "error" in line.lower() and "Traceback" not in line][:3]
        raise KernelBuildError(
            f"building kernel extension {spec.name} failed (exit status {status}); the log is {log_path}: "
            + " | ".join(errors or [line.strip() for line in lines[-3:]])
        )


def _ninja_dirs() -> list[str]:
    """Where the pip package's ninja lives: cpp_extension looks for ninja on PATH, which an unactivated venv lacks."""
    try:
        import ninja
    except ImportError:
        return []
    return [str(ninja.BIN_DIR)]


def _import(name: str, folder: Path):
    path = folder / f"{name}.so"
    try:
        loader = importlib.machinery.ExtensionFileLoader(name, str(path))
        spec = importlib.util.spec_from_file_location(name, path, loader=loader)
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
    except (ImportError, OSError) as e:
        raise KernelBuildError(f"kernel extension {name} was built into {folder} but does not load: {e}") from None
    return module


def _child_main(raw: str) -> None:
    from torch.utils.cpp_extension import load

    args = json.loads(raw)
    spec = ExtensionSpec(**{k: tuple(map(tuple, v)) if k == "env" else v for k, v in args.items() if k != "folder"})
    load(
        name=spec.name,
        sources=[str(p) for p in spec.source_paths()],
        extra_cflags=list(spec.cflags),
        extra_cuda_cflags=list(spec.cuda_cflags),
        extra_ldflags=list(spec.ldflags),
        extra_include_paths=[str(CSRC)],
        build_directory=args["folder"],
        with_cuda=spec.cuda,
        verbose=True,
    )


if __name__ == "__main__":
    _child_main(sys.argv[1])
