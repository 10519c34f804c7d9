"""Experiment tracking: a real short training reports to TensorBoard, and to
W&B in offline mode (no network), through the trainers' `--tracking`."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from lightning_opd import sft

STEPS = 3
TRACKER_ENV = ("TENSORBOARD_LOGGING_DIR", "WANDB_DIR", "WANDB_PROJECT", "MLFLOW_EXPERIMENT_NAME", "WANDB_MODE")


@pytest.fixture
def clean_env(monkeypatch):
    """The trainer sets the trackers' environment variables; put them back afterwards."""
    for name in TRACKER_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def train_sft(world, tmp_path: Path, tracking: dict) -> None:
    sft.main(["--base", str(world["student_base"]), "--sft-data", str(world["root"] / "sft_data-A.parquet"),
              "--train", json.dumps({"max_steps": STEPS, "batch_size": 4, "save_steps": 100, "logging_steps": 1}),
              "--keep-unfinished", "--out", str(tmp_path / "model"), "--checkpoint-root", str(tmp_path / "ckpt"),
              "--tracking", json.dumps(tracking)])


def test_tensorboard_event_files_hold_the_training_loss(world, tmp_path, clean_env):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir = tmp_path / "tracking/sft/sft-A"
    train_sft(world, tmp_path, {"report_to": ["tensorboard"], "run_name": "test/sft-A", "log_dir": str(log_dir)})
    assert list(log_dir.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(log_dir))
    events.Reload()
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == list(range(1, STEPS + 1))
    assert all(e.value > 0 for e in losses)
    log = [json.loads(line) for line in (tmp_path / "model/train_log.jsonl").read_text().splitlines()]
    logged = {entry["step"]: entry["loss"] for entry in log if "loss" in entry}
    assert [e.value for e in losses] == pytest.approx([logged[e.step] for e in losses], rel=1e-6)


def wandb_records(path: Path):
    """The records of a W&B transaction log (``run-*.wandb``): LevelDB's log
    format (32 KiB blocks of records with a 7-byte header) after W&B's own
    7-byte file header, each record a ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B transaction log"
    position, block, pending = 7, 32 * 1024, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:  # zero padding
            position += block - position % block
            continue
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last fragment of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_run_holds_the_history(world, tmp_path, clean_env):
    import wandb

    clean_env.setenv("WANDB_MODE", "offline")
    log_dir = tmp_path / "tracking/sft/sft-A"
    train_sft(world, tmp_path, {"report_to": ["wandb"], "project": "lopd-test", "run_name": "test/sft-A",
                                "log_dir": str(log_dir)})
    wandb.teardown()  # what the end of the trainer's process does: finish the run, flush and stop W&B's service
    runs = list((log_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, list(log_dir.rglob("*"))
    records = list(wandb_records(runs[0]))
    assert records[-1].WhichOneof("record_type") == "exit"
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.project, run.display_name) == ("lopd-test", "test/sft-A")
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    losses = [(row["train/global_step"], row["train/loss"]) for row in history if "train/loss" in row]
    assert [step for step, _ in losses] == list(range(1, STEPS + 1))
    assert all(loss > 0 for _, loss in losses)
