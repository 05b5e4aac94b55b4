"""Two random streams per process, so dropout is the same where tensors are replicated and different where split.

    default stream   torch's own generator, seeded with train.seed on every tensor-parallel rank: dropout on
                     tensors every tp rank holds whole (the residual stream without sequence parallelism)
                     draws the same mask everywhere, so the replicas stay identical.
    tp stream        seeded with train.seed + 2718 + tp_rank: dropout on tensors split across the tp ranks
                     (attention probabilities of each rank's heads; the residual stream's sequence shard under
                     sequence parallelism) draws independent masks, as one big model would.

`with rng.fork():` runs a block on the tp stream and leaves the default stream where it was (Megatron's
CudaRNGStatesTracker, for CPU and CUDA alike).

`checkpoint(fn, *args, rng=rng)` is activation recomputation: keep only fn's inputs, run fn again in backward,
with both streams rewound to where they stood in the forward, so recomputed dropout draws the same masks.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.utils.checkpoint

TP_SEED_OFFSET = 2718  # Megatron's offset, so seeds never collide with the default stream's


def _get_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_state(state: torch.Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class TensorParallelRNG:
    def __init__(self, seed: int, tp_rank: int, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.tp_rank = tp_rank
        self.depth = 0
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        """Start the tp stream afresh from seed (plus the offset and this tp rank); the default stream is left
        where it was. (A checkpoint loaded into another layout re-seeds from the seed and the step.)"""
        default = _get_state(self.device)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(seed + TP_SEED_OFFSET + self.tp_rank)
        else:
            torch.manual_seed(seed + TP_SEED_OFFSET + self.tp_rank)
        self.tp_state = _get_state(self.device)
        _set_state(default, self.device)

    def state_dict(self) -> dict:
        """The tp stream's generator state (a copy), to save with the rank's other random states."""
        return {"tp_state": self.tp_state.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.tp_state = state["tp_state"].clone()

    @contextlib.contextmanager
    def fork(self):
        """Run the block on the tp stream; the default stream is untouched by it. Nested forks stay on the tp
        stream (an inner fork must not rewind it, or two dropouts would draw the same numbers)."""
        if self.depth > 0:
            yield
            return
        self.depth += 1
        default = _get_state(self.device)
        _set_state(self.tp_state, self.device)
        try:
            yield
        finally:
            self.depth -= 1
            self.tp_state = _get_state(self.device)
            _set_state(default, self.device)

    @contextlib.contextmanager
    def replay(self, tp_state: torch.Tensor):
        """Run the block with the tp stream at tp_state (a recomputation); afterwards it is where it was."""
        current = self.tp_state
        self.tp_state = tp_state
        try:
            yield
        finally:
            self.tp_state = current


def _replay_contexts(rng: TensorParallelRNG):
    # Called when the checkpointed forward starts: remember the tp stream, to rewind to it in the recomputation.
    if rng.depth > 0:
        raise RuntimeError("checkpoint() inside rng.fork(): start the checkpointed function outside the fork")
    return contextlib.nullcontext(), rng.replay(rng.tp_state.clone())


def checkpoint(fn, *args, rng: TensorParallelRNG | None = None):
    """fn(*args) without keeping its intermediate activations: backward recomputes them. torch rewinds the
    default stream (preserve_rng_state); `rng`'s tp stream is rewound here, so dropout matches on every rank."""
    context_fn = functools.partial(_replay_contexts, rng) if rng is not None else torch.utils.checkpoint.noop_context_fn
    return torch.utils.checkpoint.checkpoint(
        fn, *args, use_reentrant=False, preserve_rng_state=True, context_fn=context_fn
    )
