"""A step's micro-batches, read only on the pipeline stages that use them, the next one prefetched.

Only the first pipeline stage embeds tokens and only the last one computes the loss against the next tokens
(Megatron loads data only there too): a rank holding the first stage reads the inputs, a rank holding the last one
the labels, a rank holding neither (a middle stage) reads nothing and needs only the number of micro-batches.

Handing out micro-batch m starts reading m + 1, so the dataset read and the copy to the device overlap the
computation the GPU has queued (nanoGPT's prefetch). On CUDA the samples go through pinned host memory and are
copied with non_blocking=True; on the CPU the read is plain.

Sampling (Megatron's pretraining sampler): micro-batch i of a span of samples is its samples
[i * mbs * dp, (i + 1) * mbs * dp), and data-parallel rank d takes the d-th run of mbs samples of it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from megagpt.errors import DataError


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


class MicroBatch(NamedTuple):
    """What the pipeline's end stages take from one micro-batch (see PipelineExecutor.run)."""

    inputs: torch.Tensor | None  # (mbs, s) token ids: on the rank holding the first stage, else None
    labels: torch.Tensor | None  # (mbs, s) the next token of each: on the rank holding the last stage, else None

    @classmethod
    def of(cls, tokens: torch.Tensor) -> MicroBatch:
        """Both parts of (mbs, s + 1) samples: inputs are tokens 0 .. s-1, labels tokens 1 .. s."""
        return cls(tokens[:, :-1], tokens[:, 1:])


class MicroBatches:
    """This data-parallel rank's micro-batches of the samples [first_sample, first_sample + num_samples), as the
    sequence the pipeline executor indexes: len() is the number of micro-batches; [m] reads micro-batch m (if not
    prefetched yet), keeps it, and prefetches m + 1. `inputs` and `labels` say which parts this rank's stages use;
    with neither, nothing is ever read."""

    def __init__(
        self,
        dataset,
        first_sample: int,
        num_samples: int,
        micro_batch_size: int,
        dp_index: int,
        dp_size: int,
        vocab_size: int,
        device: torch.device,
        *,
        inputs: bool = True,
        labels: bool = True,
    ):
        self.dataset = dataset
        span = micro_batch_size * dp_size
        self.starts = [s + dp_index * micro_batch_size for s in range(first_sample, first_sample + num_samples, span)]
        self.micro_batch_size = micro_batch_size
        self.vocab_size = vocab_size
        self.device = device
        self.inputs, self.labels = inputs, labels
        self._ready: dict[int, MicroBatch] = {}

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, m: int) -> MicroBatch:
        if not 0 <= m < len(self):
            raise IndexError(f"micro-batch {m} of {len(self)}")
        if m not in self._ready:
            self._ready[m] = self._read(m)  # kept: a rank holding both end stages asks twice (a V-shaped schedule)
        if m + 1 < len(self) and m + 1 not in self._ready:
            self._ready[m + 1] = self._read(m + 1)
        # Stages take their micro-batches in order, so the ones before m - 1 are done with: let them go, or a long
        # evaluation would keep every batch it read on the device.
        for done in [k for k in self._ready if k < m - 1]:
            del self._ready[done]
        return self._ready[m]

    def _read(self, m: int) -> MicroBatch:
        if not (self.inputs or self.labels):
            return MicroBatch(None, None)  # a middle stage: its tensors arrive from its neighbours
        tokens = read_batch(self.dataset, self.starts[m], self.micro_batch_size, self.vocab_size)  # (mbs, s + 1)
        if self.device.type == "cuda":
            # Pinned memory lets the copy run asynchronously to the host; the caching host allocator keeps the
            # pinned buffer alive until the copy has finished.
            tokens = tokens.pin_memory().to(self.device, non_blocking=True)
        else:
            tokens = tokens.to(self.device)
        inputs, labels = MicroBatch.of(tokens)
        return MicroBatch(inputs if self.inputs else None, labels if self.labels else None)
