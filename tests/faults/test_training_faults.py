"""Training under faults: a non-finite step stops the run naming the step;
an incomplete checkpoint is removed and the one before it resumed (ending
with the weights of an uninterrupted run); a full or read-only disk is
reported as such; missing and corrupt models are named."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from inject import assert_nothing_at, assert_refused, call, copy_model, small_filesystem
from safetensors.torch import load_file
from transformers import Trainer

from lightning_opd import generate, lightning_opd, sft

SIX_STEPS = {"max_steps": 6, "batch_size": 4, "save_steps": 2, "logging_steps": 1, "learning_rate": 1e-3,
             "lr_scheduler_type": "cosine", "warmup_ratio": 0.0}


def sft_argv(world, out: Path, ckpt: Path, **train):
    return ["--base", world["student_base"], "--sft-data", world["root"] / "sft_data-A.parquet", "--keep-unfinished",
            "--out", out, "--checkpoint-root", ckpt, "--train", json.dumps({**SIX_STEPS, **train})]


def test_non_finite_step_stops_training_and_names_it(world, tmp_path):
    out = tmp_path / "sft"
    outcome = call(sft.main, sft_argv(world, out, tmp_path / "ckpt", learning_rate=1e30, max_grad_norm=1e30,
                                      lr_scheduler_type="constant"))
    assert_refused(outcome, "NonFiniteTrainingError", "training step ", "learning rate")
    assert_nothing_at(out)
    assert call(sft.main, sft_argv(world, out, tmp_path / "ckpt")).returncode == 0
    assert all(torch.isfinite(t).all() for t in load_file(out / "model.safetensors").values())


@pytest.fixture(scope="module")
def uninterrupted(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    assert call(sft.main, sft_argv(world, root / "sft", root / "ckpt")).returncode == 0
    return load_file(root / "sft" / "model.safetensors")


class Crash(Exception):
    pass


def crash_after_step(monkeypatch, step: int) -> None:
    """The run dies (as after a kill) once ``step`` optimiser steps and their checkpoint are done."""
    original = Trainer.training_step

    def training_step(self, *args, **kwargs):
        if self.state.global_step >= step:
            raise Crash(f"crash after step {step}")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", training_step)


LOSSES = {"weights": "model.safetensors", "optimizer state": "optimizer.pt", "scheduler state": "scheduler.pt",
          "rng_state.pth": "rng_state.pth", "trainer_state.json": "trainer_state.json"}


@pytest.mark.parametrize("lost", LOSSES)
def test_incomplete_checkpoint_is_removed_and_the_previous_one_resumed(world, tmp_path, monkeypatch, uninterrupted,
                                                                       lost):
    out, ckpt = tmp_path / "sft", tmp_path / "ckpt"
    with monkeypatch.context() as patch:
        crash_after_step(patch, 4)
        assert "Crash" in call(sft.main, sft_argv(world, out, ckpt)).output
    [run_dir] = ckpt.iterdir()
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    (run_dir / "checkpoint-4" / LOSSES[lost]).unlink()

    import contextlib
    import io
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert call(sft.main, sft_argv(world, out, ckpt)).returncode == 0
    text = printed.getvalue()
    assert f"removing incomplete checkpoint {run_dir / 'checkpoint-4'} (missing {lost})" in text, text
    assert f"resuming from {run_dir / 'checkpoint-2'}" in text, text
    resumed = load_file(out / "model.safetensors")
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-4, atol=1e-5)


def test_disk_full_while_checkpointing_is_reported(world, tmp_path):
    out = tmp_path / "sft"
    with small_filesystem(tmp_path / "full", "256k") as full:
        outcome = call(sft.main, sft_argv(world, out, full / "ckpt"))
        assert_refused(outcome, str(full / "ckpt"), "No space left on device", "free space")
    assert_nothing_at(out)
    assert call(sft.main, sft_argv(world, out, tmp_path / "ckpt")).returncode == 0


def test_disk_full_while_writing_an_artifact_leaves_nothing(world, tmp_path):
    argv = ["--model", world["teacher_A"], "--prompts", world["data"] / "sft.parquet", "--label", "A",
            "--sampling", json.dumps({"max_new_tokens": 8, "batch_size": 16})]
    with small_filesystem(tmp_path / "full", "4k") as full:
        out = full / "samples.parquet"
        # the file that could not be written: a shard in the stage's work directory beside the output
        assert_refused(call(generate.main, [*argv, "--out", out]), f"{full}/.samples.parquet.shards/",
                       "No space left on device")
        assert_nothing_at(out)
    out = tmp_path / "samples.parquet"
    assert call(generate.main, [*argv, "--out", out]).returncode == 0 and out.is_file()


@pytest.mark.parametrize("where", ["model directory", "checkpoint root"])
def test_read_only_output_is_refused_before_training(world, tmp_path, monkeypatch, where):
    argv = ["--init", world["sft_A"], "--cache", world["cache_A"], "--drift-n", 0,
            "--opd", json.dumps({"max_steps": 2, "batch_size": 4, "save_steps": 100})]
    out, ckpt = tmp_path / "lopd", tmp_path / "ckpt"
    with small_filesystem(tmp_path / "ro", "1m", read_only=True) as ro, monkeypatch.context() as patch:
        def train(self, *args, **kwargs):
            raise AssertionError("training started although its output cannot be written")

        patch.setattr(Trainer, "train", train)
        unwritable = ro / "lopd" if where == "model directory" else ro / "ckpt"
        out_argv = ["--out", unwritable, "--checkpoint-root", ckpt] if where == "model directory" else \
            ["--out", out, "--checkpoint-root", unwritable]
        outcome = call(lightning_opd.main, [*argv, *out_argv])
        assert_refused(outcome, f"{unwritable}: cannot write (Read-only file system)", "make it writable")
        assert not unwritable.exists()
    assert_nothing_at(out)
    assert call(lightning_opd.main, [*argv, "--out", out, "--checkpoint-root", ckpt]).returncode == 0
    assert (out / "model.safetensors").is_file()


def test_non_finite_logged_loss_says_the_steps_were_applied(tmp_path):
    from types import SimpleNamespace

    from lightning_opd.training import FiniteGuard, NonFiniteTrainingError

    guard = FiniteGuard()
    guard.on_log(SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(global_step=7), None, logs={"loss": 2.5})
    with pytest.raises(NonFiniteTrainingError) as refused:
        guard.on_log(SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(global_step=8), None,
                     logs={"loss": float("nan")})
    message = str(refused.value)
    assert "training step 8: non-finite loss nan" in message and "those steps were applied" in message, message
    assert "before applying" not in message, message
    assert f"delete {tmp_path} to start the training over" in message, message


# how a config may name a local model directory that is not there (run from tmp_path/work, where models/ exists)
MISSING_MODEL = {
    "absolute": lambda work: str(work / "models" / "teacher-Z"),
    "relative-under-an-existing-directory": lambda work: "models/teacher-Z",
    "dot-slash": lambda work: "./teacher-Z",
    "dot-dot-slash": lambda work: "../work/models/teacher-Z",
}


@pytest.mark.parametrize("form", MISSING_MODEL)
def test_missing_local_model_directory_is_reported_at_once(world, tmp_path, monkeypatch, form):
    work = tmp_path / "work"
    (work / "models").mkdir(parents=True)
    monkeypatch.chdir(work)
    missing = MISSING_MODEL[form](work)
    out = tmp_path / "samples.parquet"
    argv = ["--prompts", world["data"] / "opd.parquet", "--out", out, "--sampling", json.dumps({"max_new_tokens": 4})]
    started = time.monotonic()
    outcome = call(generate.main, ["--model", missing, *argv])
    assert time.monotonic() - started < 10, "a local path must not be tried as a hub id"
    assert_refused(outcome, f"{missing}: no such model directory", "`path:`")
    assert_nothing_at(out)
    copy_model(world["teacher_A"], work / missing)
    assert call(generate.main, ["--model", missing, *argv]).returncode == 0


def test_corrupt_weights_file_is_named(world, tmp_path):
    model = copy_model(world["teacher_A"], tmp_path / "teacher-A")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated, e.g. an interrupted copy
    out = tmp_path / "samples.parquet"
    argv = ["--model", model, "--prompts", world["data"] / "opd.parquet", "--out", out,
            "--sampling", json.dumps({"max_new_tokens": 4})]
    assert_refused(call(generate.main, argv), str(model), "model.safetensors", "corrupt")
    assert_nothing_at(out)
    shutil.copy(world["teacher_A"] / "model.safetensors", weights)
    assert call(generate.main, argv).returncode == 0


def test_damaged_provenance_json_is_named(world, tmp_path):
    model = copy_model(world["sft_A"], tmp_path / "sft-A")
    (model / "provenance.json").write_text('{"sft_teacher": ')
    out = tmp_path / "lopd"
    argv = ["--init", model, "--cache", world["cache_A"], "--out", out, "--checkpoint-root", tmp_path / "ckpt",
            "--opd", json.dumps({"max_steps": 2, "batch_size": 4, "save_steps": 100}), "--drift-n", 0]
    assert_refused(call(lightning_opd.main, argv), str(model / "provenance.json"), "not valid JSON")
    assert_nothing_at(out)
    shutil.copy(world["sft_A"] / "provenance.json", model / "provenance.json")
    assert call(lightning_opd.main, argv).returncode == 0
