"""The GPT-2/GPT-3 decoder, written so the parallel layers can split it.

    tokens (b, s) -> token + position embedding -> dropout
                  -> num_layers x [x + Attn(LN(x)), x + MLP(LN(x))]   (pre-LayerNorm)
                  -> final LN -> logits against the token embedding (tied) -> cross entropy

Layer l's attention is model.attention_pattern[l % len(pattern)]: "dense" (causal) or "local" (a causal band
of model.local_window keys), so the GPT-3 default [dense, local] makes layer 0 dense, layer 1 local, ... (the
convention of Hugging Face GPT-Neo's attention_types). model.attention_backend picks how attention is computed
(attention.py); local layers cost O(s * local_window) on every backend but sdpa and fused_softmax.

Tensor parallelism: heads and the MLP's 4h width are split across the tp group (shapes below show /tp);
the vocabulary is padded to a multiple of make_vocab_size_divisible_by * tp and the padded logits never
enter the softmax. Sequence parallelism additionally keeps the residual stream, LayerNorms and dropouts
sharded along the sequence, (b, s/tp, h), between the tensor-parallel blocks. With a group of one rank
everything is the plain single-GPU model.

Activation recomputation (parallel.recompute) trades compute for memory: "full" keeps only each block's input
and reruns the block in backward; "selective" reruns only the attention core (scores, softmax, dropout, the
product with v), whose (b, heads, s, s) tensors are the largest activations (Korthikanti et al. 2022). Dropout
draws the same masks in the rerun (parallel/random.py).

Precision: the model is built in fp32 (so every precision starts from the same weights) and cast to the compute
dtype; the logits are taken to fp32 for the softmax and the loss.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from megagpt.config import ModelConfig, max_positions, padded_vocab_size
from megagpt.kernels import LayerNorm
from megagpt.model.attention import KVCache, cached_attention, causal_attention, pick_backend
from megagpt.model.facts import layer_window
from megagpt.model.loss import linear_cross_entropy
from megagpt.parallel.comm import copy_to_group, gather_from_group
from megagpt.parallel.context import Group
from megagpt.parallel.params import update_spec
from megagpt.parallel.random import TensorParallelRNG, checkpoint
from megagpt.parallel.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    divide,
    mark_sequence_parallel,
    sequence_parallel_linear,
    vocab_parallel_cross_entropy,
)
from megagpt.parallel.weight_grads import embedding, linear


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, tp_group: Group, sp: bool, rng, recompute_core: bool):
        super().__init__()
        self.rng = rng
        self.split_rng = rng.fork if rng is not None else contextlib.nullcontext  # dropout on this rank's heads
        self.recompute_core = recompute_core
        self.heads = divide(cfg.num_heads, tp_group.size, "num_heads")  # heads on this rank
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.window = layer_window(cfg, layer)
        self.backend = cfg.attention_backend
        self.fused_kernels = cfg.fused_kernels
        self.dropout = cfg.dropout
        h = cfg.hidden_size
        # Fused q, k, v with the output laid out per head as [q | k | v] (Megatron's layout), so a contiguous
        # tp slice of the 3h outputs holds whole heads.
        self.qkv = ColumnParallelLinear(
            h, 3 * h, tp_group, bias=cfg.qkv_bias, init_std=cfg.init_std, sequence_parallel=sp
        )
        self.proj = RowParallelLinear(h, h, tp_group, bias=True, init_std=residual_init_std(cfg), sequence_parallel=sp)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """x: (b, s, h), or (b, s/tp, h) with sequence parallelism. With a cache (generation), x holds the positions
        after the cached ones, and the cache is extended with their keys and values."""
        y = self.attend(self.qkv(x), cache)  # the column-parallel qkv gathers the sequence: (b, s, 3h/tp)
        return self.proj(y)  # (b, s, h), or (b, s/tp, h) reduce-scattered

    def attend(self, qkv: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """(b, s, 3h/tp) fused projections of this rank's heads -> (b, s, h/tp) attention output."""
        b, s, _ = qkv.shape
        qkv = qkv.view(b, s, self.heads, 3, self.head_dim)  # (b, s, heads/tp, 3, d)
        q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))  # each (b, heads/tp, s, d)
        if cache is not None:
            y = cached_attention(q, k, v, cache, self.window)  # generation: no dropout, no recomputation
        elif self.recompute_core and torch.is_grad_enabled():
            y = checkpoint(self.core, q, k, v, rng=self.rng)  # keeps q, k, v; reruns the rest in backward
        else:
            y = self.core(q, k, v)  # (b, heads/tp, s, d)
        return y.transpose(1, 2).reshape(b, s, self.heads * self.head_dim)

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        dropout_p = self.dropout if self.training else 0.0
        backend = self.backend
        if backend == "auto":
            # Pick as training does, with the configured dropout, in evaluation too: with dropout training runs
            # local layers blocked, and switching them to compiled Flex for evaluation would bring the first
            # compile (and its need for Triton and a C compiler on the compute nodes) hours into the run.
            window = self.window if self.window is not None and self.window < q.shape[-2] else None
            backend = pick_backend(q, k, v, window=window, dropout_p=self.dropout)
        with self.split_rng():
            return causal_attention(
                q, k, v, window=self.window, dropout_p=dropout_p, backend=backend, fused_kernels=self.fused_kernels
            )


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_group: Group, sp: bool):
        super().__init__()
        h = cfg.hidden_size
        self.fc = ColumnParallelLinear(h, 4 * h, tp_group, bias=True, init_std=cfg.init_std, sequence_parallel=sp)
        self.proj = RowParallelLinear(
            4 * h, h, tp_group, bias=True, init_std=residual_init_std(cfg), sequence_parallel=sp
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, s, h) or (b, s/tp, h)
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))  # fc: (b, s, 4h/tp)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, tp_group: Group, sp: bool, rng, residual_rng, recompute: str):
        super().__init__()
        self.ln_1 = LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon, fused=cfg.fused_kernels)
        self.attn = SelfAttention(cfg, layer, tp_group, sp, rng, recompute_core=recompute == "selective")
        self.ln_2 = LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon, fused=cfg.fused_kernels)
        self.mlp = MLP(cfg, tp_group, sp)
        self.dropout = nn.Dropout(cfg.dropout)
        self.residual_rng = residual_rng
        mark_sequence_parallel(self.ln_1, sp)
        mark_sequence_parallel(self.ln_2, sp)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """x: (b, s, h), or (b, s/tp, h) with sequence parallelism; cache: generation's (see SelfAttention)."""
        y = self.attn(self.ln_1(x), cache)
        with self.residual_rng():
            x = x + self.dropout(y)
        y = self.mlp(self.ln_2(x))
        with self.residual_rng():
            x = x + self.dropout(y)
        return x


@contextlib.contextmanager
def seeded(base_seed: int, part: int):
    """Draw a part's initial weights from its own seed, so a pipeline stage that builds only some parts gets
    exactly the weights the whole model has there. Weights are drawn on the CPU, so only the CPU generator is
    seeded (torch.manual_seed would reseed every GPU's too, which fork_rng(devices=[]) does not restore), and
    it is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(base_seed + part)
        yield


class GPT(nn.Module):
    """The decoder, or the part of it that one tensor-parallel rank of one pipeline stage holds.

    tp_group: the ranks that split each layer (a group of one rank: whole layers).
    layers: the global indices of the transformer layers held here (default: all).
    pre_process: holds the embeddings and takes token ids (the first pipeline stage).
    post_process: holds the final LayerNorm, the output layer and the loss (the last pipeline stage). A last stage
        that is not also the first keeps its own copy of the token embedding for the tied output layer: both
        holders are marked tied_embedding (their gradients are summed over the embedding group), the last
        stage's copy also embedding_copy (parallel/params.py).
    sequence_parallel: keep the residual stream sharded along the sequence between blocks.
    rng: the two dropout streams (megagpt/parallel/random.py); needed when the layers are split, since
        dropout must then differ across ranks in split regions and agree in replicated ones.
    recompute: "none", "selective" (the attention core) or "full" (each block), rerun in backward.

    Weights: init_seed (by default a draw from the global RNG) is the base seed, and each part (the embeddings,
    each layer) is drawn from its own seed derived from it, so every stage and layout builds the same model.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        tp_group: Group,
        *,
        layers: range | None = None,
        pre_process: bool = True,
        post_process: bool = True,
        sequence_parallel: bool = False,
        rng: TensorParallelRNG | None = None,
        init_seed: int | None = None,
        recompute: str = "none",
    ):
        super().__init__()
        if rng is None and tp_group.size > 1:
            raise ValueError("a tensor-parallel GPT needs a TensorParallelRNG for its dropout streams")
        if recompute not in ("none", "selective", "full"):
            raise ValueError(f"recompute={recompute!r}; use none, selective or full")
        self.rng = rng
        self.recompute = recompute
        self.cfg = cfg
        self.tp_group = tp_group
        self.layers = range(cfg.num_layers) if layers is None else layers
        self.pre_process, self.post_process = pre_process, post_process
        self.sequence_parallel = sequence_parallel and tp_group.size > 1
        self.vocab_size = cfg.vocab_size
        self.padded_vocab_size = padded_vocab_size(cfg, tp_group.size)
        split_rng = rng.fork if rng is not None else contextlib.nullcontext
        # The residual stream is split across tp ranks only under sequence parallelism.
        residual_rng = split_rng if self.sequence_parallel else contextlib.nullcontext
        self.residual_rng = residual_rng
        base_seed = int(torch.randint(0, 2**62, (1,)).item()) if init_seed is None else init_seed

        if pre_process or post_process:
            with seeded(base_seed, 0):
                self.wte = VocabParallelEmbedding(
                    self.vocab_size,
                    self.padded_vocab_size,
                    cfg.hidden_size,
                    tp_group,
                    init_std=cfg.init_std,
                    sequence_parallel=self.sequence_parallel and pre_process,
                )
                update_spec(self.wte.weight, tied_embedding=True, embedding_copy=not pre_process)
        if pre_process:
            with seeded(base_seed, 1):
                self.wpe = nn.Embedding(max_positions(cfg), cfg.hidden_size)
                nn.init.normal_(self.wpe.weight, mean=0.0, std=cfg.init_std)
            # Under sequence parallelism each rank looks up only its shard's positions: partial gradients.
            mark_sequence_parallel(self.wpe, self.sequence_parallel)
            self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleDict()
        for layer in self.layers:
            with seeded(base_seed, 2 + layer):
                self.blocks[str(layer)] = Block(
                    cfg, layer, tp_group, self.sequence_parallel, rng, residual_rng, recompute
                )
        if post_process:
            self.ln_f = LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon, fused=cfg.fused_kernels)
            mark_sequence_parallel(self.ln_f, self.sequence_parallel)

    # Zero-bubble schedules: the position embedding's and the tp>1 output layer's weight gradients wait for W
    # (parallel/weight_grads.py). The tp=1 fused output layer + loss computes its weight gradient in the forward
    # (model/loss.py), so no weight-gradient work is left for W; its backward applies it at once, which also frees
    # the (V, h) fp32 buffer instead of holding one per micro-batch waiting for W.
    split_backward = False

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """First stage: token ids (b, s); later stages: the hidden state (b, s, h), or (b, s/tp, h) with sequence
        parallelism. Last stage: logits (b, s, vocab_size), or with labels (b, s) the mean cross entropy;
        other stages: the hidden state for the next one."""
        if self.pre_process:
            x = self.embed(x)
        for block in self.blocks.values():
            if self.recompute == "full" and torch.is_grad_enabled():
                x = checkpoint(block, x, rng=self.rng)  # keeps only x; backward reruns the block
            else:
                x = block(x)
        if not self.post_process:
            return x
        return self.head(self.ln_f(x), labels)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:  # (b, s) -> (b, s, h) or (b, s/tp, h)
        s = tokens.shape[1]
        positions = torch.arange(s, device=tokens.device)
        if self.sequence_parallel:
            # The token embedding's partial sums are reduce-scattered straight into sequence shards, and each
            # rank adds the position embeddings of its own shard.
            shard = divide(s, self.tp_group.size, "the sequence length under sequence parallelism")
            positions = positions[self.tp_group.index * shard : (self.tp_group.index + 1) * shard]
        # The token embedding first: backward then finishes the position embedding's gradient before the tied
        # token embedding's, so the gradient buckets launch in their list order (data_parallel.py).
        tok = self.wte(tokens)
        wpe = embedding(positions, self.wpe.weight) if self.split_backward else self.wpe(positions)
        x = tok + wpe  # (b, s, h), or (b, s/tp, h)
        with self.residual_rng():
            return self.drop(x)

    def head(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        # The output layer is tied to the token embedding: every rank multiplies the full sequence by its
        # vocabulary slice, (b, s, h) @ (h, V/tp) -> (b, s, V/tp). Under sequence parallelism the gathered
        # sequence is not kept for backward, only this rank's shard (as in the column-parallel layers).
        if self.sequence_parallel:
            logits = sequence_parallel_linear(x, self.wte.weight, None, self.tp_group).float()
            return self.vocab_parallel_loss(logits, labels)
        x = copy_to_group(x, self.tp_group)
        if self.tp_group.size == 1:
            # The padded vocabulary rows are not tokens: leave them out of the matmul and the softmax.
            weight = self.wte.weight[: self.vocab_size]
            if labels is None:
                return F.linear(x, weight)
            # Softmax and loss in fp32 whatever the compute precision, one row block at a time (model/loss.py).
            return linear_cross_entropy(x.flatten(0, 1), weight, labels.flatten())

        logits = linear(x, self.wte.weight) if self.split_backward else F.linear(x, self.wte.weight)
        return self.vocab_parallel_loss(logits.float(), labels)

    def vocab_parallel_loss(self, logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """(b, s, V_padded/tp) fp32 logits of this rank's vocabulary slice -> the gathered logits, or the loss."""
        vocab_ids = torch.arange(self.wte.vocab_start, self.wte.vocab_end, device=logits.device)
        logits = logits.masked_fill(vocab_ids >= self.vocab_size, float("-inf"))  # padding gets no probability
        if labels is None:
            return gather_from_group(logits, self.tp_group)[..., : self.vocab_size]
        losses = vocab_parallel_cross_entropy(
            logits.flatten(0, 1), labels.flatten(), self.wte.vocab_start, self.tp_group
        )
        return losses.mean()


def residual_init_std(cfg: ModelConfig) -> float:
    """GPT-2's scaled init for the projections that write into the residual stream."""
    return cfg.init_std / math.sqrt(2.0 * cfg.num_layers)
