"""Autoregressive generation with a key/value cache, for dense and local layers, under tensor parallelism.

    ids = generate(model, prompt, max_new_tokens=20)                       # greedy
    ids = generate(model, prompt, 20, greedy=False, temperature=0.8, top_k=40, top_p=0.95, seed=1)

The prompt runs through the model once (prefill), keeping each layer's keys and values; every new token then
runs alone, attending to the cache. A local layer's cache keeps only its last `local_window` positions: a query
never sees keys further back, so the cache of a local layer stays O(window) however long the text grows.

Each tensor-parallel rank holds its heads' cache; the logits are gathered over the vocabulary (GPT.head), and
every rank samples with the same seeded generator, so all ranks pick the same token without a broadcast.
"""

from __future__ import annotations

import torch

from megagpt.config import max_positions
from megagpt.errors import UserError
from megagpt.model.attention import KVCache


@torch.no_grad()
def forward_cached(model, tokens: torch.Tensor, caches: list[KVCache], start: int) -> torch.Tensor:
    """Logits (b, s, vocab) for tokens (b, s) at positions start .. start + s - 1, given the caches of the
    positions before (one per layer, updated in place). The blocks are the model's own, run with their cache."""
    positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)
    x = model.wte(tokens) + model.wpe(positions)
    for block, cache in zip(model.blocks.values(), caches):
        x = block(x, cache)
    return model.head(model.ln_f(x), None)


def next_tokens(logits: torch.Tensor, greedy: bool, temperature: float, top_k: int, top_p: float, generator):
    """(b, vocab) -> (b,): the argmax, or a sample from the tempered distribution cut to its top_k tokens and to
    the smallest set whose probability reaches top_p."""
    if greedy:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        # Keep exactly k tokens by index: a threshold on the k-th value would keep every token tied with it,
        # and ties are common in bf16 / fp16 logits.
        top = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).indices
        logits = torch.full_like(logits, float("-inf")).scatter(-1, top, logits.gather(-1, top))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens more likely than it already reach top_p (the first is always kept).
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


@torch.no_grad()
def generate(
    model,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    greedy: bool = True,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_id: int | None = None,
) -> torch.Tensor:
    """prompt (b, s) token ids -> (b, s + n) with n <= max_new_tokens, fewer if every row produced eos_id. A row
    that has produced eos_id is padded with eos_id from there on (as transformers pads with pad_token_id)."""
    if not (model.pre_process and model.post_process):
        raise UserError("generation runs the whole model on each rank: use a layout with parallel.pp=1")
    if not greedy and temperature <= 0:
        raise UserError(f"--temperature={temperature} must be positive (or use --greedy)")
    if prompt.dim() != 2 or prompt.shape[1] == 0 or max_new_tokens < 0:
        raise UserError(
            f"generation needs a (batch, length >= 1) prompt and max_new_tokens >= 0; got a prompt of shape "
            f"{tuple(prompt.shape)} and max_new_tokens={max_new_tokens}"
        )
    if max_new_tokens == 0:
        return prompt
    # The whole output must fit the model's positions, so that it can be fed back as context.
    limit = max_positions(model.cfg)
    if prompt.shape[1] + max_new_tokens > limit:
        raise UserError(
            f"a prompt of {prompt.shape[1]} tokens plus {max_new_tokens} new ones exceeds the model's "
            f"{limit} positions; shorten the prompt or ask for fewer tokens"
        )
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    caches = [KVCache() for _ in model.blocks]
    tokens = prompt
    logits = forward_cached(model, prompt, caches, 0)[:, -1]
    finished = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    for produced in range(1, max_new_tokens + 1):
        new = next_tokens(logits, greedy, temperature, top_k, top_p, generator)
        if eos_id is not None:
            new = new.masked_fill(finished, eos_id)  # finished rows stay finished
            finished |= new == eos_id
        tokens = torch.cat([tokens, new.unsqueeze(1)], dim=1)
        if produced == max_new_tokens or finished.all():
            break
        logits = forward_cached(model, new.unsqueeze(1), caches, tokens.shape[1] - 1)[:, -1]
    return tokens
