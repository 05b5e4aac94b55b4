"""Reading samples into a batch of token ids, checked against the model's vocabulary: what training, evaluation and
inference feed the model."""

from __future__ import annotations

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
