"""Every attention backend under tensor parallelism: each rank attends with its own heads, and the model equals
the single-process one (megagpt/model/attention.py)."""

from __future__ import annotations

import torch

from tests.conftest import tiny_config
from tests.distributed.harness import run_world
from tests.distributed.test_tensor_data_parallel import full_tensor, relative_error

BACKENDS = ["sdpa", "blocked", "fused_softmax"]


def backend_config(backend: str, tp: int):
    return tiny_config(
        "model.num_heads=4",
        "model.hidden_size=64",
        "model.num_layers=2",
        "model.seq_length=40",  # not a multiple of the blocked backend's block (16)
        "model.attention_pattern=[local,dense]",
        "model.local_window=7",
        f"model.attention_backend={backend}",
        f"parallel.tp={tp}",
    )


def check_backends(rank: int, world_size: int):
    from megagpt.model.build import build_model
    from megagpt.parallel.context import ParallelContext
    from megagpt.parallel.topology import Topology

    ctx = ParallelContext.initialize(Topology(2, 1, 1), rank, torch.device("cpu"))
    tokens = torch.randint(0, 1000, (2, 41), generator=torch.Generator().manual_seed(3))
    # The reference: one process, the plain masked sdpa path.
    (reference,) = build_model(backend_config("sdpa", 1), ParallelContext.single_process())
    ref_logits = reference(tokens[:, :-1])
    reference(tokens[:, :-1], tokens[:, 1:]).backward()
    ref_grads = {name: p.grad for name, p in reference.named_parameters()}
    errors = {}
    for backend in BACKENDS:
        (model,) = build_model(backend_config(backend, 2), ctx)
        attention = model.blocks["0"].attn
        assert (attention.heads, attention.window, attention.backend) == (2, 7, backend)
        errors[backend, "logits"] = relative_error(model(tokens[:, :-1]), ref_logits)
        model(tokens[:, :-1], tokens[:, 1:]).backward()
        for name, param in model.named_parameters():
            grad, ref_grad = full_tensor(param.grad, param, ctx.tp_group), ref_grads[name]
            rows = min(len(grad), len(ref_grad))  # the vocabulary is padded differently at tp=1 and tp=2
            errors[backend, name] = relative_error(grad[:rows], ref_grad[:rows])
    bad = {key: err for key, err in errors.items() if err > 1e-5}
    assert not bad, f"relative errors above 1e-5 against one process's sdpa: {bad}"


def test_every_backend_splits_heads_across_tensor_parallel_ranks():
    run_world(2, check_backends)  # each rank asserts; a failure names the rank, the backend and the tensor
