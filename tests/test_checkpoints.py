"""Which checkpoint a rerun resumes from: the newest complete one. One that a kill cut short while it was
written is removed and the one before it is used; one written by another number of processes (a preempted
job rerun on fewer or more GPUs) is complete as its completion record says, not removed. A change of the code
gives the partial work another name."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lightning_opd import training
from lightning_opd.provenance import PACKAGE, code_digest
from lightning_opd.training import (
    CHECKPOINT_COMPLETE,
    CheckpointLayoutError,
    checkpoint_dir,
    last_complete_checkpoint,
)


def checkpoint(root: Path, step: int, rng_files: list[str], writers: int | None = None, fsdp: bool = False) -> Path:
    """A checkpoint with weights, optimiser, scheduler and trainer state, the given RNG files and, given
    ``writers``, the completion record of that many processes (under FSDP or not)."""
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", *rng_files):
        (path / name).write_bytes(b"\0")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": 100}))
    if writers is not None:
        (path / CHECKPOINT_COMPLETE).write_text(json.dumps({"processes": writers, "fsdp": fsdp}))
    return path


TWO = ["rng_state_0.pth", "rng_state_1.pth"]


def test_a_checkpoint_of_two_processes_resumes_on_one_or_on_four(tmp_path, capsys):
    checkpoint(tmp_path, 20, TWO, writers=2)
    newest = checkpoint(tmp_path, 40, TWO, writers=2)
    assert last_complete_checkpoint(tmp_path, processes=1, fsdp=False) == str(newest)
    assert "written by 2 processes, this run has 1" in capsys.readouterr().out
    assert last_complete_checkpoint(tmp_path, processes=4, fsdp=False) == str(newest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-20", "checkpoint-40"]


def test_a_checkpoint_of_one_process_resumes_on_two(tmp_path):
    newest = checkpoint(tmp_path, 40, ["rng_state.pth"], writers=1)
    assert last_complete_checkpoint(tmp_path, processes=2) == str(newest)


def test_a_checkpoint_saved_under_fsdp_is_refused_without_it_and_kept(tmp_path):
    """Sharded weights and optimiser (2 processes under FSDP) resumed on 1 process, which does not shard:
    transformers cannot load them. The rerun is refused with what to do; the checkpoints stay."""
    sharded = checkpoint(tmp_path, 40, TWO, writers=2, fsdp=True)
    with pytest.raises(CheckpointLayoutError, match=r"checkpoint-40: saved by 2 processes with FSDP, and this run "
                                                    r"has 1 process without FSDP.*Rerun on 2 process\(es\), or "
                                                    rf"delete {tmp_path}"):
        last_complete_checkpoint(tmp_path, processes=1, fsdp=False)
    assert sharded.is_dir()
    assert last_complete_checkpoint(tmp_path, processes=4, fsdp=True) == str(sharded)  # FSDP on 4 reshards


def test_a_checkpoint_cut_short_is_removed_and_the_one_before_used(tmp_path, capsys):
    """Without a completion record (a kill before every process had saved), a process's missing RNG state
    makes the checkpoint incomplete, as before records existed."""
    before = checkpoint(tmp_path, 20, TWO, writers=2)
    checkpoint(tmp_path, 40, ["rng_state_0.pth"])
    assert last_complete_checkpoint(tmp_path, processes=2) == str(before)
    assert "removing incomplete checkpoint" in capsys.readouterr().out
    assert not (tmp_path / "checkpoint-40").exists()


def test_a_recorded_checkpoint_that_lost_a_file_is_incomplete(tmp_path):
    before = checkpoint(tmp_path, 20, TWO, writers=2)
    checkpoint(tmp_path, 40, ["rng_state_0.pth"], writers=2)
    assert last_complete_checkpoint(tmp_path, processes=1) == str(before)
    assert not (tmp_path / "checkpoint-40").exists()


def test_the_code_names_the_partial_work(tmp_path, monkeypatch):
    """A checkpoint directory (and a stage's shard directory) is keyed by every Python file of the package:
    a change of any module, or a new one, gives another directory, the same code the same one."""
    package = tmp_path / "package"
    shutil.copytree(PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__"))
    before = code_digest(package)
    assert code_digest(package) == before and code_digest(PACKAGE) == code_digest()
    with open(package / "opd_loss.py", "a") as module:
        module.write("\n# a change\n")
    changed = code_digest.__wrapped__(package)
    (package / ".#opd_loss.py").symlink_to("user@host.1234")  # an editor's lock file: a dangling link
    assert code_digest.__wrapped__(package) == changed
    (package / "backends" / "new.py").write_text("")
    assert len({before, changed, code_digest.__wrapped__(package)}) == 3
    key = {"stage": "sft", "base": "abc"}
    same_code = checkpoint_dir(tmp_path, key)
    assert checkpoint_dir(tmp_path, key) == same_code
    monkeypatch.setattr(training, "code_digest", lambda: "changed-code")
    assert checkpoint_dir(tmp_path, key) != same_code


def test_an_unreadable_completion_record_stands_for_this_runs_layout(tmp_path):
    """A damaged record (not JSON, no count, a count below 1) is no record: the checkpoint must hold this run's
    RNG files, and one that does not is removed as incomplete, not resumed with no RNG file checked."""
    for step, record in ((20, "{not json"), (40, '{"fsdp": false}'), (60, '{"processes": 0, "fsdp": false}')):
        checkpoint(tmp_path, step, ["rng_state.pth"] if step == 20 else []).joinpath(CHECKPOINT_COMPLETE).write_text(
            record)
    assert last_complete_checkpoint(tmp_path, processes=1, fsdp=False) == str(tmp_path / "checkpoint-20")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-20"]
