"""AdamW with GPT-3's settings on fp32 main weights, optionally sharded across data parallelism (ZeRO-1, 2, 3).

The model computes in its own dtype (fp32, bf16 or fp16); the optimizer never touches low-precision numbers:

    model param (fp32/bf16/fp16)  --backward-->  main_grad (fp32 bucket buffer, dp-reduced; data_parallel.py)
    main param (fp32)  <--AdamW--  main_grad
    model param  <--copy / all-gather--  main param

The optimizer works on *pieces*: 1-D ranges of the flattened model parameters, the ones GradBuckets says this rank
owns (whole parameters with zero=0, this rank's 1/dp slices with zero >= 1). AdamW is elementwise, so updating a
parameter piece by piece is exactly updating it whole. Each piece is an fp32 nn.Parameter whose .grad is a view
of the reduced gradient (main_grad, or with zero >= 2 the rank's gradient slice): for an fp32 model it is a view
of the model parameter itself (with zero=3 of the rank's parameter slice; updated in place, no copy); for
bf16/fp16 it is an fp32 copy, the main weight, written back to the model after every step. Each piece carries the
ParamSpec of its parameter (parallel/params.py), so finalize_grads and the global norm (parallel/grads.py) treat
it as they would the parameter.

Weight decay applies to matrices only (not to biases and LayerNorm parameters), decided on the model parameter.
"""

from __future__ import annotations

import torch

from megagpt.config import OptimConfig
from megagpt.parallel.comm import all_reduce
from megagpt.parallel.context import ParallelContext
from megagpt.parallel.data_parallel import GradBuckets
from megagpt.parallel.grads import clip_grads, finalize_grads, global_grad_norm
from megagpt.parallel.params import copy_spec
from megagpt.train.loss_scaler import LossScaler


def decays(param: torch.nn.Parameter) -> bool:
    # Biases and LayerNorm gains/biases are vectors; embeddings and projections are matrices.
    return param.ndim >= 2


class MainParamOptimizer:
    """Finishes the gradients across every group, then AdamW on this rank's fp32 main pieces.

    step(lr) returns (grad_norm, skipped). With a loss scaler (fp16) the gradients are unscaled first, and a step
    whose gradients hold inf or NaN anywhere in the world is skipped on every rank."""

    def __init__(self, grads: GradBuckets, optim: OptimConfig, ctx: ParallelContext, scaler: LossScaler | None = None):
        self.grads = grads
        self.ctx = ctx
        self.scaler = scaler
        self.clip_grad = optim.clip_grad
        self.pieces: list[tuple[torch.nn.Parameter, int, int, torch.nn.Parameter]] = []  # (model, start, end, main)
        for param, start, end in grads.owned_pieces():
            flat = grads.param_piece(param, start, end)  # zero=3: in this rank's slice of the parameters
            main = torch.nn.Parameter(flat if param.dtype == torch.float32 else flat.float())
            main.grad = grads.grad_piece(param, start, end)  # zero >= 2: in this rank's slice of the gradients
            copy_spec(param, main)
            self.pieces.append((param, start, end, main))
        self.mains = [main for *_, main in self.pieces]
        # An fp32 model is updated in place through its pieces; a low-precision one gets the fp32 copies back.
        self.copies_back = any(param.dtype != torch.float32 for param, *_ in self.pieces)
        decay = [main for param, _, _, main in self.pieces if decays(param)]
        no_decay = [main for param, _, _, main in self.pieces if not decays(param)]
        groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        hyper = dict(lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps)
        # The fused AdamW kernel (one pass over each tensor; CPU and CUDA since torch 2.4) is several times faster
        # than the foreach one (bench/train_throughput.py); foreach where a torch or device lacks it.
        try:
            self.adam = torch.optim.AdamW(groups, fused=True, **hyper)
            self.fused = True
        except RuntimeError:
            self.adam = torch.optim.AdamW(groups, foreach=True, **hyper)
            self.fused = False
        # Allocate Adam's moments now, as AdamW would at its first step, so the memory report and checkpoints
        # see the state from the start (an fp16 run may skip its first steps). The fused kernel keeps its step
        # count on the parameters' device.
        for main in self.mains:
            self.adam.state[main] = {
                "step": torch.tensor(0.0, dtype=torch.float32, device=main.device if self.fused else "cpu"),
                "exp_avg": torch.zeros_like(main, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(main, memory_format=torch.preserve_format),
            }

    def finish_gradients(self) -> None:
        """After backward: finalize_grads on this rank's pieces (dp mean, then the tp and tied-embedding sums)."""
        finalize_grads(self.grads, self.mains, self.ctx)

    def grad_norm(self) -> torch.Tensor:
        ctx = self.ctx
        dp_shards = ctx.dp_group if self.grads.shard else None
        return global_grad_norm(self.mains, ctx.tp_group, ctx.pp_group, dp_shards)

    def step(self, lr: float) -> tuple[torch.Tensor, bool]:
        """Clip, update, copy back. Returns the gradient norm before clipping (a device tensor, read only when
        logged) and whether fp16 overflowed and the step was skipped (fp16 must know on the host)."""
        if self.scaler is not None and self.unscale_and_find_inf():
            return self.grad_norm(), True
        norm = self.grad_norm()
        if self.clip_grad > 0:
            clip_grads(self.mains, self.clip_grad, norm)
        for group in self.adam.param_groups:
            group["lr"] = lr
        self.adam.step()
        if self.copies_back:
            with torch.no_grad():
                for param, start, end, main in self.pieces:
                    self.grads.param_piece(param, start, end).copy_(main)
        self.grads.gather_params()
        return norm, False

    def unscale_and_find_inf(self) -> bool:
        """Divide the gradients by the loss scale; True when any rank of the world holds an inf or NaN in any of
        its pieces (replicated ones included, which the norm counts on one rank only), the same on every rank."""
        grads = [main.grad for main in self.mains]
        device = grads[0].device if grads else self.ctx.device
        found_inf = torch.zeros((), dtype=torch.float32, device=device)
        inv_scale = torch.full((), 1.0 / self.scaler.scale, dtype=torch.float32, device=device)
        if grads:
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)
        all_reduce(found_inf, self.ctx.world_group, op="max")
        return found_inf.item() > 0

    def state_bytes(self) -> int:
        """Bytes of optimizer state on this rank: Adam's moments, plus the fp32 main weights where they are copies."""
        moments = sum(t.numel() * t.element_size() for s in self.adam.state.values() for t in s.values() if t.ndim)
        main_copies = sum(m.numel() * m.element_size() for m in self.mains) if self.copies_back else 0
        return moments + main_copies

    def state_dict(self) -> dict:
        """This rank's optimizer state, piece by piece, as a checkpoint saves it:

            {"step": Adam's step count (the same for every piece),
             "sharded": True where the pieces are this rank's ZeRO slices (each dp rank holds its own),
             "pieces": [{"param": the model parameter, "start": int, "end": int,   # its flat range [start, end)
                         "exp_avg": tensor, "exp_avg_sq": tensor,
                         "main": tensor}, ...]}   # the fp32 main weight, only where it is a copy (bf16/fp16)

        The tensors are the optimizer's own, not copies (torch's convention): a checkpoint copies what it writes."""
        steps = [float(state["step"]) for state in self.adam.state.values()]
        pieces = []
        for param, start, end, main in self.pieces:
            adam = self.adam.state[main]
            piece = {"param": param, "start": start, "end": end}
            piece.update(exp_avg=adam["exp_avg"], exp_avg_sq=adam["exp_avg_sq"])
            if self.copies_back:  # an fp32 model's main weights are its parameters: saved as the weights
                piece["main"] = main
            pieces.append(piece)
        return {"step": steps[0] if steps else 0.0, "sharded": self.grads.shard, "pieces": pieces}

    def load_state_dict(self, state: dict) -> None:
        """Copy state into this optimizer's tensors, in place: all of a state_dict(), or any part of it. Each entry
        of "pieces" names its piece by "param" and "start" and brings any of exp_avg, exp_avg_sq and main; "step",
        when given, becomes every piece's Adam step count. (A checkpoint loads one parameter at a time, so that
        no rank holds the whole model's state twice.)"""
        by_start = {(id(param), start): main for param, start, _, main in self.pieces}
        with torch.no_grad():
            for piece in state.get("pieces", []):
                main = by_start.get((id(piece["param"]), piece["start"]))
                if main is None:
                    raise KeyError(f"this optimizer holds no piece starting at {piece['start']} of that parameter")
                adam = self.adam.state[main]
                for kind in ("exp_avg", "exp_avg_sq"):
                    if kind in piece:
                        adam[kind].copy_(piece[kind])
                if "main" in piece:
                    main.copy_(piece["main"])
            if state.get("step") is not None:
                for adam in self.adam.state.values():
                    adam["step"].fill_(state["step"])
