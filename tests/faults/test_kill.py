"""kill -9 at each stage: generation, the teacher cache, Lightning OPD and
standard OPD training, evaluation, and in the middle of an atomic write.
Nothing is left at the target path, no temporary file survives the next run,
and rerunning completes (training resumes, evaluation starts over)."""
from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys

from inject import ENV, assert_nothing_at, call, kill9, rewrite, start, wait_for

from lightning_opd import evaluate, generate, lightning_opd, standard_opd, teacher_cache


def replicated(src, dst, times: int):
    """A bigger copy of a prompt or rollout artifact (ids kept unique), so that a stage runs long enough
    to be killed."""
    return rewrite(
        src, dst, mutate_rows=lambda rows: [{**r, "id": f"{r['id']}-{k}"} for k in range(times) for r in rows]
    )


def test_kill_during_generation(world, tmp_path):
    prompts, out, log = (
        replicated(world["data"] / "sft.parquet", tmp_path / "prompts.parquet", 2),
        tmp_path / "sft_data.parquet",
        tmp_path / "log",
    )
    argv = [
        "--model",
        world["teacher_A"],
        "--prompts",
        prompts,
        "--out",
        out,
        "--label",
        "A",
        "--sampling",
        json.dumps({"max_new_tokens": 8, "batch_size": 1}),
        "--shard-size",
        4,
    ]
    process = start("lightning_opd.generate", argv, log)
    wait_for(lambda: "] shard 1/8 " in log.read_text(), process)  # one of 8 shards of 4 prompts written
    kill9(process)
    assert_nothing_at(out, shards_kept=True)
    assert call(generate.main, argv).returncode == 0 and out.is_file()
    assert not list(tmp_path.glob(".sft_data.parquet*"))


def test_kill_during_teacher_cache(world, tmp_path):
    rollouts, out, log = (
        replicated(world["rollouts"], tmp_path / "rollouts.parquet", 10),
        tmp_path / "cache.parquet",
        tmp_path / "log",
    )
    argv = [
        "--teacher",
        world["teacher_A"],
        "--rollouts",
        rollouts,
        "--out",
        out,
        "--label",
        "A",
        "--backend-options",
        json.dumps({"batch_size": 1}),
        "--shard-size",
        8,
    ]
    process = start("lightning_opd.teacher_cache", argv, log)
    wait_for(lambda: "] shard 2/15 " in log.read_text(), process)  # two of 15 shards of 8 rollouts written
    kill9(process)
    assert_nothing_at(out, shards_kept=True)
    assert call(teacher_cache.main, argv).returncode == 0 and out.is_file()
    assert not list(tmp_path.glob(".cache.parquet*"))


def kill_after_checkpoint_and_resume(module, main, argv, log, out, ckpt, kill_at: int, last: int) -> None:
    """``kill -9`` a trainer once checkpoint ``kill_at`` is complete: nothing at ``out``; the rerun says it
    resumes, writes the model beside no staging directory, and drops the checkpoints."""
    process = start(f"lightning_opd.{module}", argv, log)
    wait_for(lambda: any(ckpt.glob(f"*/checkpoint-{kill_at}/trainer_state.json")), process)
    kill9(process)
    assert_nothing_at(out)
    saved = sorted(int(p.name.split("-")[1]) for p in ckpt.glob("*/checkpoint-*"))
    assert saved and max(saved) < last, saved
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert call(main, argv).returncode == 0
    assert "resuming from" in printed.getvalue()
    assert (out / "model.safetensors").is_file()
    assert not list(out.parent.glob(f".{out.name}*")), "staging or temporary directories left beside the model"
    assert not any(ckpt.glob("*/checkpoint-*")), "checkpoints are dropped once the model is saved"


def test_kill_during_training_resumes(world, tmp_path):
    out, ckpt, log = tmp_path / "lopd", tmp_path / "ckpt", tmp_path / "log"
    argv = [
        "--init",
        world["sft_A"],
        "--cache",
        world["cache_A"],
        "--out",
        out,
        "--checkpoint-root",
        ckpt,
        "--opd",
        json.dumps({"epochs": 10, "batch_size": 4, "save_steps": 3, "logging_steps": 1}),
        "--drift-n",
        0,
    ]
    kill_after_checkpoint_and_resume("lightning_opd", lightning_opd.main, argv, log, out, ckpt, kill_at=6, last=30)


def test_kill_in_the_middle_of_an_atomic_write_leaves_nothing_the_next_write_keeps(world, tmp_path):
    out = tmp_path / "samples.parquet"
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time\n"
                "from lightning_opd.artifacts import atomic_path\n"
                f"with atomic_path({str(out)!r}) as tmp:\n"
                "    tmp.write_bytes(b'half of a parquet file')\n"
                "    print('writing', flush=True)\n"
                "    time.sleep(120)\n"
            ),
        ],
        env=ENV,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert writer.stdout.readline().strip() == "writing"
    kill9(writer)
    assert not out.exists()
    assert len(list(tmp_path.glob(".samples.parquet.tmp-*"))) == 1  # what kill -9 leaves
    argv = [
        "--model",
        world["teacher_A"],
        "--prompts",
        world["data"] / "opd.parquet",
        "--out",
        out,
        "--sampling",
        json.dumps({"max_new_tokens": 4}),
    ]
    assert call(generate.main, argv).returncode == 0 and out.is_file()
    assert not list(tmp_path.glob(".samples.parquet.*")), "the next write of the path removes the leftover"


def test_staging_directory_of_a_killed_model_save_is_removed(world, tmp_path):
    out = tmp_path / "lopd"
    staging = tmp_path / ".lopd.partial"  # what a kill between the weights and the final move leaves
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"half")
    argv = [
        "--init",
        world["sft_A"],
        "--cache",
        world["cache_A"],
        "--out",
        out,
        "--checkpoint-root",
        tmp_path / "c",
        "--opd",
        json.dumps({"max_steps": 2, "batch_size": 4, "save_steps": 100}),
        "--drift-n",
        0,
    ]
    assert call(lightning_opd.main, argv).returncode == 0
    assert (out / "model.safetensors").stat().st_size > 1000
    assert not staging.exists()


def test_kill_during_evaluation_leaves_no_result(world, tmp_path):
    eval_file, out, log = (
        replicated(world["data"] / "eval.parquet", tmp_path / "eval.parquet", 2),
        tmp_path / "eval" / "sft-A.json",
        tmp_path / "log",
    )
    argv = ["--model", world["sft_A"], "--eval-file", eval_file, "--out", out, "--k", 2, "--max-gen-toks", 16,
            "--batch-size", 4, "--label", "sft-A"]
    process = start("lightning_opd.evaluate", argv, log)
    wait_for(lambda: "Running generate_until requests" in log.read_text(), process)  # lm-eval is generating
    kill9(process)
    samples = out.with_suffix(".samples.jsonl")
    assert_nothing_at(out)
    assert_nothing_at(samples)
    assert call(evaluate.main, argv).returncode == 0  # redone from the start
    summary = json.loads(out.read_text())
    assert summary["n_problems"] == 16 and len(samples.read_text().splitlines()) == 16
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name, samples.name]


def test_kill_during_standard_opd_resumes(world, tmp_path):
    out, ckpt, log = tmp_path / "standard", tmp_path / "ckpt", tmp_path / "log"
    argv = ["--init", world["sft_A"], "--teacher", world["teacher_A"], "--teacher-label", "A",
            "--prompts", world["data"] / "opd.parquet", "--out", out, "--checkpoint-root", ckpt, "--drift-n", 0,
            "--opd", json.dumps({"max_steps": 6, "batch_size": 2, "save_steps": 1, "logging_steps": 1}),
            "--sampling", json.dumps({"n": 2, "max_new_tokens": 8})]
    kill_after_checkpoint_and_resume("standard_opd", standard_opd.main, argv, log, out, ckpt, kill_at=2, last=6)
    log_steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert max(log_steps) == 6, log_steps
