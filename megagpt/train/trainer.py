"""The training loop: gradient accumulation over micro-batches, clipping, AdamW, LR schedule, evaluation, logs.

A step: the pipeline schedule runs forward and backward over the step's micro-batches (the loss multiplied by the
fp16 loss scale), the optimizer finishes the gradients across groups and updates its fp32 main weights (or skips
the step on an fp16 overflow, everywhere alike), the gradient buffers are zeroed. After the first step each rank
reports its memory (train/memory.py).

Samples are read in order from the (already shuffled) training dataset: step n consumes the next
global_batch_size samples, whatever the layout, so the data a step sees depends only on the seed and the step.
Micro-batch i of a step is the samples [i * mbs * dp, (i + 1) * mbs * dp) of that global batch, and data-parallel
rank d takes the d-th run of mbs samples of it (Megatron's pretraining sampler). Only the ranks holding the first
or last pipeline stage read them, the next micro-batch prefetched (data/batches.py).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from megagpt.config import Config
from megagpt.data.batches import MicroBatches
from megagpt.errors import UserError
from megagpt.log import get_logger
from megagpt.parallel.comm import all_gather, all_reduce
from megagpt.parallel.context import ParallelContext
from megagpt.parallel.data_parallel import GradBuckets
from megagpt.parallel.pipeline import PipelineExecutor
from megagpt.train.memory import MemoryReport, step_peak
from megagpt.train.metrics import MetricsWriter, StepPerformance, memory_fields
from megagpt.train.optimizer import MainParamOptimizer
from megagpt.train.peaks import device_peak
from megagpt.train.profiler import StepProfiler
from megagpt.train.schedules import global_batch_size, learning_rate


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    consumed_samples: int = 0
    history: list[dict] = field(default_factory=list)  # the logged rows, also returned to callers and tests
    memory: list[dict] = field(default_factory=list)  # after the first step: MemoryReport.as_dict() of each rank

    def state_dict(self) -> dict:
        """The training position a checkpoint restores: steps taken and samples read (the data position)."""
        return {"step": self.step, "consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.consumed_samples = int(state["consumed_samples"])


@dataclass
class StepResult:
    """One optimizer step, kept on the device: reading loss or grad_norm waits for the GPU, so the trainer
    reads them once per logged row (reduce_losses), not every step."""

    loss: torch.Tensor  # this rank's share of the batch's mean loss: the sum over pp and dp ranks is the mean
    grad_norm: torch.Tensor  # before clipping (inf or NaN on a skipped fp16 step)
    lr: float
    samples: int
    skipped: bool  # fp16 gradients overflowed: no update


class Trainer:
    """Runs training on one rank: steps (train_step), evaluation, logged rows, checkpoints, until train.iters.

    It is handed the pieces pretrain.py assembles: this rank's model `chunks`, the pipeline `executor` that runs
    a step's forwards and backwards over them in schedule order, the `buckets` (GradBuckets) that reduce gradients
    across data-parallel ranks during backward, the `optimizer` (fp32 main weights, clipping, the fp16 loss
    scaler), the datasets, the `metrics` writer (logging rank only) and an optional `checkpointer`. Its `state`
    (step, consumed samples, logged rows) is what checkpoints save and what train() returns.
    """

    def __init__(
        self,
        cfg: Config,
        ctx: ParallelContext,
        chunks: torch.nn.ModuleList,
        executor: PipelineExecutor,
        optimizer: MainParamOptimizer,
        buckets: GradBuckets,
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
        self.buckets = buckets  # gradient buffers of the data-parallel reduction
        self.train_data = train_data
        self.valid_data = valid_data
        self.metrics = metrics
        self.checkpointer = checkpointer  # train/run_control.py: saves, and stops the run on a signal
        self.scaler = optimizer.scaler  # fp16 only
        self.state = TrainState()
        self.profiler = StepProfiler(cfg.logging, ctx.rank, ctx.device)

    def micro_batches(self, dataset, first_sample: int, num_samples: int) -> MicroBatches:
        """This dp rank's micro-batches of the samples [first_sample, first_sample + num_samples), read where this
        rank's pipeline stages use them (tokens on the first stage, labels on the last, nothing in between)."""
        return MicroBatches(
            dataset,
            first_sample,
            num_samples,
            self.cfg.train.micro_batch_size,
            self.ctx.dp_group.index,
            self.ctx.dp_group.size,
            self.cfg.model.vocab_size,
            self.ctx.device,
            inputs=self.executor.needs_inputs,
            labels=self.executor.needs_labels,
        )

    def forward(self, chunk, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return chunk(x, labels)

    def local_loss(self, losses: list[torch.Tensor], num_micro_batches: int) -> torch.Tensor:
        """This rank's share of the batch's mean loss, on the device: only the last pipeline stage holds the
        per-micro-batch losses, and the mean is over every dp rank's micro-batches."""
        total = torch.stack(losses).sum() if losses else torch.zeros((), device=self.ctx.device)
        return total.float() / (num_micro_batches * self.ctx.dp_group.size)

    def reduce_losses(self, local_losses: list[torch.Tensor]) -> list[float]:
        """The batch mean losses of several steps, on every rank: one all-reduce per group and one host sync."""
        total = torch.stack(local_losses)
        all_reduce(total, self.ctx.pp_group)
        all_reduce(total, self.ctx.dp_group)
        return total.tolist()

    def mean_loss(self, losses: list[torch.Tensor], num_micro_batches: int) -> float:
        return self.reduce_losses([self.local_loss(losses, num_micro_batches)])[0]

    def forward_backward(self, batch: int) -> tuple[torch.Tensor, object]:
        """Forward and backward of the next `batch` samples in the pipeline schedule's order, then the gradients
        finished across every group: dp-averaged, sequence-parallel and tied-embedding parts summed, in each
        parameter's `main_grad` (fp32; still multiplied by the fp16 loss scale). No host sync.
        Returns (this rank's share of the batch's mean loss, on the device; the schedule's record)."""
        self.chunks.train()
        micro_batches = self.micro_batches(self.train_data, self.state.consumed_samples, batch)
        self.buckets.start_step(len(micro_batches))
        # Each micro-batch's mean loss weighs 1 / num_micro_batches; the dp average happens in the reduction.
        loss_scale = self.scaler.scale if self.scaler is not None else 1.0
        record = self.executor.run(micro_batches, self.forward, backward=True, loss_scale=loss_scale)
        self.optimizer.finish_gradients()
        return self.local_loss(record.losses, len(micro_batches)), record

    def compute_gradients(self, batch: int) -> tuple[float, object]:
        """forward_backward, with the batch's mean loss read on every rank (a host sync: tests and benches)."""
        local, record = self.forward_backward(batch)
        return self.reduce_losses([local])[0], record

    def train_step(self) -> StepResult:
        """optimizer_step, under torch.profiler when it is one of the steps logging.profile asks for."""
        with self.profiler.step(self.state.step + 1):
            return self.optimizer_step()

    def optimizer_step(self) -> StepResult:
        """One optimizer step (or, on an fp16 overflow, one skipped step)."""
        cfg = self.cfg
        batch = global_batch_size(self.state.consumed_samples, cfg.train)
        loss, _ = self.forward_backward(batch)
        lr = learning_rate(self.state.step, cfg.optim, cfg.train.iters)
        grad_norm, skipped = self.optimizer.step(lr)
        self.buckets.zero()
        self.state.step += 1
        self.state.consumed_samples += batch
        if self.scaler is not None:
            self.scaler.update(skipped, step=self.state.step)  # raises after too many overflows in a row
        return StepResult(loss, grad_norm, lr, batch, skipped)

    def window_loss(self, results: list[StepResult], last_step: int) -> float:
        """The mean loss of the steps since the last logged row. A skipped fp16 step may have overflowed in the
        forward already, so its loss says nothing; any other non-finite loss ends the run (checked here, on
        logging steps, so that steps in between need no host sync)."""
        losses = self.reduce_losses([r.loss for r in results])
        first_step = last_step - len(results) + 1
        for step, (loss, result) in enumerate(zip(losses, results), first_step):
            if not math.isfinite(loss) and not result.skipped and self.scaler is None:
                raise UserError(
                    f"the training loss became {loss} at step {step}; lower optim.lr, keep optim.clip_grad on, "
                    f"or use train.precision=fp32"
                )
        kept = [loss for loss, r in zip(losses, results) if not (r.skipped and not math.isfinite(loss))]
        return sum(kept) / len(kept) if kept else float("nan")

    def measured_step(self) -> StepResult:
        """A train_step whose memory is measured: each rank's MemoryReport, gathered into state.memory and
        logged one line per pipeline stage (the ranks of one stage hold about the same)."""
        self.buckets.transient.reset_peak()
        with step_peak(self.ctx.device) as peak:
            result = self.train_step()
        params_bytes, grads_bytes = self.buckets.stored_bytes()  # zero 2 and 3 keep slices of them
        if self.ctx.device.type != "cuda":  # storage resizes (zero 2, 3) escape the CPU tracker: add their peak
            peak["peak_bytes"] += self.buckets.transient.peak
        report = MemoryReport(
            params_bytes=params_bytes,
            grads_bytes=grads_bytes,
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
        """Train to train.iters. Between logged rows the steps run without host syncs (fp16's overflow check
        aside): losses and the gradient norm stay on the device and are read once per row."""
        cfg = self.cfg
        tokens_per_sample = cfg.model.seq_length
        performance = StepPerformance(cfg, self.ctx.topology.world_size, device_peak(cfg, self.ctx.device))
        start_time = time.perf_counter()
        window: list[StepResult] = []
        window_time = 0.0
        measure_memory = cfg.logging.memory_report  # the first step of this run only
        memory_in_row = False
        while self.state.step < cfg.train.iters:
            t0 = time.perf_counter()
            result = self.measured_step() if measure_memory else self.train_step()
            measure_memory = False
            window.append(result)
            step = self.state.step
            due = step % cfg.logging.log_interval == 0 or step == cfg.train.iters
            eval_now = self.should_evaluate(step)
            loss = None
            if due or eval_now:
                loss = self.window_loss(window, step)  # waits for the GPU: the window's time includes its work
            window_time += time.perf_counter() - t0

            def checked_loss(window=window, step=step) -> float:
                """The window's loss, read now if not yet: also before any save, so that a non-finite loss ends
                the run before its weights could become a checkpoint (and `latest`)."""
                nonlocal loss
                if loss is None:
                    loss = self.window_loss(window, step)
                return loss

            stop = self.checkpointer is not None and self.checkpointer.after_step(self, before_save=checked_loss)
            if not (due or eval_now or stop):
                continue
            loss = checked_loss()
            row = {
                "step": step,
                "loss": loss,  # mean over the steps since the last row
                "lr": result.lr,
                "grad_norm": result.grad_norm.item(),
                **performance.fields(sum(r.samples for r in window), len(window), window_time),
                **memory_fields(self.ctx.device),
                "global_batch_size": result.samples,
                "consumed_samples": self.state.consumed_samples,
                "consumed_tokens": self.state.consumed_samples * tokens_per_sample,
            }
            if self.scaler is not None:
                row["loss_scale"] = self.scaler.scale
                row["skipped_steps"] = sum(r.skipped for r in window)  # since the last row
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
            window, window_time = [], 0.0
            if stop:
                self.profiler.close(step)
                return self.state
        if self.checkpointer is not None:
            self.checkpointer.at_end(self)
        return self.state
