"""The pipeline schedules, read as plain lists: complete, dependency-ordered, deadlock-free, within memory bounds."""

import itertools

import pytest

from megagpt.parallel.pipeline import (
    Action,
    max_alive_promised,
    predicted_bubble,
    schedule,
    schedule_steps,
    simulated_bubble,
    slower_schedule_warning,
    stage_layers,
    virtual_stage,
)

CASES = [
    (1, 1, 4),
    (2, 1, 1),
    (2, 1, 8),
    (3, 1, 6),
    (4, 1, 4),
    (4, 1, 9),
    (2, 2, 2),
    (2, 2, 4),
    (2, 2, 8),
    (4, 2, 4),
    (4, 2, 8),
    (3, 3, 6),
]


@pytest.mark.parametrize("layers, pp, vpp", [(4, 2, 1), (6, 3, 1), (8, 2, 2), (24, 4, 3), (4, 4, 1)])
def test_every_layer_is_in_exactly_one_chunk_in_order(layers, pp, vpp):
    held = {}
    for rank, chunk in itertools.product(range(pp), range(vpp)):
        for layer in stage_layers(layers, pp, vpp, rank, chunk):
            assert layer not in held
            held[layer] = virtual_stage(pp, rank, chunk)
    assert sorted(held) == list(range(layers))
    assert [held[layer] for layer in range(layers)] == sorted(held.values())  # stages run the layers in order


def alive_counts(actions):
    """Activations held after each action: from a forward to its backward, or to its W where the schedule splits
    the backward (B then needs its forward, W its B)."""
    split = any(action.kind == "W" for action in actions)
    alive, backed, counts = set(), set(), []
    for action in actions:
        key = (action.chunk, action.micro_batch)
        if action.kind == "F":
            alive.add(key)
        elif action.kind == "B":
            assert key in alive and key not in backed  # a backward needs its forward first
            backed.add(key)
            if not split:
                alive.remove(key)
        else:
            assert key in backed  # W needs its B
            alive.remove(key)
        counts.append(len(alive))
    return counts


@pytest.mark.parametrize("pp, vpp, m", CASES)
def test_each_rank_runs_every_forward_and_backward_once_within_the_memory_bound(pp, vpp, m):
    for rank in range(pp):
        actions = schedule(pp, vpp, rank, m)
        expected = {Action(kind, c, mb) for kind in "FB" for c in range(vpp) for mb in range(m)}
        assert sorted(actions, key=repr) == sorted(expected, key=repr)
        counts = alive_counts(actions)
        assert max(counts) <= max_alive_promised(pp, vpp, rank, m)
        assert counts[-1] == 0
    if vpp == 1 and m >= pp:
        # 1F1B's promise is tight: stage r holds pp - r micro-batches at its peak, the last stage only one.
        assert [max(alive_counts(schedule(pp, 1, r, m))) for r in range(pp)] == [pp - r for r in range(pp)]


def test_the_phases_read_as_warmup_steady_cooldown():
    assert [repr(a) for a in schedule(4, 1, 0, 6)] == [
        "F0.0",
        "F0.1",
        "F0.2",  # warm-up: pp - 1 forwards
        "F0.3",
        "B0.0",
        "F0.4",
        "B0.1",
        "F0.5",
        "B0.2",  # steady state: one forward, one backward
        "B0.3",
        "B0.4",
        "B0.5",  # cool-down
    ]
    assert [repr(a) for a in schedule(1, 1, 0, 3)] == ["F0.0", "B0.0", "F0.1", "B0.1", "F0.2", "B0.2"]
    # interleaved: micro-batches pass through chunk 0 in groups of pp, then chunk 1
    assert [repr(a) for a in schedule(2, 2, 0, 4)][:5] == ["F0.0", "F0.1", "F1.0", "F1.1", "F0.2"]


def simulate(pp, vpp, m, name="auto"):
    """Run all ranks' schedules with the executor's semantics (sends never block, receives wait for their
    message; W neither sends nor receives). Returns each channel's send order and receive order; fails on a
    deadlock."""
    last = pp * vpp - 1
    lists = [schedule(pp, vpp, r, m, name) for r in range(pp)]
    position = [0] * pp
    delivered = set()
    sent, received = {}, {}
    while any(position[r] < len(lists[r]) for r in range(pp)):
        progressed = False
        for r in range(pp):
            while position[r] < len(lists[r]):
                action = lists[r][position[r]]
                stage = virtual_stage(pp, r, action.chunk)
                need = None
                if action.kind == "F" and stage > 0:
                    need = ("F", stage, action.micro_batch)
                if action.kind == "B" and stage < last:
                    need = ("B", stage, action.micro_batch)
                if need and need not in delivered:
                    break
                if need:
                    src = (r - 1) % pp if need[0] == "F" else (r + 1) % pp
                    received.setdefault((src, r, need[0]), []).append(need)
                if action.kind == "F" and stage < last:
                    msg = ("F", stage + 1, action.micro_batch)
                    delivered.add(msg)
                    sent.setdefault((r, (r + 1) % pp, "F"), []).append(msg)
                if action.kind == "B" and stage > 0:
                    msg = ("B", stage - 1, action.micro_batch)
                    delivered.add(msg)
                    sent.setdefault((r, (r - 1) % pp, "B"), []).append(msg)
                position[r] += 1
                progressed = True
        assert progressed, f"deadlock at positions {position} for pp={pp} vpp={vpp} m={m}"
    return sent, received


@pytest.mark.parametrize("pp, vpp, m", CASES)
def test_schedules_never_deadlock_and_keep_each_channel_in_order(pp, vpp, m):
    sent, received = simulate(pp, vpp, m)
    assert sent.keys() == received.keys()
    for channel in sent:
        # Messages arrive in the order they were sent on every channel, as backends without tags require.
        assert sent[channel] == received[channel], channel


# ----------------------------------------------------------------------------------------------------------------
# Zero-bubble schedules (vpp = 1): F, B (input gradients) and W (weight gradients) of every micro-batch

ZB_CASES = [(2, 1), (2, 2), (2, 4), (2, 8), (3, 6), (4, 2), (4, 4), (4, 9), (8, 16)]


@pytest.mark.parametrize("name", ["zb-h1", "zb-h2"])
@pytest.mark.parametrize("pp, m", ZB_CASES)
def test_zero_bubble_schedules_run_everything_once_within_their_memory_bound(name, pp, m):
    peaks = []
    for rank in range(pp):
        actions = schedule(pp, 1, rank, m, name)
        expected = {Action(kind, 0, mb) for kind in "FBW" for mb in range(m)}
        assert len(actions) == len(expected) and set(actions) == expected
        counts = alive_counts(actions)
        assert counts[-1] == 0
        assert max(counts) <= max_alive_promised(pp, 1, rank, m, name)
        peaks.append(max(counts))
    # The promises are tight: ZB-H1 holds 1F1B's peak, pp, on every stage; ZB-H2 2 pp - 1 - r on stage r.
    assert peaks == [max_alive_promised(pp, 1, r, m, name) for r in range(pp)]
    if name == "zb-h1":
        assert max(peaks) == max(max_alive_promised(pp, 1, r, m, "1f1b") for r in range(pp))


def test_zero_bubble_phases_read_as_warmup_steady_cooldown():
    # ZB-H1, last of 4 stages: no warm-up; its W's lag 3 behind their B's and fill the cool-down.
    assert " ".join(map(repr, schedule(4, 1, 3, 6, "zb-h1"))) == (
        "F0.0 B0.0 F0.1 B0.1 F0.2 B0.2 F0.3 B0.3 W0.0 F0.4 B0.4 W0.1 F0.5 B0.5 W0.2 W0.3 W0.4 W0.5"
    )
    # First stage: 1F1B's warm-up, then each B's W right after it.
    assert " ".join(map(repr, schedule(4, 1, 0, 6, "zb-h1"))) == (
        "F0.0 F0.1 F0.2 F0.3 B0.0 W0.0 F0.4 B0.1 W0.1 F0.5 B0.2 W0.2 B0.3 W0.3 B0.4 W0.4 B0.5 W0.5"
    )
    # ZB-H2 runs 2 (pp - r - 1) forwards before the steady state.
    assert [repr(a) for a in schedule(4, 1, 0, 8, "zb-h2")][:8] == [f"F0.{m}" for m in range(7)] + ["B0.0"]
    # A W rides with the step before it: steps still start with one F or B each (the exchange rhythm of 1F1B).
    steps = schedule_steps(4, 1, 3, 6, "zb-h1")
    assert all(step[0].kind in "FB" and all(a.kind == "W" for a in step[1:]) for step in steps)
    assert [[repr(a) for a in step] for step in steps][7:9] == [["B0.3", "W0.0"], ["F0.4"]]


@pytest.mark.parametrize("name", ["zb-h1", "zb-h2"])
@pytest.mark.parametrize("pp, m", ZB_CASES)
def test_zero_bubble_schedules_never_deadlock_and_keep_each_channel_in_order(name, pp, m):
    sent, received = simulate(pp, 1, m, name)
    assert sent.keys() == received.keys()
    for channel in sent:
        assert sent[channel] == received[channel], channel


def idle_per_stage(pp, m, name, f, b, w):
    """Each stage's waiting in one step, at compute times f, b and w and free transfers (the step ends when the
    last stage does: the loss and gradient-norm reductions close every step). 1F1B's B is b + w."""
    lists = [schedule(pp, 1, r, m, name) for r in range(pp)]
    cost = {"F": f, "B": b if name.startswith("zb") else b + w, "W": w}
    end, clock, position = {}, [0.0] * pp, [0] * pp
    while any(position[r] < len(lists[r]) for r in range(pp)):
        for r in range(pp):
            while position[r] < len(lists[r]):
                a = lists[r][position[r]]
                need = ("F", r - 1, a.micro_batch) if a.kind == "F" and r > 0 else None
                need = ("B", r + 1, a.micro_batch) if a.kind == "B" and r < pp - 1 else need
                if need and need not in end:
                    break
                clock[r] = max(clock[r], end.get(need, 0.0)) + cost[a.kind]
                end[(a.kind, r, a.micro_batch)] = clock[r]
                position[r] += 1
    return [max(clock) - m * (f + b + w) for _ in range(pp)]


@pytest.mark.parametrize("pp, m", [(2, 4), (4, 8), (8, 16)])
def test_zero_bubble_h1_cuts_the_bubble_to_f_plus_b_minus_w_per_stage(pp, m):
    """Qi et al.'s numbers: 1F1B idles (pp - 1)(F + B + W) per step, ZB-H1 (pp - 1)(F + B - W), a third of it
    at equal times; ZB-H2 no more than ZB-H1 (within one synchronized step neither can beat (pp - 1) F)."""
    for f, b, w in [(1.0, 1.0, 1.0), (1.0, 1.5, 0.5), (1.7, 1.3, 1.0)]:  # the last: CPU-like, F > B > W
        assert idle_per_stage(pp, m, "1f1b", f, b, w) == pytest.approx([(pp - 1) * (f + b + w)] * pp)
        assert idle_per_stage(pp, m, "zb-h1", f, b, w) == pytest.approx([(pp - 1) * (f + b - w)] * pp)
        assert idle_per_stage(pp, m, "zb-h2", f, b, w) <= idle_per_stage(pp, m, "zb-h1", f, b, w)


@pytest.mark.parametrize("pp, m", [(2, 4), (2, 8), (4, 4), (4, 8), (8, 16)])
@pytest.mark.parametrize("f, b, w", [(1.0, 1.0, 1.0), (1.0, 1.5, 0.5), (1.7, 1.3, 1.0), (1.0, 1.0, 0.2), (0.5, 1, 1)])
def test_the_predicted_bubble_is_the_simulated_idle_at_any_pass_times(pp, m, f, b, w):
    """predicted_bubble (estimate.py, --dry-run, the bench next to its measurements) per unit of compute: with free
    transfers, exact for 1F1B and ZB-H1; ZB-H2's, the executor's rhythm, is never below it."""
    for name in ("1f1b", "zb-h1", "zb-h2"):
        simulated = idle_per_stage(pp, m, name, f, b, w)[0] / (m * (f + b + w))
        predicted = predicted_bubble(name, pp, 1, m, (f, b, w))
        if name == "zb-h2":
            assert simulated <= predicted + 1e-9, (name, simulated, predicted)
        else:
            assert predicted == pytest.approx(simulated), (name, simulated, predicted)


@pytest.mark.parametrize("pp, m", [(2, 2), (2, 4), (2, 8), (3, 6), (4, 4), (4, 8), (8, 16)])
def test_the_executor_rhythm_costs_1f1b_interleaved_and_zb_h1_nothing(pp, m):
    """simulated_bubble runs the executor's exchanges (one batch per step, waited for whole, a transfer only once
    both ends posted it): for 1F1B, interleaved and ZB-H1 its bubble is the closed form's at any pass times, so
    the rendezvous that NCCL's rules need costs them nothing. ZB-H2's warm-up forwards wait for their receives:
    its bubble is never below ZB-H1's, exceeds 1F1B's from m = 2 pp on and grows with m, which predicted_bubble
    reports and a warning names."""
    for times in [(1.0, 1.0, 1.0), (1.7, 1.3, 1.0), (0.5, 1.0, 1.0), (1.0, 1.0, 0.2)]:
        for name, vpp in [("1f1b", 1), ("zb-h1", 1), ("interleaved", 2), ("interleaved", 3)]:
            if name == "interleaved" and m % pp:
                continue
            assert simulated_bubble(name, pp, vpp, m, times) == pytest.approx(
                predicted_bubble(name, pp, vpp, m, times)
            ), (name, vpp, times)
        zb_h2 = simulated_bubble("zb-h2", pp, 1, m, times)
        assert zb_h2 == predicted_bubble("zb-h2", pp, 1, m, times)
        assert zb_h2 >= predicted_bubble("zb-h1", pp, 1, m, times) - 1e-12
        if m >= 2 * pp:  # past its warm-up, every step of the upstream stages waits
            assert zb_h2 > predicted_bubble("1f1b", pp, 1, m, times)
    assert simulated_bubble("zb-h2", pp, 1, 2 * m) > simulated_bubble("zb-h2", pp, 1, m)
    warning = slower_schedule_warning("zb-h2", pp, 1, m)
    if m >= 2 * pp:
        assert f"pp={pp} with {m} micro-batches" in warning and warning.endswith("use zb-h1")
    assert all(slower_schedule_warning(name, pp, 1, m) is None for name in ("1f1b", "zb-h1", "auto"))
    assert slower_schedule_warning("zb-h2", 1, 1, m) is None


def test_a_schedule_that_cannot_finish_is_named(monkeypatch):
    """The simulation fails with the layout where the ranks' exchanges never pair up (a schedule that receives a
    gradient its neighbour never sends)."""
    import megagpt.parallel.pipeline as pipeline

    real = pipeline.schedule_steps

    def broken(pp, vpp, pp_rank, m, name="auto"):
        steps = real(pp, vpp, pp_rank, m, name)
        return steps[:-1] if pp_rank == pp - 1 else steps  # the last stage never runs its last backward

    monkeypatch.setattr(pipeline, "schedule_steps", broken)
    with pytest.raises(RuntimeError, match="schedule 1f1b deadlocks at pp=2, vpp=1, m=4"):
        simulated_bubble("1f1b", 2, 1, 4)
