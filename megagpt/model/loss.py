"""The output layer and its cross entropy in one pass over the sequence, one block of rows at a time (tp = 1).

    loss = linear_cross_entropy(x, weight, labels)      # mean over rows of -log softmax(x @ weight.T)[label]

With GPT-2's 50k vocabulary the logits are the largest tensor of a step (b * s * 50257 floats: 823 MB at
4 x 1024), and the plain path materializes them twice more (the softmax's gradient, the matmul's input). Here
one row block (ROW_BLOCK rows of x) at a time computes its logits, their log-sum-exp and loss, and, when
gradients are wanted, the gradient of the summed loss with respect to the logits (softmax minus one-hot) and
from it the block's input gradient and its share of the weight gradient, all in the forward pass: the backward
only scales them by the incoming gradient / N. The same FLOPs as forward + backward, with one (rows, vocab)
tensor alive at a time.
"""

from __future__ import annotations

import torch

ROW_BLOCK = 1024  # rows of x per logits block


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, labels, block_rows, grad_x_wanted, grad_weight_wanted):
        # x: (N, h), weight: (V, h), labels: (N,) -> mean loss, a 0-d fp32 tensor. Whether gradients are wanted
        # comes from the caller: inside forward autograd has turned grad mode off, and needs_input_grad says
        # only what requires grad, not whether a backward can follow (evaluation under no_grad).
        n = x.shape[0]
        wide = torch.promote_types(x.dtype, torch.float32)  # fp32 for bf16/fp16/fp32, fp64 stays fp64
        wants_grad = grad_x_wanted or grad_weight_wanted
        grad_x = torch.empty_like(x) if wants_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=wide, device=weight.device) if grad_weight_wanted else None
        total = torch.zeros((), dtype=wide, device=x.device)
        # One logits buffer for every row block (and an fp32 one for bf16 / fp16): a fresh (rows, V) tensor per block
        # costs its page faults each time, which on CPU took as long as a third of the block's matmul.
        rows_max = min(block_rows, n)
        buffer = torch.empty((rows_max, weight.shape[0]), dtype=x.dtype, device=x.device)
        wide_buffer = buffer if x.dtype == wide else torch.empty(buffer.shape, dtype=wide, device=x.device)
        for start in range(0, n, block_rows):
            rows = slice(start, min(n, start + block_rows))
            c = rows.stop - start
            logits = torch.mm(x[rows], weight.t(), out=buffer[:c])  # (c, V)
            if logits.dtype != wide:
                logits = wide_buffer[:c].copy_(logits)  # softmax in fp32 whatever the compute dtype
            label_logits = logits.gather(1, labels[rows].unsqueeze(1)).squeeze(1)
            # log-sum-exp in place (torch.logsumexp would allocate a (c, V) temporary): the buffer becomes
            # exp(logits - max), then, when gradients are wanted, the softmax.
            row_max = logits.amax(dim=1, keepdim=True)
            exp_sum = logits.sub_(row_max).exp_().sum(dim=1, keepdim=True)
            total += (exp_sum.log() + row_max - label_logits.unsqueeze(1)).sum()
            if wants_grad:
                probs = logits.div_(exp_sum)
                probs.scatter_add_(1, labels[rows].unsqueeze(1), probs.new_full((c, 1), -1.0))
                if probs.dtype != x.dtype:
                    probs = buffer[:c].copy_(probs)  # d(sum of losses) / d(logits), in the compute dtype
                torch.matmul(probs, weight, out=grad_x[rows])
                if grad_weight is None:
                    pass
                elif grad_weight.dtype == x.dtype:
                    grad_weight.addmm_(probs.t(), x[rows])  # in place: no (V, h) temporary
                else:
                    grad_weight.add_(probs.t() @ x[rows])  # bf16 / fp16 products, accumulated in fp32
        ctx.save_for_backward(grad_x, grad_weight)
        ctx.n = n
        ctx.weight_dtype = weight.dtype
        return total / n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grad_x, grad_weight = ctx.saved_tensors
        scale = grad_loss / ctx.n
        dx = grad_x * scale.to(grad_x.dtype) if ctx.needs_input_grad[0] else None
        dw = (grad_weight * scale).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return dx, dw, None, None, None, None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, block_rows: int = ROW_BLOCK):
    """Mean cross entropy of x @ weight.T against labels; x (N, h), weight (V, h), labels (N,) in [0, V)."""
    grad = torch.is_grad_enabled()
    return LinearCrossEntropy.apply(
        x, weight, labels, block_rows, grad and x.requires_grad, grad and weight.requires_grad
    )
