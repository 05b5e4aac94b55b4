"""The training loop: gradient accumulation over micro-batches, clipping, AdamW, LR schedule, evaluation, logs.

Samples are read in order from the (already shuffled) training dataset: step n consumes the next
global_batch_size samples, whatever the layout, so the data a step sees depends only on the seed and the step.
Micro-batch i of a step is the samples [i * mbs * dp, (i + 1) * mbs * dp) of that global batch, and data-parallel
rank d takes the d-th run of mbs samples of it (Megatron's pretraining sampler).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch

from megagpt.config import Config
from megagpt.errors import DataError, UserError
from megagpt.parallel.comm import all_reduce
from megagpt.parallel.context import ParallelContext
from megagpt.parallel.data_parallel import GradBuckets
from megagpt.parallel.pipeline import PipelineExecutor
from megagpt.train.grads import (
    allreduce_embedding_grads,
    allreduce_sequence_parallel_grads,
    clip_grads,
    global_grad_norm,
)
from megagpt.train.metrics import MetricsWriter
from megagpt.train.schedules import global_batch_size, learning_rate


def read_batch(dataset, start: int, count: int, vocab_size: int) -> torch.Tensor:
    """Samples start .. start+count-1 stacked: (count, seq_length + 1) token ids, checked against the vocabulary."""
    tokens = torch.stack([dataset[i] for i in range(start, start + count)])
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab_size:
        bad = high if high >= vocab_size else low
        raise DataError(
            f"samples {start}..{start + count - 1} hold token id {bad}, outside model.vocab_size={vocab_size}; "
            f"the dataset was tokenized with another vocabulary, so re-tokenize it or set model.vocab_size"
        )
    return tokens


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    consumed_samples: int = 0
    history: list[dict] = field(default_factory=list)  # the logged rows, also returned to callers and tests


class Trainer:
    def __init__(
        self,
        cfg: Config,
        ctx: ParallelContext,
        chunks: torch.nn.ModuleList,
        executor: PipelineExecutor,
        optimizer,
        grads: GradBuckets,
        train_data,
        valid_data,
        metrics: MetricsWriter | None,
    ):
        self.cfg = cfg
        self.ctx = ctx
        self.chunks = chunks  # this rank's model chunks (one unless the pipeline is interleaved)
        self.executor = executor
        self.optimizer = optimizer
        self.grads = grads
        self.train_data = train_data
        self.valid_data = valid_data
        self.metrics = metrics
        self.state = TrainState()
        self.params = [p for p in chunks.parameters() if p.requires_grad]

    def autocast(self):
        if self.cfg.train.precision == "bf16":
            return torch.autocast(device_type=self.ctx.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def micro_batches(self, dataset, first_sample: int, num_samples: int) -> list[torch.Tensor]:
        """This dp rank's micro-batches of the samples [first_sample, first_sample + num_samples)."""
        micro, dp = self.cfg.train.micro_batch_size, self.ctx.dp_group.size
        batches = []
        for start in range(first_sample, first_sample + num_samples, micro * dp):
            tokens = read_batch(dataset, start + self.ctx.dp_group.index * micro, micro, self.cfg.model.vocab_size)
            batches.append(tokens.to(self.ctx.device, non_blocking=True))
        return batches

    def forward(self, chunk, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        with self.autocast():
            return chunk(x, labels)

    def mean_loss(self, losses: list[torch.Tensor], num_micro_batches: int) -> float:
        """The batch's mean loss on every rank: only the last pipeline stage has the per-micro-batch losses."""
        total = torch.stack(losses).sum() if losses else torch.zeros((), device=self.ctx.device)
        all_reduce(total, self.ctx.pp_group)
        all_reduce(total, self.ctx.dp_group)
        return total.item() / (num_micro_batches * self.ctx.dp_group.size)

    def compute_gradients(self, batch: int) -> tuple[float, object]:
        """Forward and backward of the next `batch` samples in the pipeline schedule's order, then the gradients
        finished across every group: dp-averaged, sequence-parallel and tied-embedding parts summed.
        Returns (the batch's mean loss, the schedule's record)."""
        ctx = self.ctx
        self.chunks.train()
        micro_batches = self.micro_batches(self.train_data, self.state.consumed_samples, batch)
        self.grads.start_step(len(micro_batches))
        # Each micro-batch's mean loss weighs 1 / num_micro_batches; the dp average happens in the reduction.
        record = self.executor.run(micro_batches, self.forward, backward=True)
        mean_loss = self.mean_loss(record.losses, len(micro_batches))
        if not math.isfinite(mean_loss):
            raise UserError(
                f"the training loss became {mean_loss} at step {self.state.step + 1}; lower optim.lr, keep "
                f"optim.clip_grad on, or use train.precision=fp32"
            )
        self.grads.finish()
        allreduce_sequence_parallel_grads(self.params, ctx.tp_group)
        allreduce_embedding_grads(self.params, ctx.embedding_group)
        return mean_loss, record

    def train_step(self) -> tuple[float, float, float, int]:
        """One optimizer step; returns (mean loss, grad norm before clipping, lr, samples consumed)."""
        cfg, ctx = self.cfg, self.ctx
        batch = global_batch_size(self.state.consumed_samples, cfg.train)
        mean_loss, _ = self.compute_gradients(batch)
        grad_norm = global_grad_norm(self.params, ctx.tp_group, ctx.pp_group)
        if cfg.optim.clip_grad > 0:
            clip_grads(self.params, cfg.optim.clip_grad, grad_norm)
        lr = learning_rate(self.state.step, cfg.optim, cfg.train.iters)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.grads.zero()
        self.state.step += 1
        self.state.consumed_samples += batch
        return mean_loss, grad_norm, lr, batch

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the first eval_iters global batches of the validation split (the same ones every time)."""
        cfg = self.cfg
        self.chunks.eval()
        micro_batches = self.micro_batches(self.valid_data, 0, cfg.train.eval_iters * cfg.train.global_batch_size)
        record = self.executor.run(micro_batches, self.forward, backward=False)
        self.chunks.train()
        return self.mean_loss(record.losses, len(micro_batches))

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
