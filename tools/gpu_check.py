"""The prepared check for the day a GPU is lent: one command, at most --budget-s seconds (8 minutes by default),
that proves what CPU tests cannot and writes runs/gpu-check/report.md and report.json.

    make gpu-check                       # or: python tools/gpu_check.py [--out runs/gpu-check] [--budget-s 480]
    python tools/gpu_check.py --list     # the steps, in order
    python tools/gpu_check.py --only versions,tiny_training

Each step runs as a child process with its own time limit, so a crash, an OOM or a hang in one is reported and
the rest still run; a step that would not fit in what is left of the budget is skipped, saying so. Steps:

    versions         torch, CUDA, nvcc, Triton, the device and its capability, the packages megagpt needs
    kernel_build     megagpt's CUDA kernels built (or loaded) through kernels/build.py, timed
    gpu_tests        pytest tests/gpu: kernels and every attention backend against float64, on the GPU
    flash_dropout    dense causal attention in bf16 with dropout under the Flash backend, forward and backward
    attention_bench  bench/attention.py at s=2048, w=256: Flex and blocked local attention against dense
    tiny_training    the tiny preset on CUDA in bf16 with dropout 0.1, recompute none / selective / full, an eval
                     at step 10: finite, falling loss; identical gradients for none and selective (same seed)
    nccl_one_rank    a one-rank NCCL group: in-place reduce-scatter and all-gather (batch_isend_irecv needs a
                     peer: torch refuses a send to oneself, NCCL two ranks on one GPU; multi_gpu runs it)
    fused_kernels    bench/fused_kernels.py: GB/s against copy bandwidth, against torch (and apex)
    throughput_1.3b  bench/train_throughput.py --preset gpt3-1.3b: MFU against the measured bf16 matmul peak
    throughput_peers bench/train_throughput.py (a small GPT-2): tokens/s against transformers in the same run
    multi_gpu        with 2 or more GPUs, torchrun: pp=2 at vpp 1 and 2, tp=2 with sequence parallelism, dp=2 with
                     zero=1, each training the tiny preset on NCCL

Goals on one H100 / H200 (issue 18): fused kernels at >= 80% of copy bandwidth and faster than torch, Flex local
attention at <= 0.35 of dense, gpt3-1.3b at >= 55% MFU. The report says which were met.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULT = "result.json"  # what a step's child writes into its folder


@dataclass(frozen=True)
class Step:
    name: str
    limit_s: int  # the child is killed after this long
    needs_gpus: int = 1
    what: str = ""


# In the order they run: the goals' benches early, so a slow step later cannot starve them of the budget.
STEPS = [
    Step("versions", 60, 0, "versions of torch, CUDA, nvcc, Triton; the device"),
    Step("kernel_build", 180, 1, "build megagpt's CUDA kernels"),
    Step("fused_kernels", 60, 1, "bench/fused_kernels.py"),
    Step("attention_bench", 90, 1, "Flex and blocked local attention against dense, s=2048, w=256"),
    Step("throughput_1.3b", 150, 1, "bench/train_throughput.py --preset gpt3-1.3b"),
    Step("flash_dropout", 30, 1, "dense bf16 attention with dropout under Flash"),
    Step("tiny_training", 90, 1, "tiny preset on CUDA: bf16, dropout, recompute, eval"),
    Step("nccl_one_rank", 30, 1, "one-rank NCCL group"),
    Step("gpu_tests", 240, 1, "pytest tests/gpu"),
    Step("throughput_peers", 90, 1, "bench/train_throughput.py against transformers"),
    Step("multi_gpu", 240, 2, "torchrun: pp=2 vpp 1/2, tp=2 sp, dp=2 zero=1"),
]
STEP_NAMES = [s.name for s in STEPS]


@dataclass
class StepResult:
    name: str
    status: str  # "pass", "fail", "timeout", "skipped"
    seconds: float = 0.0
    reason: str = ""  # why it failed or was skipped
    metrics: dict = field(default_factory=dict)
    output_tail: str = ""


# ----------------------------------------------------------------------------------------------------------------
# The orchestrator


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/gpu-check", help="where report.md, report.json and logs go")
    parser.add_argument("--budget-s", type=float, default=480.0, help="the whole check's time limit in seconds")
    parser.add_argument("--only", default=None, help="comma-separated step names (see --list)")
    parser.add_argument("--list", action="store_true", help="print the steps and exit")
    parser.add_argument("--step", default=None, help=argparse.SUPPRESS)  # a child: run one step into --out
    args = parser.parse_args(argv)
    if args.budget_s <= 0:
        parser.error(f"--budget-s {args.budget_s:g} must be positive")
    if args.only is not None:
        chosen = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = [name for name in chosen if name not in STEP_NAMES]
        if unknown or not chosen:
            parser.error(f"--only {args.only!r}: unknown step(s) {unknown}; the steps are {', '.join(STEP_NAMES)}")
        args.only = chosen
    if args.step is not None and args.step not in STEP_NAMES:
        parser.error(f"--step {args.step!r} is not a step")
    return args


def gpu_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def run_step(step: Step, out: Path, limit_s: float) -> StepResult:
    """Run one step as a child process with a time limit; its result.json holds its metrics."""
    folder = out.resolve() / step.name  # the child runs in the repository root
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RESULT).unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--step", step.name, "--out", str(folder)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    start = time.monotonic()
    log_path = folder / "output.log"
    with open(log_path, "w") as log:
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
        try:
            rc = child.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, 9)
            child.wait()
            rc = None
    seconds = time.monotonic() - start
    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
    metrics = json.loads((folder / RESULT).read_text()) if (folder / RESULT).exists() else {}
    if rc is None:
        return StepResult(step.name, "timeout", seconds, f"stopped after {limit_s:.0f}s", metrics, tail)
    if rc != 0:
        return StepResult(step.name, "fail", seconds, f"exit status {rc}", metrics, tail)
    failed = metrics.pop("failed", None)  # a step that ran but found a problem says so
    if failed:
        return StepResult(step.name, "fail", seconds, failed, metrics, tail)
    return StepResult(step.name, "pass", seconds, "", metrics, tail)


def run_check(args) -> list[StepResult]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpus = gpu_count()
    deadline = time.monotonic() + args.budget_s
    results = []
    for step in STEPS:
        if args.only is not None and step.name not in args.only:
            continue
        left = deadline - time.monotonic()
        if step.needs_gpus > gpus:
            reason = "no CUDA device is visible" if gpus == 0 else f"needs {step.needs_gpus} GPUs, {gpus} visible"
            results.append(StepResult(step.name, "skipped", reason=reason))
        elif left < step.limit_s / 2:  # a step started with less would most likely time out
            results.append(StepResult(step.name, "skipped", reason=f"out of time ({left:.0f}s of the budget left)"))
        else:
            print(f"gpu-check: {step.name} ({step.what}) ...", flush=True)
            result = run_step(step, out, min(step.limit_s, left))
            print(f"gpu-check: {step.name}: {result.status} in {result.seconds:.0f}s {result.reason}", flush=True)
            results.append(result)
    return results


def goals(results: list[StepResult]) -> list[tuple[str, str, bool | None]]:
    """(goal, what was measured, met?) for issue 18's goals; None where the step did not measure it."""
    by_name = {r.name: r.metrics for r in results}
    rows = []
    kernels = by_name.get("fused_kernels", {}).get("kernels")
    if kernels:
        worst_copy = min(k["of_copy"] for k in kernels.values())
        worst_torch = min(k["speedup_vs_torch"] for k in kernels.values())
        rows.append(("fused kernels >= 80% of copy bandwidth", f"worst {worst_copy:.0%}", worst_copy >= 0.8))
        rows.append(("fused kernels faster than torch", f"worst {worst_torch:.2f}x", worst_torch > 1.0))
    else:
        rows += [("fused kernels >= 80% of copy bandwidth", "not measured", None)]
    flex = by_name.get("attention_bench", {}).get("attention", {}).get("flex")
    if flex:
        rows.append(("Flex local <= 0.35 of dense", f"{flex['over_dense']:.3f}", flex["over_dense"] <= 0.35))
    else:
        rows.append(("Flex local <= 0.35 of dense", "not measured", None))
    megagpt = by_name.get("throughput_1.3b", {}).get("contenders", {}).get("megagpt", {})
    if "mfu" in megagpt:
        rows.append(("gpt3-1.3b bf16 MFU >= 55%", f"{megagpt['mfu']:.1%}", megagpt["mfu"] >= 0.55))
    else:
        rows.append(("gpt3-1.3b bf16 MFU >= 55%", "not measured", None))
    return rows


def write_report(results: list[StepResult], out: Path, started: str, budget_s: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    versions = next((r.metrics for r in results if r.name == "versions"), {})
    summary = {
        "started": started,
        "budget_s": budget_s,
        "seconds": round(sum(r.seconds for r in results), 1),
        "device": versions.get("device", "none"),
        "steps": [asdict(r) for r in results],
        "goals": [{"goal": g, "measured": m, "met": met} for g, m, met in goals(results)],
    }
    (out / "report.json").write_text(json.dumps(summary, indent=1))
    lines = [
        f"# GPU check, {started}",
        "",
        f"Device: {summary['device']}; {summary['seconds']:.0f}s of a {budget_s:.0f}s budget.",
        "",
        "| step | status | seconds | note |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r.name} | {r.status} | {r.seconds:.0f} | {r.reason} |" for r in results]
    lines += ["", "| goal | measured | met |", "|---|---|---|"]
    lines += [f"| {g} | {m} | {'yes' if met else 'no' if met is False else 'n/a'} |" for g, m, met in goals(results)]
    for r in results:
        if r.metrics or r.output_tail:
            lines += ["", f"## {r.name}: {r.status}"]
            if r.metrics:
                lines += ["", "```json", json.dumps(r.metrics, indent=1), "```"]
            if r.status != "pass" and r.output_tail:
                lines += ["", "Output (last lines):", "", "```", r.output_tail, "```"]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        for step in STEPS:
            gpus = f" (needs {step.needs_gpus} GPUs)" if step.needs_gpus > 1 else ""
            print(f"{step.name:18s} {step.what}{gpus}")
        return 0
    if args.step is not None:
        return run_child(args.step, Path(args.out))
    started = datetime.datetime.now().isoformat(timespec="seconds")
    results = run_check(args)
    write_report(results, Path(args.out), started, args.budget_s)
    print(f"gpu-check: report in {Path(args.out) / 'report.md'} and report.json")
    if gpu_count() == 0:
        print("gpu-check: no CUDA device is visible, so only the versions were checked; run it where a GPU is")
        return 2
    return 1 if any(r.status in ("fail", "timeout") for r in results) else 0


# ----------------------------------------------------------------------------------------------------------------
# The steps, each run in a child: python tools/gpu_check.py --step NAME --out FOLDER


def run_child(name: str, folder: Path) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    try:
        metrics = CHILD_STEPS[name](folder)
    except Exception:
        traceback.print_exc()
        return 1
    (folder / RESULT).write_text(json.dumps(metrics, indent=1, default=str))
    return 0


def run(cmd: list[str], timeout: float | None = None) -> subprocess.CompletedProcess:
    """A command whose output goes to this step's log, in a process group of its own that is killed whole at the
    timeout (torchrun's workers would otherwise keep holding the GPUs)."""
    print("$", " ".join(cmd), flush=True)
    child = subprocess.Popen(cmd, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True)  # fmt: skip
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, 9)
        out, err = child.communicate()
        err += f"\n(killed after {timeout:.0f}s)"
    print(out + err, flush=True)
    return subprocess.CompletedProcess(cmd, child.returncode, out, err)


def step_versions(folder: Path) -> dict:
    import importlib.metadata

    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    nvcc = run(["nvcc", "--version"]) if _which("nvcc") else None
    info["nvcc"] = nvcc.stdout.strip().splitlines()[-1] if nvcc and nvcc.returncode == 0 else "not found"
    for package in ("triton", "numpy", "pyyaml", "tiktoken", "transformers", "apex", "ninja"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = "not installed"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["device"] = f"{torch.cuda.device_count()} x {props.name}"
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        info["memory_gib"] = round(props.total_memory / 2**30, 1)
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    smi = run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) if _which("nvidia-smi") else None
    info["driver"] = smi.stdout.strip().splitlines()[0] if smi and smi.returncode == 0 and smi.stdout.strip() else "?"
    print(json.dumps(info, indent=1))
    return info


def _which(program: str) -> bool:
    import shutil

    return shutil.which(program) is not None


def step_kernel_build(folder: Path) -> dict:
    from megagpt.kernels.build import build_folder, cuda_arch_list
    from megagpt.kernels.cuda import CUDA_KERNELS, cuda_kernels

    start = time.monotonic()
    cuda_kernels()
    where = build_folder(CUDA_KERNELS)
    built = json.loads((where / "BUILD_OK").read_text())
    built = {f"first_build_{key}": value for key, value in built.items()}
    return {"seconds": round(time.monotonic() - start, 1), "folder": str(where), "arch": cuda_arch_list(), **built}


def step_gpu_tests(folder: Path) -> dict:
    import xml.etree.ElementTree as ET

    junit = folder / "junit.xml"
    result = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", "tests/gpu"])
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    failed = [
        f"{case.get('classname')}.{case.get('name')}"
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    metrics = {**counts, "failed_tests": failed[:20]}
    if result.returncode != 0:
        metrics["failed"] = f"{counts['failures'] + counts['errors']} of {counts['tests']} tests failed"
    return metrics


def step_flash_dropout(folder: Path) -> dict:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from megagpt.model.attention import causal_attention

    q, k, v = (torch.randn(2, 16, 2048, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "qkv")
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # Flash or an error, no silent fallback
        out = causal_attention(q, k, v, dropout_p=0.1, backend="sdpa")
        out.float().pow(2).sum().backward()
        without = causal_attention(q, k, v, dropout_p=0.0, backend="sdpa")
    with sdpa_kernel([SDPBackend.MATH]):
        reference = causal_attention(q.float(), k.float(), v.float(), dropout_p=0.0, backend="sdpa")
    finite = all(torch.isfinite(t).all().item() for t in (out, q.grad, k.grad, v.grad))
    error = (without.float() - reference).abs().max().item()
    metrics = {"finite": finite, "max_error_without_dropout_vs_fp32_math": error}
    if not finite or error > 3e-2:
        metrics["failed"] = f"non-finite values ({not finite}) or an error of {error:.3g} against fp32 math"
    return metrics


def step_attention_bench(folder: Path) -> dict:
    path = folder / "attention.json"
    cmd = [sys.executable, "bench/attention.py", "--seq", "2048", "--window", "256", "--model-reps", "3"]
    result = run([*cmd, "--json", str(path)])
    if result.returncode != 0:
        raise RuntimeError("bench/attention.py failed")
    return json.loads(path.read_text())


def counting_corpus(folder: Path) -> Path:
    """A corpus a tiny model learns within 20 steps (runs of consecutive token ids), written where the check runs:
    random tokens (data.synthetic) cannot show a falling loss, and the lent machine has no internet for a corpus."""
    import numpy as np

    from megagpt.data.indexed_dataset import write_indexed_dataset

    documents = [(np.arange(300) + 7 * d) % 500 for d in range(200)]
    return write_indexed_dataset(folder / "counting", documents, np.uint16)


def tiny_training_config(run_dir: Path, recompute: str, data_prefix: Path, device: str = "cuda", *extra: str):
    from megagpt.config import config_from_dict

    return config_from_dict(
        {"preset": "tiny-cpu"},
        [
            f"train.device={device}", "train.precision=bf16", "model.dropout=0.1", f"parallel.recompute={recompute}",
            "train.iters=20", "train.eval_interval=10", "train.eval_iters=2", "logging.log_interval=5",
            "logging.tensorboard=false", "data.synthetic=false", f"data.path={data_prefix}",
            f"logging.dir={run_dir}", "optim.warmup_iters=2", "optim.lr=3e-3", *extra,
        ],
    )  # fmt: skip


def step_tiny_training(folder: Path, device_name: str = "cuda") -> dict:
    import torch

    from megagpt.data.gpt_dataset import SyntheticDataset
    from megagpt.parallel.context import ParallelContext
    from megagpt.train.run import build_trainer, pretrain

    device = torch.device(device_name, 0) if device_name == "cuda" else torch.device(device_name)
    corpus = counting_corpus(folder)
    metrics, problems = {}, []
    for recompute in ("none", "selective", "full"):
        cfg = tiny_training_config(folder / recompute, recompute, corpus, device_name)
        state = pretrain(cfg, ParallelContext.single_process(device))
        losses = [row["loss"] for row in state.history]
        evals = [row["step"] for row in state.history if "val_loss" in row]
        metrics[recompute] = {"losses": losses, "eval_steps": evals, "val_loss": state.history[-1].get("val_loss")}
        if not all(math.isfinite(x) for x in losses) or losses[-1] >= losses[0]:
            problems.append(f"recompute={recompute}: losses {losses} not finite and falling")
        if 10 not in evals:
            problems.append(f"recompute={recompute}: no evaluation at step 10 ({evals})")

    def gradients(recompute):
        cfg = tiny_training_config(folder / "grads", recompute, corpus, device_name)
        data = SyntheticDataset(64, cfg.model.seq_length, cfg.model.vocab_size, seed=5)
        torch.manual_seed(cfg.train.seed)
        trainer = build_trainer(cfg, ParallelContext.single_process(device), data, None, None)
        trainer.compute_gradients(cfg.train.global_batch_size)
        return {n: p.main_grad.clone() for c in trainer.chunks for n, p in c.named_parameters()}

    def largest_difference(a, b):
        return max((a[n] - b[n]).abs().max().item() for n in a)

    none = gradients("none")
    noise = largest_difference(none, gradients("none"))  # the device's own run-to-run nondeterminism
    selective = largest_difference(none, gradients("selective"))
    metrics["gradients"] = {"none_vs_none_max_abs": noise, "none_vs_selective_max_abs": selective}
    if selective > 2 * noise + 1e-6:  # CUDA's atomics differ run to run: allow twice the measured noise
        problems.append(f"selective recompute's gradients differ from none's by {selective:.3g} (noise {noise:.3g})")
    if problems:
        metrics["failed"] = "; ".join(problems)
    return metrics


def step_nccl_one_rank(folder: Path) -> dict:
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    store = dist.HashStore()
    dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=device)
    metrics = {}
    try:
        full = torch.arange(8, device=device, dtype=torch.float32)
        # In place: the output is this rank's slice of the input (ZeRO-1's gradient and parameter buffers).
        dist.reduce_scatter_tensor(full[:8], full)
        dist.all_gather_into_tensor(full, full[:8])
        torch.cuda.synchronize()
        metrics["in_place_reduce_scatter_all_gather"] = full.tolist() == list(range(8))
        # batch_isend_irecv needs a peer: torch refuses a send to oneself, and NCCL two ranks on one GPU.
        metrics["batch_isend_irecv"] = "needs 2 GPUs (multi_gpu runs the pipeline's batched p2p on NCCL)"
    finally:
        dist.destroy_process_group()
    if metrics["in_place_reduce_scatter_all_gather"] is not True:
        metrics["failed"] = "in-place reduce-scatter / all-gather changed the buffer"
    return metrics


def step_fused_kernels(folder: Path) -> dict:
    path = folder / "fused_kernels.json"
    if run([sys.executable, "bench/fused_kernels.py", "--json", str(path)]).returncode != 0:
        raise RuntimeError("bench/fused_kernels.py failed")
    return json.loads(path.read_text())


def step_throughput_13b(folder: Path) -> dict:
    path = folder / "throughput.json"
    cmd = [sys.executable, "bench/train_throughput.py", "--preset", "gpt3-1.3b", "--batch", "4", "--steps", "5"]
    if run([*cmd, "--peers", "none", "--json", str(path)]).returncode != 0:
        raise RuntimeError("bench/train_throughput.py --preset gpt3-1.3b failed")
    return json.loads(path.read_text())


def step_throughput_peers(folder: Path) -> dict:
    path = folder / "throughput.json"
    cmd = [sys.executable, "bench/train_throughput.py", "--steps", "5", "--batch", "8", "--json", str(path)]
    if run(cmd).returncode != 0:
        raise RuntimeError("bench/train_throughput.py failed")
    return json.loads(path.read_text())


MULTI_GPU_LAYOUTS = {
    "pp2_vpp1": ["parallel.pp=2"],
    "pp2_vpp2": ["parallel.pp=2", "parallel.vpp=2"],
    "tp2_sp": ["parallel.tp=2", "parallel.sequence_parallel=true"],
    "dp2_zero1": ["parallel.zero=1"],
}


def step_multi_gpu(folder: Path) -> dict:
    metrics, problems = {}, []
    for name, layout in MULTI_GPU_LAYOUTS.items():
        run_dir = folder / name
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        cmd += ["launcher/pretrain.py", "--config", "configs/tiny-cpu.yaml", "train.device=cuda"]
        cmd += ["train.precision=bf16", "train.iters=10", "logging.log_interval=5", "data.synthetic=true"]
        cmd += ["train.eval_interval=5", "train.eval_iters=1", f"logging.dir={run_dir}", *layout]
        result = run(cmd, timeout=55)
        rows = []
        if (run_dir / "metrics.jsonl").exists():
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        losses = [row["loss"] for row in rows]
        metrics[name] = {"returncode": result.returncode, "losses": losses}
        if result.returncode != 0 or not losses or not all(math.isfinite(x) for x in losses):
            problems.append(f"{name}: exit status {result.returncode}, losses {losses}")
    if problems:
        metrics["failed"] = "; ".join(problems)
    return metrics


CHILD_STEPS = {
    "versions": step_versions,
    "kernel_build": step_kernel_build,
    "gpu_tests": step_gpu_tests,
    "flash_dropout": step_flash_dropout,
    "attention_bench": step_attention_bench,
    "tiny_training": step_tiny_training,
    "nccl_one_rank": step_nccl_one_rank,
    "fused_kernels": step_fused_kernels,
    "throughput_1.3b": step_throughput_13b,
    "throughput_peers": step_throughput_peers,
    "multi_gpu": step_multi_gpu,
}
assert set(CHILD_STEPS) == set(STEP_NAMES)


if __name__ == "__main__":
    sys.exit(main())
