"""Hugging Face conversion and generation across processes (CPU, gloo; HF_HUB_OFFLINE, tiny random models):

- GPT-2 and GPT-Neo folders converted for tp=2 x pp=2 give transformers' logits (1e-4) through the pipeline;
- a checkpoint trained at tp=2 x pp=2 converts to transformers with our logits;
- greedy generation under tensor parallelism (in a world, and through tools/generate.py under torchrun) gives the
  ids of one process and of transformers' generate.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.distributed.harness import run_world

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers  # noqa: E402  (the dev extra installs it)

from tests.conftest import REPO  # noqa: E402
from tests.unit.test_hf import VOCAB, hf_gpt2, hf_gpt_neo, tokens  # noqa: E402


def pipeline_logits(ctx, checkpoint: str, x: torch.Tensor):
    """The logits of a checkpoint loaded into this rank's tp x pp share, through the two pipeline stages."""
    import torch.distributed as dist

    from megagpt.checkpoint.paths import open_checkpoint
    from megagpt.checkpoint.rank_state import copy_weights, shards_of
    from megagpt.config import config_from_dict
    from megagpt.model.build import build_model

    saved = open_checkpoint(checkpoint)
    t = ctx.topology
    cfg = config_from_dict(
        {
            "model": {**saved.meta.model, "dropout": 0.0},
            "parallel": {"tp": t.tp, "pp": t.pp},
            "train": {"global_batch_size": t.pp, "micro_batch_size": 1, "device": "cpu"},
            "data": {"synthetic": True},
        }
    )
    (chunk,) = build_model(cfg, ctx)
    for _ in copy_weights(saved, shards_of([chunk], ctx.tp_group), cfg.model.vocab_size):
        pass
    chunk.eval()
    tp_rank, _, stage = t.coords(ctx.rank)
    with torch.no_grad():
        if stage == 0:
            dist.send(chunk(x).contiguous(), t.rank(tp_rank, 0, 1))
            return None
        hidden = torch.empty(x.shape[0], x.shape[1], cfg.model.hidden_size)
        dist.recv(hidden, t.rank(tp_rank, 0, 0))
        return chunk(hidden)


def tp2_pp2_world(rank, world_size, root):
    from megagpt.hf import hf_folder_to_checkpoint
    from megagpt.parallel.context import ParallelContext
    from megagpt.parallel.topology import Topology
    from megagpt.train.run import pretrain
    from tests.conftest import tiny_config

    root = Path(root)
    ctx = ParallelContext.initialize(Topology(2, 1, 2), rank, torch.device("cpu"))
    results = {}
    for kind in ("gpt2", "gpt_neo"):
        if rank == 0:
            hf_folder_to_checkpoint(root / kind, root / f"{kind}_ck", tp=2, pp=2)
        torch.distributed.barrier()
        results[kind] = pipeline_logits(ctx, str(root / f"{kind}_ck"), tokens())
    cfg = tiny_config(
        "train.iters=3", f"model.vocab_size={VOCAB}", "model.qkv_bias=false", "parallel.tp=2", "parallel.pp=2",
        "logging.tensorboard=false", "train.eval_iters=0", f"logging.dir={root / 'run'}",
        f"checkpoint.dir={root / 'trained'}",
    )  # fmt: skip
    pretrain(cfg, ParallelContext.initialize(Topology(2, 1, 2), rank, torch.device("cpu")))
    return results


def test_conversions_at_tp2_pp2(tmp_path):
    from megagpt.hf import checkpoint_to_hf_folder
    from megagpt.inference import load_for_inference
    from megagpt.parallel.context import ParallelContext

    models = {"gpt2": hf_gpt2(), "gpt_neo": hf_gpt_neo()}
    for kind, model in models.items():
        model.save_pretrained(tmp_path / kind)
    results = run_world(4, tp2_pp2_world, str(tmp_path))
    x = tokens()
    for kind, model in models.items():
        with torch.no_grad():
            want = model(x).logits
        last_stage = [r[kind] for r in results if r[kind] is not None]  # its two tp ranks: the gathered logits
        assert len(last_stage) == 2
        for logits in last_stage:
            assert (logits - want).abs().max() < 1e-4, kind
    # The checkpoint trained at tp 2 x pp 2 (local layers, no q/k/v bias) into transformers: our logits.
    folder = checkpoint_to_hf_folder(tmp_path / "trained", tmp_path / "trained_hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(theirs).__name__ == "GPTNeoForCausalLM"
    ours, _ = load_for_inference(tmp_path / "trained", ParallelContext.single_process())
    with torch.no_grad():
        assert (theirs(x).logits - ours(x)).abs().max() < 1e-4


def generate_world(rank, world_size, checkpoint, prompt):
    from megagpt.inference import load_for_inference
    from megagpt.model.generation import generate
    from megagpt.parallel.context import ParallelContext
    from megagpt.parallel.topology import Topology

    ctx = ParallelContext.initialize(Topology(world_size, 1, 1), rank, torch.device("cpu"))
    model, _ = load_for_inference(checkpoint, ctx)
    greedy = generate(model, prompt, 24).tolist()
    sampled = generate(model, prompt, 12, greedy=False, temperature=0.9, top_k=50, top_p=0.9, seed=7).tolist()
    return greedy, sampled


def test_generation_under_tensor_parallelism(tmp_path):
    from megagpt.hf import hf_folder_to_checkpoint
    from megagpt.inference import load_for_inference
    from megagpt.model.generation import generate
    from megagpt.parallel.context import ParallelContext

    model = hf_gpt_neo()
    model.save_pretrained(tmp_path / "hf")
    checkpoint = hf_folder_to_checkpoint(tmp_path / "hf", tmp_path / "ck")
    prompt = tokens(batch=1, length=6, seed=4)
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=24, min_new_tokens=24, do_sample=False).tolist()
    single, _ = load_for_inference(checkpoint, ParallelContext.single_process())
    sampled_single = generate(single, prompt, 12, greedy=False, temperature=0.9, top_k=50, top_p=0.9, seed=7)
    ranks = run_world(2, generate_world, str(checkpoint), prompt)
    for greedy, sampled in ranks:  # every rank produces the same tokens
        assert greedy == want
        assert sampled == sampled_single.tolist()

    # tools/generate.py under torchrun with tp = 2.
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(REPO / "tools/generate.py"), "--load", str(tmp_path / "ck"),
        "--prompt-ids", ",".join(map(str, prompt[0].tolist())), "--max-new-tokens", "24", "--greedy", "--output-ids",
    ]  # fmt: skip
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    printed = [line for line in result.stdout.splitlines() if line.startswith("[")]
    assert len(printed) == 1 and json.loads(printed[0]) == want[0]  # rank 0 prints, once
