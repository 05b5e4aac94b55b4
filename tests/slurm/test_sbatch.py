"""The real thing: a one-node Slurm cluster started on this machine (munge, slurmctld, slurmd, each in a temporary
folder, on free ports), `sbatch slurm/tiny-cpu.sh` trains its 4 ranks and writes metrics, and a job signalled
as Slurm does before a time limit saves, requeues itself and resumes from its checkpoint.

Needs Debian's slurm-wlm and munge (.ci/run installs them and sets MEGAGPT_REQUIRE_SLURM, so there a missing
Slurm fails instead of skipping). Daemon settings from the developers' notes: proctrack/linuxproc and task/none,
since cgroup tracking does not work in this sandbox.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch")
MISSING = [name for name in DAEMONS if shutil.which(name) is None and not Path(f"/usr/sbin/{name}").exists()]
if MISSING and os.environ.get("MEGAGPT_REQUIRE_SLURM"):
    raise RuntimeError(f"MEGAGPT_REQUIRE_SLURM is set but {', '.join(MISSING)} are not installed")
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"Slurm is not installed ({', '.join(MISSING)} missing)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def binary(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class Cluster:
    """munged + slurmctld + slurmd for this host, all state under `root`."""

    def __init__(self, root: Path):
        self.root = root
        self.host = socket.gethostname()
        self.procs: list[subprocess.Popen] = []
        for folder in ("state", "spool", "log", "munge"):
            (root / folder).mkdir(parents=True)
        self.munge_socket = root / "munge" / "munge.socket"
        self.env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
        cpus = os.cpu_count() or 1
        (root / "slurm.conf").write_text(
            "\n".join(
                [
                    "ClusterName=megagpt-test",
                    f"SlurmctldHost={self.host}",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    f"AuthInfo=socket={self.munge_socket}",
                    f"SlurmctldPort={free_port()}",
                    f"SlurmdPort={free_port()}",
                    f"StateSaveLocation={root / 'state'}",
                    f"SlurmdSpoolDir={root / 'spool'}",
                    f"SlurmctldPidFile={root / 'slurmctld.pid'}",
                    f"SlurmdPidFile={root / 'slurmd.pid'}",
                    f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
                    f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "MpiDefault=none",
                    "SchedulerType=sched/backfill",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_CPU",
                    "ReturnToService=2",
                    "JobRequeue=1",
                    f"NodeName={self.host} CPUs={cpus} State=UNKNOWN",
                    "PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4",
                ]
            )
            + "\n"
        )

    def start(self) -> None:
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        munge = self.root / "munge"
        subprocess.run(
            [binary("munged"), "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
             f"--pid-file={munge / 'munged.pid'}", f"--log-file={munge / 'munged.log'}",
             f"--seed-file={munge / 'munged.seed'}"],
            check=True,
        )  # fmt: skip
        for daemon in ("slurmctld", "slurmd"):
            log = open(self.root / "log" / f"{daemon}.out", "w")
            self.procs.append(subprocess.Popen([binary(daemon), "-D"], env=self.env, stdout=log, stderr=log))
            time.sleep(1.0)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = self.run("sinfo", "--noheader", "--format=%t", check=False).stdout.strip()
            if state == "idle":
                return
            time.sleep(0.5)
        raise RuntimeError(f"the test cluster did not come up (sinfo: {state!r}); see {self.root / 'log'}")

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        pid = self.root / "munge" / "munged.pid"
        if pid.exists():
            subprocess.run(["kill", pid.read_text().strip()], check=False)

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check, cwd=REPO, timeout=60)

    def job(self, job_id: str) -> dict:
        out = self.run("scontrol", "show", "job", job_id, "--oneliner").stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def log_tail(self, lines: int = 15) -> str:
        """The end of slurmctld's and slurmd's logs, for failures that happen before a job writes any output."""
        tails = []
        for daemon in ("slurmctld", "slurmd"):
            path = self.root / "log" / f"{daemon}.log"
            text = path.read_text().splitlines()[-lines:] if path.exists() else ["(no log)"]
            tails.append(f"\n--- {path} ---\n" + "\n".join(text))
        return "".join(tails)

    def wait_for(self, job_id: str, states: tuple[str, ...], timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(1.0)
        raise AssertionError(f"job {job_id} is {self.job(job_id).get('JobState')} after {timeout}s, not {states}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = Path(tmp_path_factory.mktemp("slurm"))
    cluster = Cluster(root)
    cluster.start()
    yield cluster
    cluster.stop()


def submit(cluster: Cluster, run_dir: Path, iters: int) -> str:
    exports = f"ALL,PYTHON={REPO / '.venv' / 'bin' / 'python'},ITERS={iters},RUN_DIR={run_dir},PYTHONPATH={REPO}"
    if not (REPO / ".venv" / "bin" / "python").exists():
        exports = exports.replace(str(REPO / ".venv" / "bin" / "python"), shutil.which("python3") or "python3")
    # Each test cluster numbers its jobs from 1: a job's output goes to the test's own folder, not runs/.
    output = run_dir.parent / "slurm-%j.out"
    out = cluster.run("sbatch", "--parsable", f"--export={exports}", f"--output={output}", "slurm/tiny-cpu.sh")
    return out.stdout.strip().split(";")[0]


def steps(run_dir: Path) -> list[int]:
    path = run_dir / "logs" / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def test_sbatch_tiny_cpu_trains_four_ranks_and_writes_metrics(cluster, tmp_path):
    job = submit(cluster, tmp_path / "run", iters=12)
    info = cluster.wait_for(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"))
    output = (tmp_path / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", output[-3000:] + cluster.log_tail()
    assert "launched by slurm: rank 0 of 4, layout tp=2 dp=1 pp=2" in output
    assert steps(tmp_path / "run") == list(range(1, 13))
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000012"


def test_a_signalled_job_saves_requeues_and_resumes(cluster, tmp_path):
    """What Slurm does before a time limit (#SBATCH --signal=B:USR1@60), sent now: the batch shell forwards
    SIGUSR1 to the ranks, they save after the current step, the job requeues and the next run resumes."""
    run_dir = tmp_path / "run"
    job = submit(cluster, run_dir, iters=40)
    deadline = time.monotonic() + 120
    while len(steps(run_dir)) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    info = cluster.wait_for(job, ("PENDING", "COMPLETED", "FAILED"), timeout=120)
    assert info["JobState"] == "PENDING" and info["Restarts"] == "1", cluster.log_tail()
    # Skip Slurm's requeue delay, but not all of it: slurmd refuses a credential created in the same second as the
    # kill that ended the first run ("Job credential revoked", its revocation check compares whole seconds), so a
    # restart within that second fails the job. Two seconds clear it.
    time.sleep(2.0)
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    info = cluster.wait_for(job, ("COMPLETED", "FAILED", "CANCELLED"))
    output = (tmp_path / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", output[-3000:] + cluster.log_tail()
    assert "(SIGUSR1): checkpoint saved" in output and "requeueing to resume from the checkpoint" in output
    stopped = int(output.split("stopping after step ")[1].split(" ")[0])
    assert f"loaded checkpoint {run_dir}/checkpoints/step_{stopped:08d} (step {stopped}, same layout)" in output
    assert steps(run_dir) == list(range(1, 41))  # the resumed run continued metrics.jsonl after the saved step
