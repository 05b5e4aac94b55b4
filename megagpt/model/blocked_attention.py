"""Locally banded causal attention computed block by block: O(s * w) compute and memory.

Query i sees keys j with i - w < j <= i. The sequence is cut into query blocks of B rows; block n (rows nB ..
nB+B-1) needs keys nB - w + 1 ... nB + B - 1, so it meets a key window of W = P + B rows starting at nB - P,
where P is w - 1 rounded up to a multiple of B. Each block is then two small dense matmuls:

    scores (B, W) = q_block (B, d) @ k_window (W, d)^T,  probs = softmax(band-masked scores),  out = probs @ v_window

For s = 2048, w = 256 and B = 64 that is 320 keys per query instead of about 1024 for dense causal attention.

All heads' keys are laid end to end as one sequence of b*heads*S rows with P zero rows in front, so block n's window
starts at row n*B of it for every head, and `unfold` gives all windows as one strided view, (n, d, W): no copy
of the windows, one batched matmul for all blocks of all heads. Window rows that fall before the start of their
own head (the zero rows, or the previous head's tail) are masked like any other out-of-band key.

The backward is written out rather than left to autograd, for two reasons. The overlapping windows' key and value
gradients are accumulated straight into the key blocks they belong to, one batched multiply-add per block offset,
instead of autograd's scatter over the strided view. And the softmax backward runs in place on dP using
FlashAttention's identity rowsum(P * dP) = rowsum(dO * O), so no second (n, B, W) tensor is allocated:

    dP = dO @ V_w^T,  dS = P * (dP - rowsum(dO * O)),  dQ = dS @ K_w,  dK_w = dS^T @ Q,  dV_w = P^T @ dO
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F


def default_block_size(window: int) -> int:
    """A quarter of the window, so a block computes 1.25 w scores per query for the w it needs: 64 rows for GPT-3's
    window of 256. Never above 64 or below 16, where the batched matmuls get too small to run well."""
    return min(64, max(16, 1 << max(0, math.ceil(math.log2(window)) - 2)))


def key_window_rows(window: int, block_size: int | None = None) -> int:
    """W = P + B, the keys each query block meets (P: window - 1 rounded up to the block); what a local layer keeps
    of its scores per query (the memory estimate reads it here)."""
    block = default_block_size(window) if block_size is None else block_size
    return -(-(window - 1) // block) * block + block


def banded_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    dropout_p: float = 0.0,
    block_size: int | None = None,
) -> torch.Tensor:
    """q, k, v: (b, heads, s, d) -> (b, heads, s, d), scores scaled by 1/sqrt(d)."""
    if window < 1:
        raise ValueError(f"window={window} must be at least 1")
    block = default_block_size(window) if block_size is None else block_size
    return BandedAttention.apply(q, k, v, window, block, dropout_p)


@functools.lru_cache(maxsize=32)
def _outside_band(seq_len: int, window: int, block: int, device: torch.device) -> torch.Tensor:
    """(blocks, B, W) bool, True where block n's query row r must not see its window's key column c."""
    blocks = -(-seq_len // block)
    front = -(-(window - 1) // block) * block
    query = torch.arange(blocks * block, device=device).view(blocks, block, 1)
    key = torch.arange(blocks, device=device).view(blocks, 1, 1) * block - front
    key = key + torch.arange(front + block, device=device).view(1, 1, front + block)
    return ~((key <= query) & (key > query - window) & (key >= 0))


@functools.lru_cache(maxsize=32)
def _band_edges(seq_len: int, window: int, block: int, device: torch.device):
    """The masking work, cut down to where the mask is: every block past the first front/B sees its window the same
    way, and masks only its first (B + P - w) columns (keys older than the band) and last B (keys in the future).
    Returns (first, head_mask, (column slice, mask) pairs for the blocks from `first` on)."""
    outside = _outside_band(seq_len, window, block, device)
    blocks, front = outside.shape[0], outside.shape[2] - block
    first = min(blocks, front // block)  # blocks whose window reaches before position 0
    steady = []
    if first < blocks:
        for columns in (slice(0, min(front, block + front - window)), slice(front, front + block)):
            if columns.stop > columns.start:
                steady.append((columns, outside[first, :, columns]))
    return first, outside[:first], steady


def _mask_outside_band(scores: torch.Tensor, seq_len: int, window: int, block: int) -> None:
    """scores: (b*heads, blocks, B, W), set to -inf in place wherever the query must not see the key."""
    first, head_mask, steady = _band_edges(seq_len, window, block, scores.device)
    scores[:, :first].masked_fill_(head_mask, float("-inf"))
    for columns, mask in steady:
        scores[:, first:, :, columns].masked_fill_(mask, float("-inf"))


def _keys_end_to_end(x: torch.Tensor, padded_len: int, front: int) -> torch.Tensor:
    """(b, heads, s, d) -> (front + b*heads*S, d): each head's rows zero-padded to S, all heads in one sequence,
    `front` zero rows before the first."""
    b, heads, s, d = x.shape
    out = x.new_zeros(front + b * heads * padded_len, d)
    out[front:].view(b, heads, padded_len, d)[:, :, :s] = x
    return out


class BandedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, window: int, block: int, dropout_p: float):
        b, heads, s, d = q.shape
        blocks = -(-s // block)
        padded = blocks * block  # S
        front = -(-(window - 1) // block) * block  # P
        width = front + block  # W
        n = b * heads * blocks
        scale = 1.0 / math.sqrt(d)

        qs = F.pad(q * scale, (0, 0, 0, padded - s)).reshape(n, block, d)  # (n, B, d), pre-scaled
        keys = _keys_end_to_end(k, padded, front)  # (P + b*heads*S, d)
        values = _keys_end_to_end(v, padded, front)
        k_windows = keys.unfold(0, width, block)  # (n, d, W), a strided view
        v_windows = values.unfold(0, width, block).transpose(1, 2)  # (n, W, d)

        scores = torch.bmm(qs, k_windows)  # (n, B, W)
        _mask_outside_band(scores.view(b * heads, blocks, block, width), s, window, block)
        probs = torch.softmax(scores, dim=-1)
        keep = None
        if dropout_p > 0.0:
            keep = torch.empty_like(probs, dtype=torch.bool).bernoulli_(1.0 - dropout_p)
            out = torch.bmm(probs * keep / (1.0 - dropout_p), v_windows)
        else:
            out = torch.bmm(probs, v_windows)  # (n, B, d)

        ctx.save_for_backward(qs, keys, values, probs, keep, out)
        ctx.dims = (b, heads, s, d, padded, front, width, n, block, scale, dropout_p)
        return out.view(b, heads, padded, d)[:, :, :s]

    @staticmethod
    def backward(ctx, grad_out):
        qs, keys, values, probs, keep, out = ctx.saved_tensors
        b, heads, s, d, padded, front, width, n, block, scale, dropout_p = ctx.dims
        grad_out = F.pad(grad_out, (0, 0, 0, padded - s)).reshape(n, block, d)
        k_windows = keys.unfold(0, width, block).transpose(1, 2)  # (n, W, d)
        v_windows = values.unfold(0, width, block).transpose(1, 2)

        grad_scores = torch.bmm(grad_out, v_windows.transpose(1, 2))  # dP: (n, B, W)
        dropped = probs
        if keep is not None:
            grad_scores.mul_(keep).div_(1.0 - dropout_p)
            dropped = probs * keep / (1.0 - dropout_p)
        # Softmax backward in place, dS = P * (dP - D) with D = rowsum(P * dP), which equals rowsum(dO * O)
        # (FlashAttention's identity; dropout too), an (n, B) product instead of one over the (n, B, W) scores.
        wide = torch.promote_types(out.dtype, torch.float32)  # at least fp32, also for bf16/fp16 inputs
        row_dot = (grad_out.to(wide) * out.to(wide)).sum(-1, keepdim=True)
        grad_scores.sub_(row_dot).mul_(probs)
        grad_q = torch.bmm(grad_scores, k_windows).mul_(scale)  # (n, B, d)
        # dK_w = dS^T @ Q and dV_w = P^T @ dO, accumulated straight into the key blocks they belong to: window
        # n's key block o is key block n + o of the end-to-end sequence, so windows overlap and their gradients add.
        grad_keys = torch.zeros_like(keys)
        grad_values = torch.zeros_like(values)
        key_blocks = grad_keys.view(-1, block, d)
        value_blocks = grad_values.view(-1, block, d)
        for o in range(width // block):
            columns = slice(o * block, (o + 1) * block)
            key_blocks[o : o + n].baddbmm_(grad_scores[:, :, columns].transpose(1, 2), qs)
            value_blocks[o : o + n].baddbmm_(dropped[:, :, columns].transpose(1, 2), grad_out)

        def per_head(x):  # (b*heads*S, d) -> (b, heads, s, d)
            return x.view(b, heads, padded, d)[:, :, :s]

        return per_head(grad_q), per_head(grad_keys[front:]), per_head(grad_values[front:]), None, None, None
