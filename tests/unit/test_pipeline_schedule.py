"""The pipeline schedules, read as plain lists: complete, dependency-ordered, deadlock-free, within memory bounds."""

import itertools

import pytest

from megagpt.parallel.pipeline import Action, max_alive_promised, schedule, stage_layers, virtual_stage

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
    alive, counts = set(), []
    for action in actions:
        key = (action.chunk, action.micro_batch)
        if action.kind == "F":
            alive.add(key)
        else:
            alive.remove(key)  # a backward needs its forward first
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


def simulate(pp, vpp, m):
    """Run all ranks' schedules with the executor's semantics (sends never block, receives wait for their
    message). Returns each channel's send order and receive order; fails on a deadlock."""
    last = pp * vpp - 1
    lists = [schedule(pp, vpp, r, m) for r in range(pp)]
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
