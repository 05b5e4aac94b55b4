import pytest

from tests.distributed.harness import run_world


def sum_of_ranks(rank, world_size):
    import torch
    import torch.distributed as dist

    x = torch.tensor([float(rank)])
    dist.all_reduce(x)
    return x.item()


def fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("boom on purpose")
    return rank


def test_harness_collects_results_and_names_failing_ranks():
    assert run_world(2, sum_of_ranks) == [1.0, 1.0]
    with pytest.raises(AssertionError, match=r"rank 1 of a world of 2 failed:(.|\n)*boom on purpose"):
        run_world(2, fail_on_rank_one)


def assert_on_rank_one(rank, world_size):
    assert rank != 1, f"rank {rank} saw a loss of 7.5, wanted 2.5"


def test_a_failed_worker_assertion_reaches_pytest_with_its_message_and_rank():
    with pytest.raises(AssertionError) as failure:
        run_world(2, assert_on_rank_one)
    summary = str(failure.value).splitlines()[0]  # what pytest's one-line summary shows
    assert summary == "rank 1 of a world of 2 failed: AssertionError: rank 1 saw a loss of 7.5, wanted 2.5", summary
    assert "assert_on_rank_one" in str(failure.value)  # and the worker's traceback follows
