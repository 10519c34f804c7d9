"""The Snakemake DAG: dry run of the default, the config schema, and one
reduced run end to end with the rerun behaviour the README promises."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from lightning_opd.artifacts import METADATA_KEY
from lightning_opd.provenance import read_train_log
from torchrun import run_or_show_stacks

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
STAGES = ["task_data", "tokenizer", "pretrain_teacher", "pretrain_student_base", "sft_data", "sft", "rollouts",
          "teacher_cache", "lightning_opd", "standard_opd", "evaluate", "report", "prompt_share", "round_rollouts",
          "round_teacher_cache"]


def snakemake(*args: str, cwd: Path = REPO, check: bool = True) -> subprocess.CompletedProcess:
    """A hung job (a training of two processes, say) fails the test after 20 minutes with every Python
    process's stack: the jobs', Snakemake's own."""
    result = run_or_show_stacks([SNAKEMAKE, "--workflow-profile", "none", "--cores", "2", *args], cwd=cwd, env=ENV,
                                timeout=1200)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def planned_jobs(output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run: rule -> number of jobs."""
    if "Nothing to be done" in output:
        return {}
    table = output.split("Job stats:")[1].split("total")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.MULTILINE)}


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def copy_repo(work: Path, *extra: str) -> Path:
    """What a pipeline run needs of this repository, and ``extra`` paths, copied into ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    for item in ("workflow", "src", "config", *extra):
        if (REPO / item).is_dir():  # not __pycache__, which another test's process may be writing
            shutil.copytree(REPO / item, work / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / item, work / item)
    return work


def merge(base: dict, over: dict) -> dict:
    """``over`` merged key by key into ``base``, as Snakemake merges --configfile files."""
    return {**base, **{k: merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
                       for k, v in over.items()}}


def default_config() -> dict:
    return yaml.safe_load((REPO / "config/config.yaml").read_text())


def test_default_dag_dry_run(tmp_path):
    override = write_yaml(tmp_path / "o.yaml", {"results_dir": str(tmp_path / "results")})
    result = snakemake("-n", "--configfile", str(override))
    jobs = planned_jobs(result.stdout)
    assert set(STAGES) <= set(jobs), jobs
    # teacher, student base, pi_ref, standard and Lightning OPD students, and the 4 Lightning OPD variants
    assert jobs["evaluate"] == 9 and jobs["lightning_opd"] == 1 + 1 + 1 + 2 + 4
    assert jobs["round_rollouts"] == jobs["round_teacher_cache"] == 1 + 3
    assert not (tmp_path / "results").exists()


def test_the_longest_chains_are_scheduled_first(tmp_path):
    """A 4-round run is the DAG's longest path (rollouts, cache, then 10 jobs one after the other):
    it and what it needs go before the other Lightning OPD jobs, the 2-round run next; standard OPD,
    one job at least as long as that chain, goes first of all."""
    override = write_yaml(tmp_path / "o.yaml", {"results_dir": str(tmp_path / "results")})
    dry_run = snakemake("-n", "--configfile", str(override)).stdout
    priority = {}
    for block in re.split(r"^\[.*\]$", dry_run, flags=re.MULTILINE):  # a job's lines follow its time stamp
        output = re.search(r"^\s+output: (\S+?),?$", block, re.MULTILINE)
        if output:
            found = re.search(r"^\s+priority: (\d+)$", block, re.MULTILINE)
            priority[Path(output.group(1)).name] = int(found.group(1)) if found else 0
    run = "sft-A_teacher-A_seed-0"
    assert priority["sft-A.parquet"] == priority["sft-A_teacher-A.parquet"] == 4
    assert priority[f"lightning-rounds4-{run}_round-1"] == priority[f"lightning-rounds4-{run}_round-3.parquet"] == 4
    assert priority[f"lightning-rounds2-{run}_round-1"] == priority[f"lightning-rounds2-{run}"] == 2
    assert priority[f"lightning-{run}"] == priority[f"lightning-topk16-{run}"] == 1
    assert priority[f"standard-{run}"] == 5
    assert priority["sft-A"] == 0


def test_lint_is_clean():
    result = snakemake("--lint", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Congratulations, your workflow is in a good condition" in result.stdout + result.stderr


@pytest.mark.parametrize("change, message", [
    ({"eval": {"k": 0}}, "0 is less than the minimum of 1"),
    ({"lightning_opd": {"tau": -1.0}}, "-1.0 is less than or equal to the minimum of 0"),
    ({"lightning_opd": {"learning_rat": 1e-5}}, "learning_rat"),
    ({"generation": {"backend": "tgi"}}, "'tgi' is not one of"),
    ({"bogus_key": 1}, "'bogus_key' was unexpected"),
    ({"prompt_template": "no placeholder"}, "does not match"),
    ({"teachers": {"A": {"path": "Qwen/Qwen3-8B", "build": {}}}}, "is valid under each of"),
])
def test_schema_rejects_bad_config(change, message):
    config = default_config()
    for key, value in change.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) and key in config else value
    with pytest.raises(WorkflowError, match=re.escape(message)):
        validate(config, str(REPO / "workflow/schemas/config.schema.yaml"))


def test_default_and_tiny_configs_are_valid():
    validate(default_config(), str(REPO / "workflow/schemas/config.schema.yaml"))


def test_bad_config_stops_snakemake_before_any_job(tmp_path):
    bad = write_yaml(tmp_path / "bad.yaml", {"results_dir": str(tmp_path / "results"), "eval": {"k": "four"}})
    result = snakemake("--configfile", str(bad), check=False)
    assert result.returncode != 0
    assert "Error validating config file" in result.stdout + result.stderr
    assert "'four' is not of type 'integer'" in result.stdout + result.stderr
    assert not (tmp_path / "results").exists()


# ---- one reduced run, end to end, in a copy of the repository (tiny_run in conftest.py) ----------
def test_tiny_run_writes_the_report(tiny_run):
    work, _ = tiny_run
    report = work / "results/tiny/report"
    models = pd.read_csv(report / "models.csv", keep_default_na=False)
    assert list(models["role"]) == ["teacher", "student_base", "sft"] + ["lightning_opd"] * 3 + ["standard_opd"]
    assert models["synth_arith n_problems"].eq(12).all()
    assert models["synth_arith avg@2"].between(0, 1).all()
    assert (models["device_hours"] > 0).all()
    assert list(models.loc[models.role.str.endswith("_opd"), "teacher_consistent"]) == ["yes"] * 4
    table = pd.read_csv(report / "table.csv")
    lightning = "Lightning OPD (SFT data: A, OPD teacher: A)"
    assert table["model"].tolist() == ["teacher A", "student base", "SFT (pi_ref) (SFT data: A)",
                                       "standard OPD (SFT data: A, OPD teacher: A) [hf sampler]", lightning,
                                       f"{lightning} [rounds2: rounds 2]",
                                       f"{lightning} [topk4: loss topk_reverse_kl, top_k 4]"]
    assert table["cost_vs_standard_opd"].tolist()[3] == 1.0
    cost = models.set_index("model")["device_hours"]
    standard = cost["standard-sft-A_teacher-A_seed-0"]
    for row, label in [(4, "lightning-sft-A_teacher-A_seed-0"), (6, "lightning-topk4-sft-A_teacher-A_seed-0")]:
        assert table["cost_vs_standard_opd"].tolist()[row] == pytest.approx(cost[label] / standard, abs=1e-3)
    stages = pd.read_csv(report / "stage_costs.csv")
    assert set(STAGES) - {"report"} <= set(stages["stage"])
    # two rounds: half of pi_ref's rollouts and cache (round 1's share), then each round's own stages
    hours = stages.set_index("job")["device_hours"]
    run = "lightning-rounds2-sft-A_teacher-A_seed-0"
    expected = (stages.query("stage in ['rollouts', 'teacher_cache']").device_hours.sum() / 2
                + hours["share-1-of-2"] + hours["share-2-of-2"]
                + hours[f"{run}_round-2"].sum() + hours["sft-A_teacher-A_seed-0-rounds2_round-1"]
                + hours["sft-A_teacher-A_seed-0-rounds2"])
    assert cost[run] == pytest.approx(expected, abs=2e-5)
    assert ((stages["wall_s"] * stages["devices"] / 3600 - stages["device_hours"]).abs() < 1e-6).all()
    assert (report / "opd_training_curve.png").stat().st_size > 10_000
    assert (report / "accuracy_vs_cost.png").stat().st_size > 10_000
    assert "| Lightning OPD (SFT data: A, OPD teacher: A)" in (report / "table.md").read_text()


def test_every_priced_job_records_the_devices_it_held_beside_its_benchmark(tiny_run):
    """The report prices a job at what it held when it ran (report.held_devices), not at the config's
    resources of a later run: every job but the report's writes `<job>.devices` beside `<job>.tsv`."""
    work, _ = tiny_run
    benchmarks = work / "results/tiny/benchmarks"
    tsv = {p.with_suffix("") for p in benchmarks.rglob("*.tsv") if p.parent.name != "report"}
    devices = {p.with_suffix(""): int(p.read_text()) for p in benchmarks.rglob("*.devices")}
    assert tsv and set(devices) == tsv
    # the cores of tiny.yaml over config.yaml: pretrain 2, train 2 (processes 2), the rest 1
    for stage, cpus in (("pretrain_teacher", 2), ("sft", 2), ("lightning_opd", 2), ("rollouts", 1), ("evaluate", 1)):
        assert {n for path, n in devices.items() if path.relative_to(benchmarks).parts[0] == stage} == {cpus}, stage


def test_tiny_run_cache_records_teachers_and_sampling(tiny_run):
    work, _ = tiny_run
    meta = json.loads(pq.read_schema(work / "results/tiny/cache/sft-A_teacher-A.parquet").metadata[METADATA_KEY])
    assert meta["teacher"]["fingerprint"] == meta["sft_teacher"]["fingerprint"]
    assert meta["teacher"]["label"] == "A" and meta["sft_teacher"]["label"] == "A"
    default = yaml.safe_load((REPO / "config/config.yaml").read_text())  # tiny.yaml keeps its rollout temperature
    assert meta["rollouts"]["sampling"]["temperature"] == default["rollouts"]["sampling"]["temperature"]
    assert meta["score_temperature"] == 1.0


def test_training_rules_start_the_processes_of_the_config(tiny_run):
    work, _ = tiny_run
    logs = work / "results/tiny/logs"
    for stage in ("sft", "lightning_opd", "standard_opd"):  # resources.train.processes: 2 in tiny.yaml
        log = "".join(path.read_text() for path in (logs / stage).glob("*.log"))
        assert "torch.distributed.run --nproc-per-node=2" in log and "DDP: 2 x micro-batch 4" in log, stage
    assert "one process: 1 x micro-batch 16" in (logs / "pretrain_teacher/A.log").read_text()


def test_tiny_run_reports_every_trainer_to_tensorboard(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    results = tiny_run[0] / "results/tiny"
    for stage, label in [
        ("pretrain_teacher", "teacher-A"),
        ("pretrain_student_base", "student_base"),
        ("sft", "sft-A"),
        ("lightning_opd", "lightning-sft-A_teacher-A_seed-0"),
        ("standard_opd", "standard-sft-A_teacher-A_seed-0"),
    ]:
        events = EventAccumulator(str(results / "tracking" / stage / label))
        events.Reload()
        log = [json.loads(line) for line in (results / "models" / label / "train_log.jsonl").read_text().splitlines()]
        logged = [entry["step"] for entry in log if "loss" in entry]
        assert logged and [e.step for e in events.Scalars("train/loss")] == logged, stage


def test_tiny_run_renders_every_prompt_with_the_chat_template_kwargs(tiny_run):
    from lightning_opd.modeling import load_tokenizer

    results = tiny_run[0] / "results/tiny"
    kwargs = {"enable_thinking": False}
    tokenizer = load_tokenizer(results / "models/tokenizer")
    for artifact in ("sft_data/teacher-A.parquet", "rollouts/sft-A.parquet"):
        table = pq.read_table(results / artifact)
        assert json.loads(table.schema.metadata[METADATA_KEY])["chat_template_kwargs"] == kwargs, artifact
        assert all(
            tokenizer.decode(ids).endswith("assistant\n<think>\n\n</think>\n\n")
            for ids in table.column("prompt_ids").to_pylist()
        ), artifact
    cache = json.loads(pq.read_schema(results / "cache/sft-A_teacher-A.parquet").metadata[METADATA_KEY])
    assert cache["rollouts"]["chat_template_kwargs"] == kwargs
    for model in ("sft-A", "lightning-sft-A_teacher-A_seed-0", "standard-sft-A_teacher-A_seed-0"):
        provenance = json.loads((results / "models" / model / "provenance.json").read_text())
        assert provenance["chat_template_kwargs"] == kwargs, model
    assert json.loads((results / "eval/synth_arith/sft-A.json").read_text())["chat_template_kwargs"] == kwargs


def test_tiny_run_logs_drift_and_the_tokens_of_a_step(tiny_run):
    work, _ = tiny_run
    logs = {
        method: [e for e in read_train_log(work / f"results/tiny/models/{method}-sft-A_teacher-A_seed-0")
                 if "loss" in e]
        for method in ("lightning", "standard")
    }
    for method, entries in logs.items():  # a log per step (logging_steps 1), drift at each (every_steps null)
        assert len(entries) == 4, method  # 32 prompts, 8 per step
        assert all(
            e["drift_kl_ref"] >= 0 and e["tokens_per_step"] > e["response_tokens_per_step"] > 0 for e in entries
        ), method
    # over the epoch every prompt comes once per sample: standard OPD's n = 2 samples hold its tokens twice
    prompt_tokens = {
        m: sum(e["tokens_per_step"] - e["response_tokens_per_step"] for e in entries) for m, entries in logs.items()
    }
    assert prompt_tokens["standard"] == 2 * prompt_tokens["lightning"]


def test_tiny_run_trains_two_rounds_on_disjoint_prompt_shares(tiny_run):
    """rounds2: round 1 trains pi_ref on its half of pi_ref's cached rollouts; round 2 trains round 1's
    model on that model's own rollouts of the other half, scored by the teacher; one training log."""
    results = tiny_run[0] / "results/tiny"
    run = "lightning-rounds2-sft-A_teacher-A_seed-0"
    shares = [set(pq.read_table(results / f"data/opd_shares/share-{i}-of-2.parquet").column("id").to_pylist())
              for i in (1, 2)]
    opd = set(pq.read_table(results / "data/opd.parquet").column("id").to_pylist())
    assert not shares[0] & shares[1] and shares[0] | shares[1] == opd and len(shares[0]) == 16
    first = json.loads((results / f"models/{run}_round-1/provenance.json").read_text())
    last = json.loads((results / f"models/{run}/provenance.json").read_text())
    sft = json.loads((results / "models/sft-A/provenance.json").read_text())
    assert (first["round"], first["rounds"], last["round"], last["rounds"]) == (1, 2, 2, 2)
    assert first["init_model"]["path"].endswith("models/sft-A")
    assert last["init_model"]["path"].endswith(f"models/{run}_round-1")
    assert last["sft_teacher"] == sft["sft_teacher"] and last["teacher_consistent"]
    # round 2 goes on with round 1's optimiser state, which only a round that is not the last writes
    assert (first["optimizer_state"], last["optimizer_state"]) == ("fresh", "round 1's")
    assert (results / f"models/{run}_round-1/optimizer_state/optimizer.pt").is_file()
    assert not (results / f"models/{run}/optimizer_state").exists()
    rollouts = pq.read_table(results / f"rollouts/{run}_round-2.parquet")
    meta = json.loads(rollouts.schema.metadata[METADATA_KEY])
    assert meta["model"]["fingerprint"] == last["init_model"]["fingerprint"]  # sampled by round 1's model
    assert set(rollouts.column("id").to_pylist()) == shares[1]
    cache = json.loads(pq.read_schema(results / f"cache/{run}_round-2.parquet").metadata[METADATA_KEY])
    assert cache["teacher"]["label"] == "A" and cache["rollout_policy"]["fingerprint"] == meta["model"]["fingerprint"]
    # each round: 16 prompts, 8 a step, logged at every step; round 2's steps follow round 1's
    log = [e for e in read_train_log(results / f"models/{run}") if "loss" in e]
    assert [e["step"] for e in log] == [1, 2, 3, 4]
    assert all(e["drift_kl_ref"] >= 0 for e in log)


def test_second_run_does_nothing(tiny_run):
    work, config = tiny_run
    assert planned_jobs(snakemake("-n", *config, cwd=work).stdout) == {}


def test_opd_hyperparameter_reruns_only_opd_training_its_evals_and_report(tiny_run, tmp_path):
    """Both OPD trainers share the OPD hyperparameters (same optimiser, same steps)."""
    work, config = tiny_run
    lr = write_yaml(tmp_path / "lr.yaml", {"lightning_opd": {"learning_rate": 3e-5}})
    jobs = planned_jobs(snakemake("-n", *config, str(lr), cwd=work).stdout)
    # every Lightning OPD training (main, topk4, both rounds of rounds2) and, through round 1's model,
    # round 2's rollouts and cache
    assert jobs == {"lightning_opd": 4, "round_rollouts": 1, "round_teacher_cache": 1, "standard_opd": 1,
                    "evaluate": 4, "report": 1, "all": 1}


def test_module_edit_reruns_its_stage_and_downstream(tiny_run):
    work, config = tiny_run
    module = work / "src/lightning_opd/teacher_cache.py"
    original = module.read_text()
    module.write_text(original + "\n# an edit\n")
    try:
        jobs = planned_jobs(snakemake("-n", *config, cwd=work).stdout)
    finally:
        module.write_text(original)
    assert jobs == {"teacher_cache": 1, "round_teacher_cache": 1, "round_rollouts": 1, "lightning_opd": 4,
                    "evaluate": 3, "report": 1, "all": 1}


@pytest.mark.parametrize("paper", ["qwen3-4b", "qwen3-8b", "qwen3-30b-a3b"])
def test_paper_config_dag_needs_no_download(paper, tmp_path):
    """The full paper DAG is planned from hub ids alone: nothing is downloaded
    (no network here), no tiny model is built, the datasets are prepared."""
    override = write_yaml(tmp_path / "o.yaml", {"results_dir": str(tmp_path / "results")})
    result = snakemake("-n", "--configfile", f"config/paper/{paper}.yaml", str(override))
    jobs = planned_jobs(result.stdout)
    assert jobs["prepare_data"] == 4  # sft, opd, and one eval set per benchmark (aime24, aime25)
    assert not {"task_data", "tokenizer", "pretrain_teacher", "pretrain_student_base"} & set(jobs)
    assert jobs["lightning_opd"] == 1
    assert jobs.get("standard_opd", 0) == (0 if paper == "qwen3-30b-a3b" else 1)
    assert "gpu=8" in result.stdout  # the rules ask SLURM for the config's GPUs


def test_training_across_nodes_asks_slurm_for_the_gpus_of_each_node_and_launches_per_node(tmp_path):
    """Across nodes the command starts one launcher per node itself: an `mpi` job of one task per node, which
    Snakemake's SLURM jobstep plugin runs as it is (any other it wraps in a one-task step on one node), with
    the config's GPUs per node as GRES."""
    override = write_yaml(
        tmp_path / "o.yaml", {"results_dir": str(tmp_path / "results"), "resources": {"train": {"gpus": 8, "nodes": 2}}}
    )
    result = snakemake("-n", "-p", "--configfile", "config/paper/qwen3-8b.yaml", str(override))
    sft = result.stdout.split("rule sft:")[1].split("rule ")[0]
    resources = dict(item.split("=", 1) for item in re.search(r"resources: (.*)", sft).group(1).split(", "))
    assert {k: resources.get(k) for k in ("nodes", "tasks", "mpi", "tasks_per_gpu", "gres", "gpu")} == {
        "nodes": "2", "tasks": "2", "mpi": "srun", "tasks_per_gpu": "0", "gres": "gpu:8", "gpu": None}
    assert re.search(r"printf '%s\\n' 16 > \S+/benchmarks/sft/A\.devices", sft)  # the report prices its 16 GPUs
    assert "python -m lightning_opd.launch --nproc-per-node 8 --nnodes 2 --gpus-per-node 8 lightning_opd.sft" in sft
    data = result.stdout.split("rule prepare_data:")[1].split("rule ")[0]
    assert "gpu=" not in data and "cpus_per_task=1" in data  # the light kind: no GPU
