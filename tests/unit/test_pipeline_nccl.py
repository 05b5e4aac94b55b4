"""The pipeline executor's real sends, receives and waits, replayed under a model of NCCL's rules (nccl_model.py).

gloo matches by tag, returns a work per operation and buffers sends, so the gloo parity tests pass with
disciplines that crash or deadlock on NCCL. These tests run every rank's executor against NCCL's rules instead:
one work per batch, one p2p stream per rank, per-pair matching in posting order, rendezvous for large sends.
"""

import pytest

import megagpt.parallel.pipeline as pipeline
from tests.unit.nccl_model import NcclViolation, Op, Program, check_pipeline, record, replay


def micro_batch_counts(pp: int, vpp: int) -> list[int]:
    """Fewer micro-batches than stages, exactly as many, and more (interleaving needs multiples of pp)."""
    if vpp == 1:
        return sorted({1, pp // 2 + 1, pp, 2 * pp + 1})
    return [pp, 2 * pp, 3 * pp]


@pytest.mark.parametrize("pp", range(2, 17))
def test_every_schedule_completes_under_nccl_rules(pp):
    for vpp in range(1, 5):
        for m in micro_batch_counts(pp, vpp):
            for backward in (True, False):  # training and evaluation
                check_pipeline(pp, vpp, m, backward, one_work_per_batch=True)


@pytest.mark.parametrize("pp", range(2, 17))
def test_zero_bubble_schedules_complete_under_nccl_rules(pp):
    """A W rides with the step before it, inside that step's exchange: the pairing is 1F1B's."""
    for name in ("zb-h1", "zb-h2"):
        for m in micro_batch_counts(pp, 1):
            check_pipeline(pp, 1, m, backward=True, one_work_per_batch=True, schedule=name)
    check_pipeline(pp, 1, pp, backward=False, schedule="zb-h2")  # evaluation runs the forwards alone


@pytest.mark.parametrize("pp, vpp, m", [(2, 1, 5), (2, 2, 4), (4, 2, 8), (3, 4, 6)])
def test_every_schedule_completes_with_a_work_per_operation(pp, vpp, m):
    """gloo's handles (one per operation) are all waited for too."""
    for backward in (True, False):
        for program in check_pipeline(pp, vpp, m, backward, one_work_per_batch=False):
            ops = sum(len(group) for group in program.groups.values())
            assert program.waited == ops


def test_one_work_for_a_whole_batch_is_waited_once():
    """NCCL's batch_isend_irecv returns one work for the batch; the executor waits for it, whatever it pairs
    (the executor before this test unpacked `(work,) = ...` and crashed on the first paired send)."""
    program = record(pp=2, vpp=1, pp_rank=0, num_micro_batches=4, backward=True, one_work_per_batch=True)
    paired = [g for g in program.groups.values() if {op.kind for op in g} == {"send", "recv"}]
    assert paired, "the schedule pairs a send with a receive in one batch"
    assert program.waited == program.handed_out == len(program.groups)
    # each batch is waited for before the next is posted: the next step needs what it received
    kinds = [kind for kind, _ in program.events]
    assert kinds == ["post", "wait"] * len(program.groups)


# ----------------------------------------------------------------------------------------------------------------
# Mutation checks: the model must reject the disciplines that fail on NCCL.


def test_the_old_rhythm_of_one_exchange_per_action_deadlocks(monkeypatch):
    """The executor before the fix paired each send with the next action's receive. Under NCCL's rules that
    deadlocks the interleaved schedule; the model must say so."""
    steps = pipeline.schedule_steps
    monkeypatch.setattr(pipeline, "schedule_steps", lambda *a: [[action] for step in steps(*a) for action in step])
    for pp, vpp in [(2, 2), (4, 2), (3, 3), (8, 2)]:
        with pytest.raises(NcclViolation, match="deadlock"):
            check_pipeline(pp, vpp, 2 * pp, backward=True)


def test_receives_in_another_order_than_the_sends_deliver_the_wrong_tensor(monkeypatch):
    """With pp=2 activations and gradients share a pair of ranks; NCCL ignores tags, so both ends must list the
    transfers in one order."""
    exchange = pipeline.step_exchange

    def reversed_receives(*args):
        sends, recvs = exchange(*args)
        return sends, recvs[::-1]

    monkeypatch.setattr(pipeline, "step_exchange", reversed_receives)
    with pytest.raises(NcclViolation, match="wrong tensor"):
        check_pipeline(2, 2, 4, backward=True)


# ----------------------------------------------------------------------------------------------------------------
# The model itself


def program(rank, *batches):
    """A hand-written program: each batch (list of (kind, peer, tag)) is posted, then waited for."""
    p = Program(rank)
    for i, batch in enumerate(batches):
        group = (rank, i)
        p.groups[group] = [Op(rank, peer, kind, tag, 8, group) for kind, peer, tag in batch]
        p.events += [("post", group), ("wait", group)]
        p.handed_out += 1
        p.waited += 1
    return p


def test_model_two_ranks_sending_first_deadlock_without_buffering():
    # Each rank sends, waits for the send, then receives: fine on gloo (it buffers), a deadlock on NCCL.
    a = program(0, [("send", 1, 0)], [("recv", 1, 1)])
    b = program(1, [("send", 0, 1)], [("recv", 0, 0)])
    with pytest.raises(NcclViolation, match="deadlock"):
        replay([a, b])
    # Batched together each rank's send and receive meet.
    replay([program(0, [("send", 1, 0), ("recv", 1, 1)]), program(1, [("send", 0, 1), ("recv", 0, 0)])])


def test_model_matches_by_order_not_tag():
    a = program(0, [("send", 1, 0), ("send", 1, 1)])
    b = program(1, [("recv", 0, 1), ("recv", 0, 0)])  # gloo would match these by tag
    with pytest.raises(NcclViolation, match="wrong tensor"):
        replay([a, b])


def test_model_finds_unmatched_operations_and_unwaited_works():
    with pytest.raises(NcclViolation, match="has no receive"):
        replay([program(0, [("send", 1, 0)]), program(1)])
    with pytest.raises(NcclViolation, match="has no send"):
        replay([program(0), program(1, [("recv", 0, 0)])])
    lazy = program(0, [("send", 1, 0)])
    lazy.waited = 0
    with pytest.raises(NcclViolation, match="never waited"):
        replay([lazy, program(1, [("recv", 0, 0)])])


def test_model_runs_a_ranks_batches_in_posting_order():
    # Rank 0 posts a batch to rank 2 before one to rank 1 and waits for the second: the second cannot run before
    # the first, which needs rank 2, which waits for rank 1, which waits for rank 0's second batch.
    a = Program(0)
    a.groups = {(0, 0): [Op(0, 2, "send", 0, 8, (0, 0))], (0, 1): [Op(0, 1, "send", 1, 8, (0, 1))]}
    a.events = [("post", (0, 0)), ("post", (0, 1)), ("wait", (0, 1)), ("wait", (0, 0))]
    a.handed_out = a.waited = 2
    b = program(1, [("recv", 0, 1)], [("send", 2, 2)])
    c = program(2, [("recv", 1, 2)], [("recv", 0, 0)])
    with pytest.raises(NcclViolation, match="deadlock"):
        replay([a, b, c])
