"""The training loop: gradient accumulation over micro-batches, clipping, AdamW, LR schedule, evaluation, logs.

Samples are read in order from the (already shuffled) training dataset: step n consumes the next
global_batch_size samples, whatever the layout, so the data a step sees depends only on the seed and the step.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch

from megagpt.config import Config
from megagpt.errors import UserError
from megagpt.parallel.context import ParallelContext
from megagpt.train.metrics import MetricsWriter
from megagpt.train.schedules import global_batch_size, learning_rate


def read_batch(dataset, start: int, count: int, device: torch.device) -> torch.Tensor:
    """Samples start .. start+count-1 stacked: (count, seq_length + 1) token ids."""
    return torch.stack([dataset[i] for i in range(start, start + count)]).to(device, non_blocking=True)


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    consumed_samples: int = 0
    history: list[dict] = field(default_factory=list)  # the logged rows, also returned to callers and tests


class Trainer:
    def __init__(
        self, cfg: Config, ctx: ParallelContext, model, optimizer, train_data, valid_data, metrics: MetricsWriter | None
    ):
        self.cfg = cfg
        self.ctx = ctx
        self.model = model
        self.optimizer = optimizer
        self.train_data = train_data
        self.valid_data = valid_data
        self.metrics = metrics
        self.state = TrainState()
        self.params = [p for p in model.parameters() if p.requires_grad]

    def autocast(self):
        if self.cfg.train.precision == "bf16":
            return torch.autocast(device_type=self.ctx.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self) -> tuple[float, float, float, int]:
        """One optimizer step; returns (mean loss, grad norm before clipping, lr, samples consumed)."""
        cfg = self.cfg
        self.model.train()
        batch = global_batch_size(self.state.consumed_samples, cfg.train)
        micro = cfg.train.micro_batch_size
        num_micro_batches = batch // micro
        total_loss = torch.zeros((), device=self.ctx.device)
        for i in range(num_micro_batches):
            tokens = read_batch(self.train_data, self.state.consumed_samples + i * micro, micro, self.ctx.device)
            with self.autocast():
                loss = self.model(tokens[:, :-1], tokens[:, 1:])  # mean over the micro-batch's tokens
            # Every micro-batch has the same number of tokens, so the mean of means is the batch mean.
            (loss / num_micro_batches).backward()
            total_loss += loss.detach()
        mean_loss = (total_loss / num_micro_batches).item()
        if not math.isfinite(mean_loss):
            raise UserError(
                f"the training loss became {mean_loss} at step {self.state.step + 1}; lower optim.lr, keep "
                f"optim.clip_grad on, or use train.precision=fp32"
            )
        max_norm = cfg.optim.clip_grad if cfg.optim.clip_grad > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm, foreach=True).item()
        lr = learning_rate(self.state.step, cfg.optim, cfg.train.iters)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.consumed_samples += batch
        return mean_loss, grad_norm, lr, batch

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the first eval_iters global batches of the validation split (the same ones every time)."""
        cfg = self.cfg
        self.model.eval()
        micro = cfg.train.micro_batch_size
        samples = cfg.train.eval_iters * cfg.train.global_batch_size
        losses = []
        for start in range(0, samples, micro):
            tokens = read_batch(self.valid_data, start, micro, self.ctx.device)
            with self.autocast():
                losses.append(self.model(tokens[:, :-1], tokens[:, 1:]).float())
        self.model.train()
        return torch.stack(losses).mean().item()

    def should_evaluate(self, step: int) -> bool:
        t = self.cfg.train
        if t.eval_iters == 0 or self.valid_data is None:
            return False
        return step == t.iters or (t.eval_interval > 0 and step % t.eval_interval == 0)

    def train(self) -> TrainState:
        cfg = self.cfg
        tokens_per_sample = cfg.model.seq_length
        start_time = time.perf_counter()
        window_losses, window_tokens, window_time = [], 0, 0.0
        while self.state.step < cfg.train.iters:
            t0 = time.perf_counter()
            loss, grad_norm, lr, batch = self.train_step()
            window_time += time.perf_counter() - t0
            window_losses.append(loss)
            window_tokens += batch * tokens_per_sample
            step = self.state.step
            log_now = step % cfg.logging.log_interval == 0 or step == cfg.train.iters
            eval_now = self.should_evaluate(step)
            if not (log_now or eval_now):
                continue
            row = {
                "step": step,
                "loss": sum(window_losses) / len(window_losses),  # mean over the steps since the last row
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_s": window_tokens / window_time,
                "global_batch_size": batch,
                "consumed_samples": self.state.consumed_samples,
            }
            if eval_now:
                val_loss = self.evaluate()
                row["val_loss"] = val_loss
                row["val_ppl"] = math.exp(min(val_loss, 50.0))
            row["elapsed_s"] = time.perf_counter() - start_time
            self.state.history.append(row)
            if self.metrics is not None:
                self.metrics.write(row)
            window_losses, window_tokens, window_time = [], 0, 0.0
        return self.state
