"""Weights & Biases, offline (no network here): a run with logging.wandb_project writes a W&B run folder holding
the resolved config and every row's scalars; W&B is never required (config validation names the pip command)."""

from __future__ import annotations

import importlib.util
import struct
import sys
import time
from pathlib import Path

import pytest

from megagpt.config import ConfigError, validate
from megagpt.errors import UserError
from megagpt.parallel.context import ParallelContext
from megagpt.train.run import pretrain
from megagpt.train.wandb_writer import WandbWriter
from tests.conftest import tiny_config


def read_wandb_records(path):
    """The protobuf records of a run's .wandb file: W&B's 7-byte header, then LevelDB's log format (32 KiB blocks
    of chunks, each with a 7-byte header: crc32, length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's trailer too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # a chunk still being written
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def finished_records(path, timeout: float = 60.0):
    """The run's records once they end in its exit record: wandb-core, a process of its own, may still be writing
    the file when run.finish() has returned."""
    deadline = time.monotonic() + timeout
    while True:
        records = read_wandb_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def item_key(item) -> str:
    return item.key or ".".join(item.nested_key)


def test_an_offline_run_writes_the_config_and_the_rows_scalars(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    cfg = tiny_config(
        "train.iters=2", "logging.log_interval=1", "train.eval_iters=0", "logging.tensorboard=false",
        "logging.memory_report=false", f"logging.dir={run_dir}", "logging.wandb_project=megagpt-test",
        "logging.wandb_run_name=tiny", "logging.wandb_mode=offline", "model.num_layers=2", "model.vocab_size=1024",
        "train.global_batch_size=2", "train.micro_batch_size=2",
    )  # fmt: skip
    state = pretrain(cfg, ParallelContext.single_process())
    (folder,) = (run_dir / "wandb").glob("offline-run-*")
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    (wandb_file,) = folder.glob(f"run-{run_id}.wandb")
    records = finished_records(wandb_file)

    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.project, run.display_name) == ("megagpt-test", "tiny")
    config = {item_key(i): i.value_json for i in run.config.update}
    assert '"vocab_size":1024' in config["model"].replace(" ", "") and '"iters":2' in config["train"].replace(" ", "")

    history = [
        {item_key(i): i.value_json for i in r.history.item} for r in records if r.WhichOneof("record_type") == "history"
    ]
    assert [int(h["_step"]) for h in history] == [1, 2]
    for logged, row in zip(history, state.history):
        for key in ("loss", "lr", "grad_norm", "mfu", "hfu", "step_time_ms", "tflops_per_device", "consumed_tokens"):
            assert float(logged[key]) == pytest.approx(row[key]), key
        assert "peak_source" not in logged  # strings stay in metrics.jsonl

    # A resumed run continues the same W&B run (its id is kept in logging.dir).
    resumed = WandbWriter(cfg, run_dir, resume=True)
    assert resumed.run.id == run_id
    resumed.close()


def test_wandb_keys_are_validated_and_a_missing_wandb_is_one_sentence(monkeypatch):
    with pytest.raises(ConfigError, match="logging.peak_tflops=0.0 must be a positive TFLOP/s"):
        validate(tiny_config("logging.peak_tflops=0"))
    with pytest.raises(ConfigError, match="logging.wandb_run_name is set without logging.wandb_project"):
        validate(tiny_config("logging.wandb_run_name=x"))
    with pytest.raises(ConfigError, match="logging.wandb_mode=offline is set without logging.wandb_project"):
        validate(tiny_config("logging.wandb_mode=offline"))
    with pytest.raises(ConfigError, match="config key 'logging.wandb_mode' got 'sometimes'"):
        tiny_config("logging.wandb_mode=sometimes")
    validate(tiny_config("logging.wandb_project=", "logging.peak_tflops=312"))  # an empty project is off

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"logging.wandb_project=p needs Weights & Biases, which is not installed; "
                       r"run pip install 'megagpt\[wandb\]'"):  # fmt: skip
        validate(tiny_config("logging.wandb_project=p"))
    monkeypatch.setitem(sys.modules, "wandb", None)  # and at startup, for a config that skipped validation
    with pytest.raises(UserError, match=r"needs Weights & Biases, which is not installed; run pip install"):
        WandbWriter(tiny_config("logging.wandb_project=p"), Path("unused"))
