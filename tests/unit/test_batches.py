"""Micro-batches are read only on the pipeline stages that use them, and the prefetched ones equal a plain read."""

from __future__ import annotations

import datetime

import pytest
import torch

from megagpt.data.batches import MicroBatch, MicroBatches, read_batch
from megagpt.data.gpt_dataset import SyntheticDataset
from megagpt.parallel.pipeline import PipelineExecutor
from tests.unit.nccl_model import Program, _fake_forward, recording_post

SEQ, VOCAB, MICRO, DP_SIZE, DP_INDEX = 3, 50, 2, 2, 1


class CountingDataset:
    """A dataset that records which samples were read, in order."""

    def __init__(self, num_samples: int = 64):
        self.data = SyntheticDataset(num_samples, SEQ, VOCAB, seed=3)
        self.reads: list[int] = []

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> torch.Tensor:
        self.reads.append(i)
        return self.data[i]


def run_rank(pp: int, vpp: int, pp_rank: int, num_micro_batches: int, backward: bool = True):
    """Run one rank's schedule over a CountingDataset (communication recorded, not sent, as in nccl_model);
    returns (the dataset, the executor, the (inputs, labels) each forward was given)."""
    program = Program(pp_rank)
    executor = PipelineExecutor(
        [torch.nn.Parameter(torch.tensor(1.0)) for _ in range(vpp)],
        pp_rank,
        tuple(range(pp)),
        (MICRO, SEQ, 2),
        torch.device("cpu"),
        datetime.timedelta(seconds=1),
        post=recording_post(program, one_work_per_batch=True),
    )
    dataset = CountingDataset()
    batches = MicroBatches(
        dataset,
        8,
        num_micro_batches * MICRO * DP_SIZE,
        MICRO,
        DP_INDEX,
        DP_SIZE,
        VOCAB,
        torch.device("cpu"),
        inputs=executor.needs_inputs,
        labels=executor.needs_labels,
    )
    given = []

    def forward(chunk, x, labels):
        given.append((None if x.is_floating_point() else x, labels))
        return _fake_forward(chunk, x, labels)

    executor.run(batches, forward, backward=backward)
    return dataset, executor, given


def expected_samples(num_micro_batches: int, first_sample: int = 8) -> list[int]:
    """This dp rank's samples, micro-batch after micro-batch (Megatron's sampler)."""
    span = MICRO * DP_SIZE
    return [first_sample + m * span + DP_INDEX * MICRO + i for m in range(num_micro_batches) for i in range(MICRO)]


@pytest.mark.parametrize("pp, vpp", [(3, 1), (2, 2), (4, 1), (1, 1)])
@pytest.mark.parametrize("backward", [True, False])
def test_only_the_end_stages_read_and_each_sample_once(pp, vpp, backward):
    num = 4
    for pp_rank in range(pp):
        dataset, executor, given = run_rank(pp, vpp, pp_rank, num, backward)
        first, last = pp_rank == 0, pp_rank == pp - 1
        assert (executor.needs_inputs, executor.needs_labels) == (first, last)
        if first or last:
            assert dataset.reads == expected_samples(num), (pp_rank, dataset.reads)
        else:
            assert dataset.reads == [], f"middle stage {pp_rank} read samples {dataset.reads}"
        # The end stages got the right tokens: inputs on the first, the next tokens as labels on the last.
        samples = torch.stack([dataset.data[i] for i in expected_samples(num)]).view(num, MICRO, SEQ + 1)
        inputs = [x for x, _ in given if x is not None]
        labels = [y for _, y in given if y is not None]
        assert len(inputs) == (num if first else 0) and len(labels) == (num if last else 0)
        for m, x in enumerate(inputs):
            assert torch.equal(x, samples[m, :, :-1])
        for m, y in enumerate(labels):
            assert torch.equal(y, samples[m, :, 1:])


def test_prefetched_micro_batches_equal_plain_reads():
    dataset = CountingDataset()
    batches = MicroBatches(dataset, 0, 6 * MICRO * DP_SIZE, MICRO, DP_INDEX, DP_SIZE, VOCAB, torch.device("cpu"))
    assert len(batches) == 6
    for m in range(len(batches)):
        got = batches[m]
        # Handing out m has already read m + 1 (the prefetch), and nothing beyond it.
        read_up_to = min(m + 1, len(batches) - 1)
        assert dataset.reads == expected_samples(read_up_to + 1, first_sample=0)
        plain = MicroBatch.of(read_batch(dataset.data, m * MICRO * DP_SIZE + DP_INDEX * MICRO, MICRO, VOCAB))
        assert torch.equal(got.inputs, plain.inputs) and torch.equal(got.labels, plain.labels)
        assert batches[m] is got  # asked again (a rank holding both end stages): the same, not read again
        assert sorted(batches._ready) == [k for k in (m - 1, m, m + 1) if 0 <= k < len(batches)]  # older ones freed
    assert len(dataset.reads) == len(set(dataset.reads)) == 6 * MICRO
    with pytest.raises(IndexError):
        batches[6]


def test_a_micro_batch_holds_only_the_parts_its_stage_uses():
    dataset = CountingDataset()
    only_inputs = MicroBatches(dataset, 0, 8, MICRO, 0, 1, VOCAB, torch.device("cpu"), labels=False)[0]
    only_labels = MicroBatches(dataset, 0, 8, MICRO, 0, 1, VOCAB, torch.device("cpu"), inputs=False)[0]
    assert only_inputs.labels is None and only_labels.inputs is None
    assert torch.equal(only_inputs.inputs[:, 1:], only_labels.labels[:, :-1])  # the same samples, shifted by one


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: pinned memory and non-blocking copies")
def test_on_cuda_micro_batches_arrive_through_pinned_memory_and_equal_plain_reads():
    dataset = CountingDataset()
    cuda = MicroBatches(dataset, 0, 16, MICRO, 0, 1, VOCAB, torch.device("cuda"))
    for m in range(len(cuda)):
        plain = MicroBatch.of(read_batch(dataset.data, m * MICRO, MICRO, VOCAB))
        got = cuda[m]
        assert got.inputs.device.type == "cuda"
        assert torch.equal(got.inputs.cpu(), plain.inputs) and torch.equal(got.labels.cpu(), plain.labels)
