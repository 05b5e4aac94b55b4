import math
import random

import pytest

from megagpt.batch_rampup import batch_size_at, samples_after, steps_to_consume
from megagpt.config import OptimConfig, TrainConfig
from megagpt.train.schedules import global_batch_size, learning_rate, total_train_samples


def test_warmup_then_cosine_then_floor():
    optim = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_iters=10, decay_iters=110)
    lrs = [learning_rate(step, optim, train_iters=200) for step in range(200)]
    assert lrs[0] == pytest.approx(1e-4)  # 1 / 10 of the peak: the first step already moves
    assert lrs[4] == pytest.approx(5e-4)
    assert lrs[9] == pytest.approx(1e-3)  # the last warm-up step is at the peak, once
    assert lrs[10] == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi * 0.01)) * 9e-4)
    assert lrs[10] < lrs[9]
    assert lrs[59] == pytest.approx((1e-3 + 1e-4) / 2)  # half way: cos(pi/2) = 0
    assert lrs[34] == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi * 0.25)) * 9e-4)
    assert lrs[109] == pytest.approx(1e-4) and lrs[199] == pytest.approx(1e-4)  # step D - 1 reaches the floor
    assert all(a > b for a, b in zip(lrs[9:109], lrs[10:110]))  # strictly falling through the decay


def test_decay_iters_defaults_to_train_iters_and_the_last_step_is_at_min_lr():
    optim = OptimConfig(lr=1.0, min_lr=0.1, warmup_iters=0, decay_iters=None)
    assert learning_rate(49, optim, train_iters=100) == pytest.approx(0.55)
    assert learning_rate(99, optim, train_iters=100) == pytest.approx(0.1)


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


def brute_force_samples(steps, global_batch, rampup):
    consumed = 0
    for _ in range(steps):
        consumed += batch_size_at(consumed, global_batch, rampup)
    return consumed


def test_closed_form_ramp_planning_matches_stepping_through_it():
    rng = random.Random(0)
    for _ in range(200):
        start = rng.choice([1, 2, 4, 16])
        increment = rng.choice([1, 2, 4, 16])
        global_batch = start + increment * rng.randint(0, 12)
        rampup = [start, increment, rng.randint(0, 5000)]
        steps = rng.randint(0, 400)
        consumed = brute_force_samples(steps, global_batch, rampup)
        assert samples_after(steps, global_batch, rampup) == consumed
        target = rng.randint(1, 20000)
        needed = steps_to_consume(target, global_batch, rampup)
        assert brute_force_samples(needed, global_batch, rampup) >= target
        assert needed == 0 or brute_force_samples(needed - 1, global_batch, rampup) < target


def test_no_rampup_is_constant():
    train = TrainConfig(global_batch_size=32, iters=7)
    assert global_batch_size(10**9, train) == 32
    assert total_train_samples(train) == 224
    assert steps_to_consume(225, 32, None) == 8
