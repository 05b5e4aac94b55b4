"""Dropout draws the same mask where tensors are replicated across tp ranks and different masks where split."""

from __future__ import annotations

import torch

from tests.distributed.harness import run_world
from tests.distributed.test_tensor_data_parallel import parity_config


def gathered(x: torch.Tensor, group) -> list[torch.Tensor]:
    from megagpt.parallel.comm import all_gather

    return list(all_gather(x.detach().unsqueeze(0).contiguous(), 0, group))


def check_dropout_streams(rank: int, world_size: int, run_dir: str):
    from megagpt.model.build import build_model
    from megagpt.parallel.context import ParallelContext
    from megagpt.parallel.random import TensorParallelRNG
    from megagpt.parallel.topology import Topology

    ctx = ParallelContext.initialize(Topology(2, 1, 1), rank, torch.device("cpu"))
    tp = ctx.tp_group

    # The tracker: the default stream agrees across ranks and does not notice a fork; the tp stream differs.
    torch.manual_seed(5)
    rng = TensorParallelRNG(seed=5, tp_rank=tp.index)
    before = torch.rand(16)
    with rng.fork():
        split = torch.rand(16)
    after = torch.rand(16)
    torch.manual_seed(5)
    unforked = torch.rand(32)
    torch.testing.assert_close(torch.cat([before, after]), unforked, rtol=0, atol=0)
    b0, b1 = gathered(before, tp)
    s0, s1 = gathered(split, tp)
    assert torch.equal(b0, b1), "the default stream differs across tp ranks"
    assert not torch.equal(s0, s1), "the tensor-parallel stream is the same on both tp ranks"

    tokens = torch.randint(0, 1001, (2, 32), generator=torch.Generator().manual_seed(3))

    # Without sequence parallelism the residual stream is replicated: with dropout on, every block's output
    # must still be identical on both ranks.
    (model,) = build_model(parity_config(2, 1, False, run_dir, dropout=0.5), ctx).train()
    outputs = []
    for block in model.blocks.values():
        block.register_forward_hook(lambda module, inputs, output: outputs.append(output))
    model(tokens)
    for output in outputs:
        mine, other = gathered(output, tp)
        torch.testing.assert_close(mine, other, rtol=0, atol=0)

    # Attention dropout acts on this rank's heads: the same projections on both ranks must meet different masks.
    attn = model.blocks["0"].attn
    qkv = torch.randn(2, 32, 3 * 64 // 2, generator=torch.Generator().manual_seed(11))
    mine, other = gathered(attn.attend(qkv), tp)
    assert not torch.allclose(mine, other), "attention dropout drew the same mask for both ranks' heads"
    attn.eval()
    mine, other = gathered(attn.attend(qkv), tp)
    torch.testing.assert_close(mine, other, rtol=0, atol=0)  # no dropout, same heads' math: same output

    # With sequence parallelism the residual stream is split along the sequence: its dropout masks differ.
    (sp_model,) = build_model(parity_config(2, 1, True, run_dir, dropout=0.5), ctx).train()
    with sp_model.residual_rng():
        mask = sp_model.drop(torch.ones(4, 64))
    mine, other = gathered(mask, tp)
    assert not torch.equal(mine, other), "sequence-parallel residual dropout drew the same mask on both ranks"

    # And in a real forward every dropout (embedding, attention, residual) starts from a fresh generator state:
    # no two draw the same numbers.
    import megagpt.model.gpt as gpt

    states = []
    real_dropout, real_attention = torch.nn.functional.dropout, gpt.causal_attention

    def dropout(*args, **kwargs):
        states.append(torch.get_rng_state())
        return real_dropout(*args, **kwargs)

    def attention(*args, **kwargs):
        states.append(torch.get_rng_state())
        return real_attention(*args, **kwargs)

    torch.nn.functional.dropout, gpt.causal_attention = dropout, attention
    try:
        sp_model(tokens)
    finally:
        torch.nn.functional.dropout, gpt.causal_attention = real_dropout, real_attention
    assert len(states) == 1 + 3 * 4, len(states)  # embedding, then per layer attention and two residual dropouts
    assert len({bytes(state.numpy()) for state in states}) == len(states), "two dropout calls shared a random state"


def test_dropout_streams_across_tensor_parallel_ranks(tmp_path):
    run_world(2, check_dropout_streams, str(tmp_path))  # each rank asserts; a failure names the rank and the check
