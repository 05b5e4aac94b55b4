import pytest

from megagpt.train.loss_scaler import LossScaler, TrainingDiverged


def run(scaler: LossScaler, overflows: str) -> list[float]:
    """Feed a pattern of steps ('x' overflow, '.' fine); return the scale after each."""
    scales = []
    for step, mark in enumerate(overflows, 1):
        scaler.update(mark == "x", step)
        scales.append(scaler.scale)
    return scales


def test_hysteresis_tolerates_overflows_before_backing_off():
    scaler = LossScaler(2.0**16, hysteresis=2, growth_interval=1000)
    # The first overflow only skips; the second lowers; once hysteresis is used up every overflow lowers.
    assert run(scaler, "xxx") == [2.0**16, 2.0**15, 2.0**14]
    assert scaler.total_skips == 3 and scaler.consecutive_skips == 3
    # A good step resets the run of skips but not the hysteresis: the next overflow lowers at once.
    assert run(scaler, ".x") == [2.0**14, 2.0**13]
    assert scaler.consecutive_skips == 1


def test_growth_after_a_window_without_overflow_refills_hysteresis():
    scaler = LossScaler(8.0, hysteresis=2, growth_interval=3)
    assert run(scaler, "xx") == [8.0, 4.0]
    assert run(scaler, "...") == [4.0, 4.0, 8.0]
    # Hysteresis is back to 2: one overflow is tolerated again; and it restarts the growth count.
    assert run(scaler, "x..") == [8.0, 8.0, 8.0]
    assert run(scaler, ".") == [16.0]


def test_backoff_factor_and_minimum():
    scaler = LossScaler(16.0, hysteresis=1, backoff=0.25, min_scale=2.0)
    assert run(scaler, "xxx") == [4.0, 2.0, 2.0]


def test_static_scale_never_changes_but_still_counts_skips():
    scaler = LossScaler(128.0, dynamic=False, growth_interval=1)
    assert run(scaler, "x..x") == [128.0] * 4
    assert scaler.total_skips == 2


def test_training_stops_after_too_many_skips_in_a_row():
    scaler = LossScaler(4.0, hysteresis=1, max_consecutive_skips=4)
    run(scaler, "xxx.xxx")  # a good step in between resets the count
    with pytest.raises(TrainingDiverged, match="overflowed in 4 steps in a row \\(the last at step 8\\)"):
        scaler.update(True, 8)


def test_state_round_trips():
    scaler = LossScaler(64.0, growth_interval=2)
    run(scaler, "x.")
    other = LossScaler(1.0, growth_interval=2)  # settings come from the config, the state from the checkpoint
    other.load_state_dict(scaler.state_dict())
    assert run(other, ".xx") == run(scaler, ".xx")
