"""The generation stages work in shards: killed midway (kill -9) and rerun,
each redoes only the missing shards and ends with the artifact of an
uninterrupted run; two engines write the artifact of one; a stage split
over jobs plans one job per part and its parts join into the same artifact."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from lightning_opd import generate, shards, teacher_cache
from lightning_opd.artifacts import CACHE_SCHEMA, SAMPLES_SCHEMA, TASK_SCHEMA, read_table, write_table
from test_pipeline import planned_jobs, snakemake, write_yaml

N_PROMPTS = 24
SHARD_SIZE = {"sft_data": 2, "rollouts": 2, "teacher_cache": 1}
SAMPLING = json.dumps({"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 12, "seed": 3, "batch_size": 8})
MODULE = {"sft_data": generate, "rollouts": generate, "teacher_cache": teacher_cache}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Every process of these tests (this one, killed runs, engines) computes
    on one thread: the same numerics everywhere, and no threads spinning for
    a share of a busy machine's cores."""
    threads, saved = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    if saved is None:
        os.environ.pop("OMP_NUM_THREADS")
    else:
        os.environ["OMP_NUM_THREADS"] = saved


@pytest.fixture(scope="module")
def prompts(world, tmp_path_factory) -> Path:
    """The world's prompts repeated under new ids: enough shards to kill a run between two of them."""
    table, meta = read_table(world["data"] / "sft.parquet", TASK_SCHEMA)
    rows = table.to_pylist()
    path = tmp_path_factory.mktemp("prompts") / "prompts.parquet"
    write_table(path, [{**rows[i % len(rows)], "id": f"p{i}"} for i in range(N_PROMPTS)], TASK_SCHEMA, meta)
    return path


def stage_args(stage: str, world, inputs: dict[str, Path], out: Path, work: Path, *extra: str) -> list[str]:
    common = ["--out", str(out), "--work-dir", str(work), "--shard-size", str(SHARD_SIZE[stage]), *extra]
    if stage == "teacher_cache":
        return ["--teacher", str(world["teacher_A"]), "--rollouts", str(inputs["rollouts"]), "--label", "A", *common]
    model = world["teacher_A"] if stage == "sft_data" else world["sft_A"]
    return ["--model", str(model), "--prompts", str(inputs["prompts"]), "--label", stage, "--sampling", SAMPLING,
            *common]


@pytest.fixture(scope="module")
def reference(world, prompts, tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted runs of the three stages, one engine each; the rollouts feed the teacher cache."""
    root = tmp_path_factory.mktemp("reference")
    inputs = {"prompts": prompts}
    for stage in ("sft_data", "rollouts", "teacher_cache"):
        out = root / f"{stage}.parquet"
        MODULE[stage].main(stage_args(stage, world, {**inputs, "rollouts": root / "rollouts.parquet"},
                                      out, root / "work"))
        inputs[stage] = out
    return inputs


def assert_same_artifact(path: Path, expected: Path, schema=SAMPLES_SCHEMA) -> None:
    """Row by row (ids, token ids, text, teacher log-probs) and provenance."""
    table, meta = read_table(path, schema)
    want, want_meta = read_table(expected, schema)
    assert table.num_rows == want.num_rows == N_PROMPTS
    for got_row, want_row in zip(table.to_pylist(), want.to_pylist()):
        assert got_row == want_row
    assert meta == want_meta


def shard_indices(work: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in work.glob("*/shard-*.parquet"))


@pytest.mark.parametrize("stage", ["sft_data", "rollouts", "teacher_cache"])
def test_kill_and_rerun_redoes_only_the_missing_shards(stage, world, reference, tmp_path, capsys):
    out, work = tmp_path / "out.parquet", tmp_path / "work"
    inputs = {"prompts": reference["prompts"], "rollouts": reference["rollouts"]}
    args = stage_args(stage, world, inputs, out, work)
    process = subprocess.Popen([sys.executable, "-m", MODULE[stage].__name__, *args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not shard_indices(work) and process.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    kept = shard_indices(work)
    total = -(-N_PROMPTS // SHARD_SIZE[stage])
    assert not out.exists(), "killed midway: no artifact may exist"
    assert kept and len(kept) < total, f"expected some of the {total} shards, found {kept}"

    capsys.readouterr()
    MODULE[stage].main(args)
    log = capsys.readouterr().out
    assert f"{total} shards of up to {SHARD_SIZE[stage]} rows" in log and f"{len(kept)} done before" in log
    redone = sorted(int(n) - 1 for n in re.findall(r"\] shard (\d+)/\d+ ", log))
    assert redone == sorted(set(range(total)) - set(kept))
    assert re.search(r"done: \d+/\d+ shards, \d+ tokens \w+ in [\d.]+ s this run \([\d.]+ tokens \w+/s\)", log)
    assert_same_artifact(out, reference[stage], CACHE_SCHEMA if stage == "teacher_cache" else SAMPLES_SCHEMA)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.parquet", "work"]
    assert not any(work.iterdir()), "the shards are removed once the artifact is written"


class Killed(Exception):
    """The end of a run that dies after its first shard."""


def generate_killed_after_the_first_shard(args: list[str], monkeypatch) -> None:
    write_shard = shards._write_shard

    def die_after_the_first(work_dir, index, *rest):
        if index > 0:
            raise Killed
        write_shard(work_dir, index, *rest)

    with monkeypatch.context() as patch:
        patch.setattr(shards, "_write_shard", die_after_the_first)
        with pytest.raises(Killed):
            generate.main(args)


def generate_args(world, prompts, out: Path, work: Path, seed: int = 3) -> list[str]:
    sampling = json.dumps({**json.loads(SAMPLING), "seed": seed})
    return ["--model", str(world["sft_A"]), "--prompts", str(prompts), "--sampling", sampling,
            "--out", str(out), "--work-dir", str(work), "--shard-size", "12"]


def test_a_rerun_with_another_seed_reuses_no_shard(world, prompts, tmp_path, monkeypatch, capsys):
    """The work dir is keyed by the stage's inputs and params: a shard sampled with one seed is
    never taken for another seed's, and waits for a rerun with its own."""
    out, work = tmp_path / "out.parquet", tmp_path / "work"
    generate_killed_after_the_first_shard(generate_args(world, prompts, out, work, seed=3), monkeypatch)
    [seed_3] = list(work.iterdir())
    assert shard_indices(work) == [0] and not out.exists()

    capsys.readouterr()
    generate.main(generate_args(world, prompts, out, work, seed=4))
    log = capsys.readouterr().out
    assert "2 shards of up to 12 rows" in log and "0 done before, 2 to do" in log
    other = read_table(out, SAMPLES_SCHEMA)[0].column("response_ids").to_pylist()
    assert list(work.iterdir()) == [seed_3]  # seed 4's own work dir is gone, seed 3's shard is kept
    generate.main(generate_args(world, prompts, out, work, seed=3))
    rerun = capsys.readouterr().out
    assert read_table(out, SAMPLES_SCHEMA)[0].column("response_ids").to_pylist() != other
    assert "1 done before, 1 to do" in rerun and not any(work.iterdir())


def test_a_rerun_after_the_code_changed_reuses_no_shard(world, prompts, tmp_path, monkeypatch, capsys):
    """Killed after its first shard, then rerun by Snakemake because a module it runs changed: the new code
    samples every shard again, and the old shard waits for the old code."""
    out, work = tmp_path / "out.parquet", tmp_path / "work"
    generate_killed_after_the_first_shard(generate_args(world, prompts, out, work), monkeypatch)
    [old_code] = list(work.iterdir())
    capsys.readouterr()
    with monkeypatch.context() as patch:
        patch.setattr(shards, "code_digest", lambda: "changed-code")
        generate.main(generate_args(world, prompts, out, work))
    assert "0 done before, 2 to do" in capsys.readouterr().out
    assert list(work.iterdir()) == [old_code]


def test_two_engines_write_the_artifact_of_one(world, reference, tmp_path, capsys):
    out = tmp_path / "out.parquet"
    generate.main(stage_args("sft_data", world, reference, out, tmp_path / "work", "--data-parallel", "2"))
    log = capsys.readouterr().out
    assert "engine 0: pid" in log and "engine 1: pid" in log
    engines = set(re.findall(r"engine (\d)\) done", log))
    assert engines == {"0", "1"}, "both engines take shards"
    assert_same_artifact(out, reference["sft_data"])


def test_parts_of_a_split_stage_join_into_the_artifact(world, reference, tmp_path):
    parts = [tmp_path / f"{i}-of-3.parquet" for i in (1, 2, 3)]
    for i, part in enumerate(parts, 1):
        teacher_cache.main(stage_args("teacher_cache", world, reference, part, tmp_path / "work",
                                      "--part", f"{i}-of-3"))
    shards.main(["--gather", *map(str, reversed(parts)), "--schema", "cache", "--out", str(tmp_path / "out.parquet")])
    assert_same_artifact(tmp_path / "out.parquet", reference["teacher_cache"], CACHE_SCHEMA)
    with pytest.raises(shards.ArtifactError, match="expected each of 1..3 once"):
        shards.gather([parts[0], parts[0], parts[2]], tmp_path / "bad.parquet", CACHE_SCHEMA)
    assert not (tmp_path / "bad.parquet").exists()


def test_parts_cut_with_different_shard_sizes_are_refused(world, reference, tmp_path):
    """Part 1 of 2 with shard size 1 holds rows 0-11; part 2 with shard size 5 (the config changed between
    the jobs) rows 10-23: joined, rows 10 and 11 would be there twice."""
    parts = [tmp_path / "1-of-2.parquet", tmp_path / "2-of-2.parquet"]
    teacher_cache.main(stage_args("teacher_cache", world, reference, parts[0], tmp_path / "work", "--part", "1-of-2"))
    args = stage_args("teacher_cache", world, reference, parts[1], tmp_path / "work", "--part", "2-of-2")
    args[args.index("--shard-size") + 1] = "5"
    teacher_cache.main(args)
    with pytest.raises(shards.ArtifactError, match="holds rows 10-23, but the parts before it end at row 11"):
        shards.gather(parts, tmp_path / "bad.parquet", CACHE_SCHEMA)
    assert not (tmp_path / "bad.parquet").exists()


def test_a_part_with_no_shard_is_refused_before_any_work(world, reference, tmp_path):
    out, work = tmp_path / "1-of-2.parquet", tmp_path / "work"
    args = stage_args("teacher_cache", world, reference, out, work, "--part", "1-of-2")
    args[args.index("--shard-size") + 1] = str(N_PROMPTS)  # one shard for two jobs: the second takes it
    with pytest.raises(ValueError, match="1 shard.* none left for this part; split the stage into at most 1 job"):
        teacher_cache.main(args)
    assert not out.exists() and not work.exists()


@dataclasses.dataclass
class AbortsAfterItsShards(teacher_cache.ScoreTask):
    """Scores in a worker process, which aborts (SIGABRT) as it closes the engine
    after its last shard, as a vLLM engine's process once did in CI. The shard
    that starts at row ``slow_row`` takes 8 s more."""
    slow_row: int = -1
    engine_in_worker = True

    def run(self, shard: range):
        if shard.start == self.slow_row:
            time.sleep(8)  # longer than the parent's 5 s wait between checks for dead workers
        return super().run(shard)

    def close(self) -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file
        os.abort()


@pytest.mark.parametrize("engines", [1, 2])
def test_an_engine_process_that_aborts_after_its_last_shard_fails_no_stage(engines, world, reference, tmp_path,
                                                                           capsys):
    """With two engines, one has aborted while the other still works on the (slow) last shard."""
    task = AbortsAfterItsShards(teacher=str(world["teacher_A"]), rollouts_path=reference["rollouts"],
                                max_response_tokens=None, temperature=1.0, backend="hf", backend_options={},
                                slow_row=N_PROMPTS - 1 if engines > 1 else -1)
    out, work = tmp_path / "cache.parquet", tmp_path / "work"
    shards.run_sharded(task, name="aborts", n_rows=N_PROMPTS, shard_size=SHARD_SIZE["teacher_cache"],
                       key={"test": "aborts"}, work_root=work, out=out, schema=CACHE_SCHEMA,
                       metadata={"stage": "teacher_cache"}, data_parallel=engines)
    log = capsys.readouterr().out
    for engine in range(engines):
        assert f"engine-{engine} ended with exit code {-signal.SIGABRT} after its last shard" in log
    assert "24 shards, 24 rows" in log and not any(work.iterdir())
    got = pq.read_table(out).column("teacher_logprobs").to_pylist()
    assert got == read_table(reference["teacher_cache"], CACHE_SCHEMA)[0].column("teacher_logprobs").to_pylist()


def test_a_stage_split_over_jobs_plans_one_job_per_part_and_a_gather(tmp_path):
    override = write_yaml(tmp_path / "split.yaml", {"results_dir": str(tmp_path / "results"),
                                                    "generation": {"jobs": 3}, "rollouts": {"jobs": 1},
                                                    "teacher_cache": {"jobs": 2}})
    jobs = planned_jobs(snakemake("-n", "--configfile", str(override)).stdout)
    assert jobs["sft_data"] == 3 and jobs["sft_data_gather"] == 1
    assert jobs["rollouts"] == 1 and "rollouts_gather" not in jobs
    assert jobs["teacher_cache"] == 2 and jobs["teacher_cache_gather"] == 1


def test_bad_backend_options_leave_no_output_and_no_work_dir(world, reference, tmp_path):
    out, work = tmp_path / "out.parquet", tmp_path / "work"
    with pytest.raises(ValueError, match="does not take the option"):
        generate.main(stage_args("rollouts", world, reference, out, work,
                                 "--backend-options", json.dumps({"tensor_parallel_size": 8})))
    assert not out.exists() and not any(work.iterdir())


def test_parts_of_a_top_k_cache_join_with_their_top_k_columns(world, tmp_path):
    from lightning_opd.artifacts import cache_schema

    args = ["--teacher", str(world["teacher_A"]), "--rollouts", str(world["rollouts"]), "--label", "A",
            "--top-k", "4", "--shard-size", "4"]
    whole = tmp_path / "whole.parquet"
    teacher_cache.main([*args, "--out", str(whole), "--work-dir", str(tmp_path / "work")])
    parts = [tmp_path / f"{i}-of-2.parquet" for i in (1, 2)]
    for i, part in enumerate(parts, 1):
        teacher_cache.main([*args, "--out", str(part), "--work-dir", str(tmp_path / "work"), "--part", f"{i}-of-2"])
    shards.main(["--gather", *map(str, parts), "--schema", "cache", "--out", str(tmp_path / "out.parquet")])
    got, meta = read_table(tmp_path / "out.parquet", cache_schema(4))
    want, want_meta = read_table(whole, cache_schema(4))
    assert got.to_pylist() == want.to_pylist() and meta == want_meta and meta["top_k"] == 4


def test_engine_devices_split_the_visible_gpus_into_consecutive_groups(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    assert shards.engine_devices(2, 2) == ["0,1", "2,3"]  # two engines of tensor parallel 2
    assert shards.engine_devices(4, 1) == ["0", "1", "2", "3"]
    assert shards.engine_devices(1, 2) == ["0,1"]  # GPUs left over stay idle
    with pytest.raises(ValueError, match=r"data_parallel 3 x 2 GPU\(s\) per engine needs 6 GPUs, "
                                         r"but this job sees 4 \(0,1,2,3\)"):
        shards.engine_devices(3, 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", " 4, 6 ")  # a SLURM allocation's GPU ids
    assert shards.engine_devices(2, 1) == ["4", "6"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU: every engine on the CPU
    assert shards.engine_devices(3, 2) == [None, None, None]
