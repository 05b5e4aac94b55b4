"""The zero-bubble backward split (parallel/weight_grads.py), one process: B computes the input gradients and no
weight gradient, W the weight gradients, and together they equal one plain backward, for every layer with weights
(linears, biases, LayerNorms, both embeddings, the output layer) and every recompute mode. The tensor- and
sequence-parallel layers are checked in tests/distributed/test_zero_bubble.py."""

import pytest
import torch

from megagpt.model.gpt import GPT
from megagpt.parallel.context import ParallelContext
from megagpt.parallel.weight_grads import WeightGradQueue, deferring, enable_split_backward
from tests.conftest import tiny_config

VOCAB, SEQ = 101, 16


def stage(split: bool, recompute: str, pre: bool, post: bool, dropout: float) -> GPT:
    cfg = tiny_config(
        "model.num_layers=2",
        "model.hidden_size=32",
        "model.num_heads=4",
        f"model.seq_length={SEQ}",
        f"model.vocab_size={VOCAB}",
        f"model.dropout={dropout}",
    )
    group = ParallelContext.single_process().tp_group
    torch.manual_seed(0)
    model = GPT(cfg.model, group, pre_process=pre, post_process=post, init_seed=7, recompute=recompute).double()
    if split:
        enable_split_backward(model)
    return model


def run(model: GPT, x, labels, queue: WeightGradQueue | None):
    torch.manual_seed(1)  # the same dropout masks in both models
    x = x.detach().requires_grad_(x.is_floating_point())
    y = model(x, labels)
    grad = None if labels is not None else torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    if queue is None:
        torch.autograd.backward(y, grad)
    else:
        with deferring(queue):
            torch.autograd.backward(y, grad)
    return y.detach(), x.grad


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
@pytest.mark.parametrize("pre, post", [(True, False), (False, False), (False, True), (True, True)])
def test_b_then_w_equals_one_backward_and_b_computes_no_weight_gradient(recompute, pre, post):
    tokens = torch.randint(0, VOCAB, (2, SEQ + 1), generator=torch.Generator().manual_seed(3))
    x = tokens[:, :-1] if pre else torch.randn(2, SEQ, 32, dtype=torch.float64)
    labels = tokens[:, 1:] if post else None
    plain, split = stage(False, recompute, pre, post, 0.1), stage(True, recompute, pre, post, 0.1)

    y_ref, x_grad_ref = run(plain, x, labels, None)
    queue = WeightGradQueue()
    y, x_grad = run(split, x, labels, queue)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=0)
    if not pre:
        torch.testing.assert_close(x_grad, x_grad_ref, rtol=1e-10, atol=1e-14)
    # B left every weight gradient to W, but the fused output layer's (model/loss.py computes it in the forward).
    early = {name for name, p in split.named_parameters() if p.grad is not None}
    assert early == ({"wte.weight"} if post else set()), early
    assert len(queue) > 0
    queue.run()
    assert len(queue) == 0
    reference = dict(plain.named_parameters())
    for name, param in split.named_parameters():
        assert param.grad is not None, name
        torch.testing.assert_close(param.grad, reference[name].grad, rtol=1e-10, atol=1e-14, msg=name)


def test_a_split_layer_without_a_running_b_computes_its_weight_gradients_at_once():
    tokens = torch.randint(0, VOCAB, (2, SEQ + 1), generator=torch.Generator().manual_seed(4))
    plain, split = stage(False, "none", True, True, 0.0), stage(True, "none", True, True, 0.0)
    run(plain, tokens[:, :-1], tokens[:, 1:], None)
    run(split, tokens[:, :-1], tokens[:, 1:], None)
    reference = dict(plain.named_parameters())
    for name, param in split.named_parameters():
        torch.testing.assert_close(param.grad, reference[name].grad, rtol=1e-10, atol=1e-14, msg=name)


def test_w_gradients_reach_the_post_accumulate_hooks_once_per_weight():
    """The gradient buckets learn a gradient is ready from post-accumulate hooks (data_parallel.py). Autograd runs
    them in B too, with no gradient (the split layers return none for their weights): the buckets skip those."""
    model = stage(True, "none", False, False, 0.0)
    fired = []

    def hook(param, name):
        if param.grad is not None:
            fired.append(name)

    for name, param in model.named_parameters():
        param.register_post_accumulate_grad_hook(lambda p, name=name: hook(p, name))
    queue = WeightGradQueue()
    run(model, torch.randn(2, SEQ, 32, dtype=torch.float64), None, queue)
    assert fired == []
    queue.run()
    assert sorted(fired) == sorted(name for name, _ in model.named_parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pre, post", [(True, False), (False, True)])
def test_w_accumulates_into_the_buckets_main_grads_as_a_plain_backward_does(dtype, pre, post):
    """With gradient buckets, W adds each weight gradient straight into the fp32 main gradient (a linear's by
    addmm, an embedding's by index_add_: the fusion; bf16 gradients formed first, as autograd's are) and the
    bucket counts it: over two micro-batches the main gradients equal two plain backwards', every parameter is
    counted twice, and no .grad is left behind. The first stage has both embeddings, the last the output layer."""
    from megagpt.parallel.data_parallel import GradBuckets

    group = ParallelContext.single_process().dp_group
    models = {split: stage(split, "none", pre, post, 0.0).to(dtype) for split in (False, True)}
    through_autograd = set()  # W's gradients reach main_grad directly; only B's own (the output layer's) use hooks

    def seen(param, name):
        if param.grad is not None:
            through_autograd.add(name)

    for name, param in models[True].named_parameters():
        param.register_post_accumulate_grad_hook(lambda p, name=name: seen(p, name))  # before the buckets' hook
    buckets = {split: GradBuckets(model.parameters(), group, bucket_bytes=2**16) for split, model in models.items()}
    tokens = torch.randint(0, VOCAB, (2, SEQ + 1), generator=torch.Generator().manual_seed(5))
    for split, model in models.items():
        buckets[split].start_step(2)
        for micro_batch in range(2):
            x = torch.randn(2, SEQ, 32, generator=torch.Generator().manual_seed(micro_batch)).to(dtype)
            queue = WeightGradQueue() if split else None
            run(model, tokens[:, :-1] if pre else x, tokens[:, 1:] if post else None, queue)
            if split:
                queue.run()
    reference = dict(models[False].named_parameters())
    for name, param in models[True].named_parameters():
        assert param.grad is None, name
        assert buckets[True].received[param] == 2, name
        tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 0, "atol": 0}
        torch.testing.assert_close(param.main_grad, reference[name].main_grad, **tolerance, msg=name)
    assert through_autograd == ({"wte.weight"} if post else set())


def test_only_the_zero_bubble_schedules_build_split_layers():
    """Other schedules run the plain torch ops, exactly as before the split existed."""
    from megagpt.model.build import build_model
    from megagpt.parallel.topology import Topology

    for name, split in [("auto", False), ("1f1b", False), ("zb-h1", True), ("zb-h2", True)]:
        cfg = tiny_config("parallel.pp=2", "model.num_layers=2", f"parallel.pp_schedule={name}")
        for rank in range(2):
            ctx = ParallelContext.planned(Topology(1, 1, 2), rank)
            with torch.device("meta"):
                (chunk,) = build_model(cfg, ctx)
            flags = {type(m).__name__: m.split_backward for m in chunk.modules() if hasattr(m, "split_backward")}
            assert set(flags) >= {"ColumnParallelLinear", "RowParallelLinear", "LayerNorm", "GPT"}, flags
            assert set(flags.values()) == {split}, (name, flags)
