"""The just-in-time kernel build (megagpt/kernels/build.py): keyed folders, one builder under a lock, timeouts that
kill a hung compiler, incomplete builds rebuilt. A tiny C extension (no torch headers) keeps each build to seconds."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from megagpt.kernels import build
from megagpt.kernels.build import ExtensionSpec, KernelBuildError, build_folder, build_key, load_extension

TINY_MODULE = textwrap.dedent(
    """
    #include <Python.h>
    #define CONCAT(a, b) a##b
    #define INIT(name) CONCAT(PyInit_, name)
    #define STR(x) #x
    #define NAME(x) STR(x)
    static PyObject* answer(PyObject*, PyObject*) { return PyLong_FromLong(ANSWER); }
    static PyMethodDef methods[] = {{"answer", answer, METH_NOARGS, ""}, {nullptr, nullptr, 0, nullptr}};
    static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, NAME(TORCH_EXTENSION_NAME), "", -1, methods};
    PyMODINIT_FUNC INIT(TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&module); }
    """
)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGAGPT_KERNEL_CACHE", str(tmp_path / "cache"))
    load_extension.cache_clear()
    yield tmp_path / "cache"
    load_extension.cache_clear()


def tiny_spec(tmp_path, name="tiny", answer=42, source=TINY_MODULE, **kwargs) -> ExtensionSpec:
    path = tmp_path / f"{name}.cpp"
    path.write_text(source)
    return ExtensionSpec(name=name, sources=(str(path),), cflags=(f"-DANSWER={answer}",), **kwargs)


def test_builds_once_then_loads_the_complete_folder(tmp_path, cache, monkeypatch):
    spec = tiny_spec(tmp_path)
    assert load_extension(spec, timeout_s=300).answer() == 42
    folder = build_folder(spec)
    assert folder.parent == cache and (folder / "BUILD_OK").exists() and (folder / "build.log").exists()
    # A second process (here: a cleared cache) loads the finished build without compiling.
    load_extension.cache_clear()
    monkeypatch.setattr(build, "_build_in_child", lambda *a: pytest.fail("rebuilt a complete build"))
    assert load_extension(spec, timeout_s=300).answer() == 42


def test_the_key_follows_sources_flags_and_torch(tmp_path, monkeypatch):
    first = build_key(tiny_spec(tmp_path))
    assert build_key(tiny_spec(tmp_path)) == first
    assert build_key(tiny_spec(tmp_path, answer=7)) != first  # flags
    assert build_key(tiny_spec(tmp_path, source=TINY_MODULE + "\n// edited\n")) != first  # source contents
    monkeypatch.setattr(build.torch, "__version__", "0.0.0")
    assert build_key(tiny_spec(tmp_path)) != first


def test_an_incomplete_build_is_deleted_and_built_again(tmp_path, cache):
    spec = tiny_spec(tmp_path)
    folder = build_folder(spec)
    folder.mkdir(parents=True)
    (folder / "tiny.so").write_text("truncated by a killed build")
    (folder / "lock").write_text("")  # torch's own lock file, which a killed build leaves behind and torch waits on
    assert load_extension(spec, timeout_s=300).answer() == 42
    assert (folder / "BUILD_OK").exists() and not (folder / "lock").exists()


def test_a_compile_error_names_the_log(tmp_path, cache):
    spec = tiny_spec(tmp_path, source=TINY_MODULE + "\nthis is not C++;\n")
    with pytest.raises(KernelBuildError, match=r"building kernel extension tiny failed .*build\.log.*error"):
        load_extension(spec, timeout_s=300)
    assert not (build_folder(spec) / "BUILD_OK").exists()


def test_a_hung_compiler_is_killed_at_the_timeout(tmp_path, cache):
    pid_file = tmp_path / "compiler.pid"
    hang = tmp_path / "hanging-compiler"
    hang.write_text(f"#!/bin/sh\necho $$ > {pid_file}\nexec sleep 600\n")
    hang.chmod(0o755)
    spec = tiny_spec(tmp_path, env=(("CXX", str(hang)),))
    start = time.monotonic()
    with pytest.raises(KernelBuildError, match="took longer than 3s and was stopped"):
        load_extension(spec, timeout_s=3)
    assert time.monotonic() - start < 30
    time.sleep(0.5)
    assert not running(int(pid_file.read_text()))  # the compiler is gone, not left running


def running(pid: int) -> bool:
    """Alive and not a zombie (a killed orphan may wait unreaped where pid 1 does not reap)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_waiting_on_a_held_lock_times_out_naming_the_holder(tmp_path, cache):
    spec = tiny_spec(tmp_path)
    lock = build_folder(spec).with_suffix(".lock")
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(KernelBuildError, match=rf"waited 2s for the build lock .* held by pid {holder.pid}"):
            load_extension(spec, timeout_s=2)
    finally:
        holder.kill()
        holder.wait()
    # The holder died: flock frees the lock, and the build goes ahead.
    assert load_extension(spec, timeout_s=300).answer() == 42


HOLD_LOCK = """
import fcntl, os, sys, time
f = open(sys.argv[1], "a+")
fcntl.flock(f, fcntl.LOCK_EX)
f.write(f"pid {os.getpid()} on test"); f.flush()
print("locked", flush=True)
time.sleep(600)
"""


def test_concurrent_processes_build_once(tmp_path, cache):
    """Two processes ask for the same extension at once: one builds, the other waits and loads it."""
    spec = tiny_spec(tmp_path, answer=5)
    script = (
        "import sys; from megagpt.log import setup_logging; setup_logging();"
        "from megagpt.kernels.build import ExtensionSpec, load_extension;"
        f"print('answer', load_extension(ExtensionSpec(name='tiny', sources=({spec.sources[0]!r},), "
        f"cflags=('-DANSWER=5',)), timeout_s=300).answer())"
    )
    env = {**os.environ, "MEGAGPT_KERNEL_CACHE": str(cache)}
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env) for _ in "ab"]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all("answer 5" in out for out in outputs), outputs
    assert sum(out.count("built kernel extension tiny") for out in outputs) == 1


def test_a_cuda_key_follows_the_gpu_architectures(tmp_path, monkeypatch):
    """A build for an H100 (9.0) must not be loaded on an A100 (8.0); host-only extensions do not care."""
    cuda_spec = tiny_spec(tmp_path, cuda=True)
    keys = {}
    for arch in ("8.0", "9.0", "8.0;9.0"):
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch)
        assert build.cuda_arch_list() == arch
        keys[arch] = (build_key(cuda_spec), build_key(tiny_spec(tmp_path)))
    assert len({cuda for cuda, _ in keys.values()}) == 3
    assert len({host for _, host in keys.values()}) == 1
    # Unset, the visible GPUs decide (none here, none on a CPU machine).
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    monkeypatch.setattr(build.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(build.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(build.torch.cuda, "get_device_capability", lambda i: (9, 0) if i else (8, 0))
    assert build.cuda_arch_list() == "8.0;9.0"
    assert build_key(cuda_spec) == keys["8.0;9.0"][0]


def test_a_file_system_without_locks_builds_anyway(tmp_path, cache, monkeypatch, caplog):
    """Lustre mounted without flock: flock raises ENOLCK. The build goes ahead in a private folder renamed into
    place, with a message; when another process's rename came first, its folder is used."""
    import errno

    def no_locks(f, how):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(build.fcntl, "flock", no_locks)
    spec = tiny_spec(tmp_path, answer=9)
    with caplog.at_level("WARNING"):
        assert load_extension(spec, timeout_s=300).answer() == 9
    assert "has no file locks" in caplog.text and "MEGAGPT_KERNEL_CACHE" in caplog.text
    folder = build_folder(spec)
    assert (folder / "BUILD_OK").exists()
    assert sorted(p.name for p in cache.iterdir()) == sorted([folder.name, folder.name + ".lock"])
    # Another process's rename comes first while this one builds: this one's rename fails, and it uses that
    # folder (here the complete folder from before, hidden until this build is done).
    load_extension.cache_clear()
    (folder / "BUILD_OK").rename(folder / "hidden")
    real_build = build._build

    def build_while_another_finishes(spec_, private, timeout_s):
        real_build(spec_, private, timeout_s)
        (folder / "hidden").rename(folder / "BUILD_OK")

    monkeypatch.setattr(build, "_build", build_while_another_finishes)
    monkeypatch.setattr(build, "_import", lambda name, where: where)
    assert load_extension(spec, timeout_s=300) == folder
    assert sorted(p.name for p in cache.iterdir()) == sorted([folder.name, folder.name + ".lock"])
