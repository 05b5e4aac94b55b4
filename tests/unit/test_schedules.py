import math

import pytest

from megagpt.config import OptimConfig, TrainConfig
from megagpt.train.schedules import global_batch_size, learning_rate, total_train_samples


def test_warmup_then_cosine_then_floor():
    optim = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_iters=10, decay_iters=110)
    lrs = [learning_rate(step, optim, train_iters=200) for step in range(200)]
    assert lrs[0] == pytest.approx(1e-4)  # (0 + 1) / 10 of the peak
    assert lrs[4] == pytest.approx(5e-4)
    assert lrs[9] == pytest.approx(1e-3)  # warm-up ends at the peak
    assert lrs[10] == pytest.approx(1e-3)  # decay starts from the peak
    assert lrs[60] == pytest.approx((1e-3 + 1e-4) / 2)  # half way: cos(pi/2) = 0
    assert lrs[35] == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi * 0.25)) * 9e-4)
    assert lrs[110] == pytest.approx(1e-4) and lrs[199] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # never rises after warm-up


def test_decay_iters_defaults_to_train_iters():
    optim = OptimConfig(lr=1.0, min_lr=0.0, warmup_iters=0, decay_iters=None)
    assert learning_rate(50, optim, train_iters=100) == pytest.approx(0.5)
    assert learning_rate(100, optim, train_iters=100) == 0.0


def test_batch_rampup_follows_megatron_rule():
    # start 16, +16, over 480 samples: (64 - 16) / 16 = 3 increments, one every 160 samples
    train = TrainConfig(global_batch_size=64, micro_batch_size=1, batch_rampup=[16, 16, 480], iters=20)
    sizes, consumed = [], 0
    for _ in range(20):
        size = global_batch_size(consumed, train)
        sizes.append(size)
        consumed += size
    assert sizes[:10] == [16] * 10  # 10 * 16 = 160 samples at 16
    assert sizes[10:15] == [32] * 5  # 5 * 32 = 160 more
    assert sizes[15] == 48 and sizes[-1] == 64
    assert total_train_samples(train) == consumed


def test_no_rampup_is_constant():
    train = TrainConfig(global_batch_size=32, iters=7)
    assert global_batch_size(10**9, train) == 32
    assert total_train_samples(train) == 224
