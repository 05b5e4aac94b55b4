"""The training loop: gradient accumulation over micro-batches, clipping, AdamW, LR schedule, evaluation, logs.

A step: the pipeline schedule runs forward and backward over the step's micro-batches (the loss multiplied by the
fp16 loss scale), the optimizer finishes the gradients across groups and updates its fp32 main weights (or skips
the step on an fp16 overflow, everywhere alike), the gradient buffers are zeroed. After the first step each rank
reports its memory (train/memory.py).

Samples are read in order from the (already shuffled) training dataset: step n consumes the next
global_batch_size samples, whatever the layout, so the data a step sees depends only on the seed and the step.
Micro-batch i of a step is the samples [i * mbs * dp, (i + 1) * mbs * dp) of that global batch, and data-parallel
rank d takes the d-th run of mbs samples of it (Megatron's pretraining sampler).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from megagpt.config import Config
from megagpt.errors import DataError, UserError
from megagpt.log import get_logger
from megagpt.parallel.comm import all_gather, all_reduce
from megagpt.parallel.context import ParallelContext
from megagpt.parallel.data_parallel import GradBuckets
from megagpt.parallel.pipeline import PipelineExecutor
from megagpt.train.memory import MemoryReport, step_peak, tensor_bytes
from megagpt.train.metrics import MetricsWriter
from megagpt.train.optimizer import MainParamOptimizer
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
    memory: list[dict] = field(default_factory=list)  # after the first step: MemoryReport.as_dict() of each rank


@dataclass
class StepResult:
    loss: float  # the batch's mean loss
    grad_norm: float  # before clipping (inf or NaN on a skipped fp16 step)
    lr: float
    samples: int
    skipped: bool  # fp16 gradients overflowed: no update


class Trainer:
    def __init__(
        self,
        cfg: Config,
        ctx: ParallelContext,
        chunks: torch.nn.ModuleList,
        executor: PipelineExecutor,
        optimizer: MainParamOptimizer,
        grads: GradBuckets,
        train_data,
        valid_data,
        metrics: MetricsWriter | None,
        checkpointer=None,
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
        self.checkpointer = checkpointer  # train/checkpoint.py: saves, and stops the run on a signal
        self.scaler = optimizer.scaler  # fp16 only
        self.state = TrainState()

    def micro_batches(self, dataset, first_sample: int, num_samples: int) -> list[torch.Tensor]:
        """This dp rank's micro-batches of the samples [first_sample, first_sample + num_samples)."""
        micro, dp = self.cfg.train.micro_batch_size, self.ctx.dp_group.size
        batches = []
        for start in range(first_sample, first_sample + num_samples, micro * dp):
            tokens = read_batch(dataset, start + self.ctx.dp_group.index * micro, micro, self.cfg.model.vocab_size)
            batches.append(tokens.to(self.ctx.device, non_blocking=True))
        return batches

    def forward(self, chunk, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return chunk(x, labels)

    def mean_loss(self, losses: list[torch.Tensor], num_micro_batches: int) -> float:
        """The batch's mean loss on every rank: only the last pipeline stage has the per-micro-batch losses."""
        total = torch.stack(losses).sum() if losses else torch.zeros((), device=self.ctx.device)
        all_reduce(total, self.ctx.pp_group)
        all_reduce(total, self.ctx.dp_group)
        return total.item() / (num_micro_batches * self.ctx.dp_group.size)

    def compute_gradients(self, batch: int) -> tuple[float, object]:
        """Forward and backward of the next `batch` samples in the pipeline schedule's order, then the gradients
        finished across every group: dp-averaged, sequence-parallel and tied-embedding parts summed, in each
        parameter's `main_grad` (fp32; still multiplied by the fp16 loss scale).
        Returns (the batch's mean loss, the schedule's record)."""
        self.chunks.train()
        micro_batches = self.micro_batches(self.train_data, self.state.consumed_samples, batch)
        self.grads.start_step(len(micro_batches))
        # Each micro-batch's mean loss weighs 1 / num_micro_batches; the dp average happens in the reduction.
        loss_scale = self.scaler.scale if self.scaler is not None else 1.0
        record = self.executor.run(micro_batches, self.forward, backward=True, loss_scale=loss_scale)
        mean_loss = self.mean_loss(record.losses, len(micro_batches))
        # fp16 may overflow in the forward too; its gradients then overflow and the loss scaler skips the step.
        if not math.isfinite(mean_loss) and self.scaler is None:
            raise UserError(
                f"the training loss became {mean_loss} at step {self.state.step + 1}; lower optim.lr, keep "
                f"optim.clip_grad on, or use train.precision=fp32"
            )
        self.optimizer.finish_gradients()
        return mean_loss, record

    def train_step(self) -> StepResult:
        """One optimizer step (or, on an fp16 overflow, one skipped step)."""
        cfg = self.cfg
        batch = global_batch_size(self.state.consumed_samples, cfg.train)
        mean_loss, _ = self.compute_gradients(batch)
        lr = learning_rate(self.state.step, cfg.optim, cfg.train.iters)
        grad_norm, skipped = self.optimizer.step(lr)
        self.grads.zero()
        self.state.step += 1
        self.state.consumed_samples += batch
        if self.scaler is not None:
            self.scaler.update(skipped, step=self.state.step)  # raises after too many overflows in a row
        return StepResult(mean_loss, grad_norm, lr, batch, skipped)

    def measured_step(self) -> StepResult:
        """A train_step whose memory is measured: each rank's MemoryReport, gathered into state.memory and
        logged one line per pipeline stage (the ranks of one stage hold about the same)."""
        with step_peak(self.ctx.device) as peak:
            result = self.train_step()
        report = MemoryReport(
            params_bytes=tensor_bytes(self.chunks.parameters()),
            grads_bytes=tensor_bytes(bucket.buffer for bucket in self.grads.buckets),
            optimizer_bytes=self.optimizer.state_bytes(),
            peak_step_bytes=peak["peak_bytes"],
        )
        mine = torch.tensor(list(report.as_dict().values()), dtype=torch.float64, device=self.ctx.device)
        everyone = all_gather(mine.unsqueeze(0), 0, self.ctx.world_group).cpu()
        keys = list(report.as_dict())
        self.state.memory = [dict(zip(keys, map(int, row.tolist()))) for row in everyone]
        topology = self.ctx.topology
        for stage in range(topology.pp):
            rank = topology.rank(0, 0, stage)
            line = MemoryReport(**self.state.memory[rank]).line()
            get_logger().info(f"memory of rank {rank} (pipeline stage {stage}, after step 1): {line}")
        return result

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
        window_skipped = 0
        measure_memory = cfg.logging.memory_report  # the first step of this run only
        memory_in_row = False
        while self.state.step < cfg.train.iters:
            t0 = time.perf_counter()
            result = self.measured_step() if measure_memory else self.train_step()
            measure_memory = False
            window_time += time.perf_counter() - t0
            # A skipped fp16 step may have overflowed in the forward already; its loss says nothing.
            if not (result.skipped and not math.isfinite(result.loss)):
                window_losses.append(result.loss)
            window_skipped += result.skipped
            window_tokens += result.samples * tokens_per_sample
            step = self.state.step
            stop = self.checkpointer is not None and self.checkpointer.after_step(self)
            log_now = step % cfg.logging.log_interval == 0 or step == cfg.train.iters or stop
            eval_now = self.should_evaluate(step)
            if not (log_now or eval_now):
                continue
            row = {
                "step": step,
                # mean over the steps since the last row
                "loss": sum(window_losses) / len(window_losses) if window_losses else float("nan"),
                "lr": result.lr,
                "grad_norm": result.grad_norm,
                "tokens_per_s": window_tokens / window_time,
                "global_batch_size": result.samples,
                "consumed_samples": self.state.consumed_samples,
            }
            if self.scaler is not None:
                row["loss_scale"] = self.scaler.scale
                row["skipped_steps"] = window_skipped  # since the last row
                row["skipped_steps_total"] = self.scaler.total_skips
            if self.state.memory and not memory_in_row:  # the first row carries this rank's memory report
                row.update({f"memory_{key}": value for key, value in self.state.memory[self.ctx.rank].items()})
                memory_in_row = True
            if eval_now:
                val_loss = self.evaluate()
                row["val_loss"] = val_loss
                row["val_ppl"] = math.exp(min(val_loss, 50.0))
            row["elapsed_s"] = time.perf_counter() - start_time
            self.state.history.append(row)
            if self.metrics is not None:
                self.metrics.write(row)
            window_losses, window_tokens, window_time, window_skipped = [], 0, 0.0, 0
            if stop:
                return self.state
        if self.checkpointer is not None:
            self.checkpointer.at_end(self)
        return self.state
