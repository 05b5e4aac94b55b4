"""The parameter contract: how each parameter is held across ranks, in one ParamSpec per parameter.

The layers that create a parameter say how it is split and shared (tensor_parallel.py, model/gpt.py); everything
after that reads the spec instead of guessing from names or shapes:

    tp_split_dim       None: every tensor-parallel rank holds the whole parameter (a replica).
                       d: each tp rank holds a slice; the slices, concatenated in tp-rank order along dimension d,
                       are the parameter (Column/RowParallelLinear weights, the vocabulary-split embedding).
    sequence_parallel  a replicated parameter that each tp rank feeds only its shard of the sequence (LayerNorms,
                       row-parallel biases, position embeddings under sequence parallelism): its gradient on each
                       rank is a partial sum, to be summed over the tp group.
    tied_embedding     the token embedding the output layer shares, on either pipeline stage that holds it: the
                       first (it embeds tokens) or the last (a stage that does not embed keeps its own copy for
                       the output layer). Gets a gradient bucket of its own, and its gradient is summed over the
                       embedding group (first + last stage), so both holders take the same step.
    embedding_copy     the last stage's copy of the tied embedding, on a stage that does not also embed tokens.
                       Equal to the first stage's after every step, so the gradient norm counts and checkpoints
                       write only the first stage's. Implies tied_embedding.

The two embedding fields keep apart what used to be one attribute: every holder of the tied embedding takes part
in its all-reduce (tied_embedding), while only the non-first copy is skipped when counting or writing
(embedding_copy). Confusing the two would leave one stage out of a collective the other waits in.

Who reads what:

    gradient buckets (data_parallel.py)     own_bucket
    finalize_grads (parallel/grads.py)      sequence_parallel, tied_embedding
    gradient norm (parallel/grads.py)       tp_split_dim, embedding_copy (through counted_on)
    optimizer (train/optimizer.py)          copy_spec onto its fp32 main pieces, which the two above then read
    checkpoints (checkpoint/*.py)           tp_split_dim (how a tensor is cut), embedding_copy (who writes it)
    inference (inference.py)                copy_spec across `to_empty`, which makes new Parameter objects
    reshard (checkpoint/reshard.py)         through the checkpoints' TensorShard, built from tp_split_dim

The spec lives in one attribute of the parameter (SPEC_ATTR). It is frozen, so parameters may share one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

SPEC_ATTR = "megagpt_spec"


@dataclass(frozen=True)
class ParamSpec:
    tp_split_dim: int | None = None
    sequence_parallel: bool = False
    tied_embedding: bool = False
    embedding_copy: bool = False

    def __post_init__(self):
        if self.embedding_copy and not self.tied_embedding:
            raise ValueError("embedding_copy marks a copy of the tied embedding; set tied_embedding too")

    @property
    def tp_split(self) -> bool:
        """Each tensor-parallel rank holds a different slice (with a tp group of one rank: the whole)."""
        return self.tp_split_dim is not None

    @property
    def own_bucket(self) -> bool:
        """Reduced in a gradient bucket of its own: under ZeRO-1 the first and last stages then slice the tied
        embedding identically, so its gradient can be summed between them slice by slice (Megatron does the same)."""
        return self.tied_embedding

    def counted_on(self, tp_index: int) -> bool:
        """Whether this rank's values count once in the whole model (its gradient norm, its checkpoint): a tp
        slice on every tp rank, a tp replica on the group's first rank, never the last stage's embedding copy."""
        return (self.tp_split or tp_index == 0) and not self.embedding_copy


DEFAULT = ParamSpec()


def spec_of(param: torch.Tensor) -> ParamSpec:
    """The parameter's spec; a parameter nobody marked is a plain replica (ParamSpec())."""
    return getattr(param, SPEC_ATTR, DEFAULT)


def set_spec(param: torch.Tensor, spec: ParamSpec) -> torch.Tensor:
    """Give the parameter its spec (replacing any earlier one); returns the parameter."""
    setattr(param, SPEC_ATTR, spec)
    return param


def update_spec(param: torch.Tensor, **changes) -> torch.Tensor:
    """Change some fields of the parameter's spec, keeping the others; returns the parameter."""
    return set_spec(param, dataclasses.replace(spec_of(param), **changes))


def copy_spec(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Give dst src's spec: for a tensor standing in for a parameter (an optimizer's main piece) or a new
    Parameter object replacing one (after `to_empty`). Returns dst."""
    return set_spec(dst, spec_of(src))
