"""Checkpoints across processes (megagpt/checkpoint/, CPU, gloo):

- resume is exact: at (tp, pp, dp) = (2, 2, 2) with ZeRO-1 and dropout, the steps after a resume compute bit for bit
  what an uninterrupted run computes (and at (1, 1, 1), in tests/unit/test_checkpoint.py);
- resharding: checkpoints saved at (2,2,1), (1,1,1) and (2,1,2) with ZeRO-1 load into (1,1,1), (2,2,1) and (1,2,2),
  and offline through tools/reshard.py, and training goes on with the losses an unsharded run has;
- a rank killed during a save leaves `latest` and the previous checkpoint whole, and the run resumes from it,
  also when its background writer is killed (checkpoint.async_save); with async_save, a writer that fails on one
  rank is raised on every rank at the next step boundary, naming the rank and its file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from tests.distributed.harness import DIED, run_world
from tests.distributed.test_pipeline_parallel import pipeline_config

RESUME_AT, STEPS = 3, 6


def checkpoint_config(tp, pp, run_dir, *extra, steps=STEPS):
    # decay_iters fixed: a run stopped at step 3 follows the same LR schedule as the 6-step run it is compared to
    return pipeline_config(
        tp,
        pp,
        1,
        False,
        4,
        str(run_dir),
        f"train.iters={steps}",
        f"optim.decay_iters={STEPS}",
        "train.eval_iters=0",
        *extra,
    )


def losses(state) -> list[float]:
    return [row["loss"] for row in state.history]


def train(rank, tp, pp, dp, run_dir, *extra, steps=STEPS):
    from megagpt.parallel.context import ParallelContext
    from megagpt.parallel.topology import Topology
    from megagpt.train.run import pretrain

    ctx = ParallelContext.initialize(Topology(tp, dp, pp), rank, torch.device("cpu"))
    return losses(pretrain(checkpoint_config(tp, pp, run_dir, *extra, steps=steps), ctx))


def single(run_dir, *extra, steps=STEPS):
    from megagpt.parallel.context import ParallelContext
    from megagpt.train.run import pretrain

    return losses(pretrain(checkpoint_config(1, 1, run_dir, *extra, steps=steps), ParallelContext.single_process()))


def exact_resume_world(rank, world_size, root):
    """(2,2,2), ZeRO-1, dropout: an uninterrupted run saving at step 3, then a run resumed from that checkpoint
    that saves every step asynchronously (checkpoint.async_save), then a run resumed from its step-4 save."""
    root = Path(root)
    extra = ["parallel.zero=1", "model.dropout=0.1"]
    whole = train(
        rank, 2, 2, 2, root / "whole", *extra, f"checkpoint.save_interval={RESUME_AT}", f"checkpoint.dir={root / 'ck'}"
    )
    resumed = train(
        rank,
        2,
        2,
        2,
        root / "resumed",
        *extra,
        f"checkpoint.load={root / 'ck' / 'step_00000003'}",
        f"checkpoint.dir={root / 'ck_resumed'}",
        "checkpoint.async_save=true",
        "checkpoint.save_interval=1",
        "checkpoint.keep=3",
    )
    from_async = train(
        rank,
        2,
        2,
        2,
        root / "from_async",
        *extra,
        f"checkpoint.load={root / 'ck_resumed' / 'step_00000004'}",
        f"checkpoint.dir={root / 'ck_from_async'}",
    )
    return whole, resumed, from_async


def test_resume_at_tp2_pp2_dp2_with_zero1_is_bit_exact_from_sync_and_async_saves(tmp_path):
    from megagpt.checkpoint.paths import complete_checkpoints

    results = run_world(8, exact_resume_world, str(tmp_path))
    whole, resumed, from_async = results[0]
    assert len(whole) == STEPS and len(resumed) == STEPS - RESUME_AT and len(from_async) == STEPS - RESUME_AT - 1
    assert resumed == whole[RESUME_AT:]  # exactly, not approximately
    assert from_async == whole[RESUME_AT + 1 :]
    # The async run published every save, the last at the end of training, and kept the newest 3.
    assert [p.name for p in complete_checkpoints(tmp_path / "ck_resumed")] == [f"step_0000000{n}" for n in (4, 5, 6)]
    assert (tmp_path / "ck_resumed" / "latest").read_text().strip() == "step_00000006"


@pytest.fixture(scope="module")
def unsharded(tmp_path_factory):
    """One process, no dropout: the loss curve every resharded continuation must follow, and its step-3 save."""
    root = tmp_path_factory.mktemp("unsharded")
    curve = single(root / "run", f"checkpoint.dir={root / 'ck'}", f"checkpoint.save_interval={RESUME_AT}")
    return curve, root / "ck" / "step_00000003"


def reshard_world(rank, world_size, root, unsharded_checkpoint):
    """In one 4-rank world: save at (2,2,1) and at (2,1,2) with ZeRO-1; continue from the unsharded checkpoint
    at (2,2,1), and from the (2,1,2) one at (1,2,2)."""
    root = Path(root)
    saved_221 = train(rank, 2, 2, 1, root / "a", f"checkpoint.dir={root / 'ck_221'}", steps=RESUME_AT)
    from_111 = train(
        rank, 2, 2, 1, root / "b", f"checkpoint.load={unsharded_checkpoint}", f"checkpoint.dir={root / 'ck_b'}"
    )
    saved_212 = train(
        rank, 2, 1, 2, root / "c", "parallel.zero=1", f"checkpoint.dir={root / 'ck_212z1'}", steps=RESUME_AT
    )
    from_212 = train(
        rank, 1, 2, 2, root / "d", f"checkpoint.load={root / 'ck_212z1'}", f"checkpoint.dir={root / 'ck_d'}"
    )
    return {"saved_221": saved_221, "from_111": from_111, "saved_212": saved_212, "from_212": from_212}


def test_checkpoints_reshard_across_layouts_and_training_continues_as_unsharded(unsharded, tmp_path):
    from megagpt.checkpoint.reader import SavedCheckpoint
    from megagpt.checkpoint.reshard import reshard_checkpoint

    curve, unsharded_checkpoint = unsharded
    result = run_world(4, reshard_world, str(tmp_path), str(unsharded_checkpoint))[0]
    rel = dict(rel=1e-5)
    assert result["saved_221"] == pytest.approx(curve[:RESUME_AT], **rel)  # the saved runs are the unsharded run
    assert result["saved_212"] == pytest.approx(curve[:RESUME_AT], **rel)
    assert result["from_111"] == pytest.approx(curve[RESUME_AT:], **rel)  # (1,1,1) -> (2,2,1)
    assert result["from_212"] == pytest.approx(curve[RESUME_AT:], **rel)  # (2,1,2) zero=1 -> (1,2,2)
    # Each tensor is written once: the tied embedding by the first stage's two tp ranks, not the last stage's too.
    meta = SavedCheckpoint(tmp_path / "ck_221" / "step_00000003").meta
    assert sorted(f for kind, name, f, _ in meta.index if (kind, name) == ("weight", "wte.weight")) == [
        "rank_00000.pt",
        "rank_00001.pt",
    ]
    # (2,2,1) -> (1,1,1): on load, and offline with tools/reshard.py.
    on_load = single(tmp_path / "e", f"checkpoint.load={tmp_path / 'ck_221'}", f"checkpoint.dir={tmp_path / 'ck_e'}")
    assert on_load == pytest.approx(curve[RESUME_AT:], **rel)
    offline = reshard_checkpoint(tmp_path / "ck_221" / "step_00000003", tmp_path / "offline", tp=1, pp=1)
    from_offline = single(tmp_path / "f", f"checkpoint.load={offline}", f"checkpoint.dir={tmp_path / 'ck_f'}")
    assert from_offline == on_load  # the same tensors either way


def killed_during_save_world(rank, world_size, root, async_save):
    """dp=2, saving every 2 steps; rank 1 is killed (kill -9) halfway through writing the step-4 checkpoint (with
    async_save: by its background writer, while the training thread goes on)."""
    import signal
    import time

    import megagpt.checkpoint.save as checkpoint_save

    write = checkpoint_save.write_rank_file

    def write_then_die(payload, path):
        if rank == 1 and path.parent.name.startswith("step_00000004"):
            with open(path.with_name(path.name + ".partial"), "wb") as f:
                f.write(b"half a file")
                f.flush()
                time.sleep(0.5)  # a slow write: the kill lands in its middle
            os.kill(os.getpid(), signal.SIGKILL)
        return write(payload, path)

    checkpoint_save.write_rank_file = write_then_die
    try:
        train(
            rank,
            1,
            1,
            2,
            Path(root) / "run",
            f"checkpoint.dir={Path(root) / 'ck'}",
            "checkpoint.save_interval=2",
            "parallel.timeout_s=20",
            f"checkpoint.async_save={async_save}",
            steps=4,
        )
    except Exception as e:  # rank 0 sees its peer vanish inside the save
        return f"failed: {type(e).__name__}"
    return "finished"


@pytest.mark.parametrize("async_save", [False, True])
def test_a_rank_killed_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path, async_save):
    from megagpt.checkpoint.paths import latest_checkpoint
    from megagpt.checkpoint.reader import SavedCheckpoint

    outcome = run_world(2, killed_during_save_world, str(tmp_path), async_save, allow_deaths=True)
    assert outcome[1] == DIED and outcome[0].startswith("failed")
    ck = tmp_path / "ck"
    assert (ck / "latest").read_text().strip() == "step_00000002"
    (left,) = ck.glob("step_00000004.tmp-*")  # named after the run's rank 0 (host-pid): no other run shares it
    assert left.is_dir() and not (ck / "step_00000004").exists()
    assert latest_checkpoint(ck, required=True) == ck / "step_00000002"
    assert SavedCheckpoint(ck / "step_00000002").step == 2
    # Resuming (here in one process: dp 2 -> 1) trains steps 3 and 4 and saves step 4 over the broken attempt.
    resumed = single(tmp_path / "again", f"checkpoint.dir={ck}", "checkpoint.load=auto", steps=4)
    assert len(resumed) == 2
    assert (ck / "latest").read_text().strip() == "step_00000004" and not left.exists()  # cleared under the lock


def corrupt_file_world(rank, world_size, root):
    """dp=2: rank 1's own file (its random states) is corrupt, so only rank 1 fails to load; both must raise."""
    from megagpt.checkpoint.format import CheckpointError

    try:
        train(
            rank,
            1,
            1,
            2,
            Path(root) / "again",
            f"checkpoint.load={Path(root) / 'ck'}",
            f"checkpoint.dir={Path(root) / 'ck2'}",
            steps=4,
        )
    except CheckpointError as e:
        return str(e)
    return "loaded"


def test_a_rank_that_cannot_load_makes_every_rank_raise(tmp_path):
    run_world(2, train_and_save_world, str(tmp_path))
    rank1 = tmp_path / "ck" / "step_00000002" / "rank_00001.pt"
    data = bytearray(rank1.read_bytes())
    data[-100] ^= 0xFF
    rank1.write_bytes(bytes(data))
    messages = run_world(2, corrupt_file_world, str(tmp_path), timeout=120)
    assert "rank_00001.pt fails its sha256 check" in messages[1]
    assert "another rank could not load checkpoint" in messages[0]


def train_and_save_world(rank, world_size, root):
    train(rank, 1, 1, 2, Path(root) / "run", f"checkpoint.dir={Path(root) / 'ck'}", steps=2)


def failing_writer_world(rank, world_size, root):
    """dp=2, async saves every 2 steps: rank 1's writer finds its file's place taken by a folder (an OSError even
    as root, where chmod stops nothing), after the save has started and training has gone on."""
    import megagpt.checkpoint.save as checkpoint_save
    from megagpt.checkpoint.format import CheckpointError

    write = checkpoint_save.write_rank_file

    def write_into_a_folder(payload, path):
        if rank == 1 and path.parent.name.startswith("step_00000002"):
            path.with_name(path.name + ".partial").mkdir()
        return write(payload, path)

    checkpoint_save.write_rank_file = write_into_a_folder
    root = Path(root)
    try:
        train(rank, 1, 1, 2, root / "run", f"checkpoint.dir={root / 'ck'}", "checkpoint.save_interval=2",
              "checkpoint.async_save=true", steps=4)  # fmt: skip
    except CheckpointError as e:
        return str(e)
    return "finished"


def test_a_failing_async_writer_is_raised_on_every_rank(tmp_path):
    messages = run_world(2, failing_writer_world, str(tmp_path), timeout=300)
    ck = tmp_path / "ck"
    # One sentence on every rank. The free space it reports is each rank's own reading of the disk, taken a moment
    # apart, so it may differ in the last digit while other processes write (CI saw 73.6 against 73.7 GiB).
    same = [re.sub(r"[0-9.]+ GiB are free there", "N GiB are free there", m) for m in messages]
    assert same[0] == same[1] and all("GiB are free there" in m for m in messages)
    tmp = Path(messages[0].split("Is a directory: ")[1].split(";")[0]).parent  # step_00000002.tmp-HOST-PID
    failed = f"could not be saved (rank 1 could not write its file: Is a directory: {tmp / 'rank_00001.pt'}; "
    assert f"checkpoint {ck / 'step_00000002'} {failed}" in messages[0]
    assert "no earlier checkpoint exists there" in messages[0]
    assert tmp.name.startswith("step_00000002.tmp-") and not tmp.exists()  # the partial files were removed
    assert not (ck / "latest").exists() and not (ck / "step_00000002").exists()
