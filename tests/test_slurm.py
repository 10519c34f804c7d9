"""`snakemake --profile slurm` on a real two-node SLURM cluster (both nodes on
this machine), started by tests/slurm/cluster.sh: every job of a reduced run
is a SLURM job that asks for the CPUs, memory, time and GPUs of the config,
and a training runs across both nodes. Run by `make test-slurm` (which
installs SLURM and the executor plugin if missing)."""
from __future__ import annotations

import getpass
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from datetime import datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file

from test_pipeline import copy_repo, merge, planned_jobs

if not os.environ.get("LOPD_SLURM_TEST"):
    pytest.skip("starts a SLURM cluster on this machine: run it with `make test-slurm`", allow_module_level=True)
_missing = [b for b in ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd", "sbatch", "sacct", "sacctmgr")
            if not shutil.which(b)]
if _missing:
    pytest.skip(f"SLURM is not installed (missing {', '.join(_missing)}): run `make test-slurm`",
                allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SH = REPO / "tests/slurm/cluster.sh"
VENV_BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
CONFIGS = ["tests/configs/tiny.yaml", "tests/configs/slurm.yaml"]
# 8 jobs: data, tokenizer, two pretrainings, SFT data in two parts and their gather, SFT (the GPU rule)
TARGET = "results/tiny/models/sft-A"
# which `resources:` entry of the config each rule uses (workflow/rules/common.smk: stage_kind)
KIND = {"pretrain_teacher": "pretrain", "pretrain_student_base": "pretrain", "sft_data": "generate", "sft": "train",
        "task_data": "light", "tokenizer": "light", "sft_data_gather": "light"}


def run(*cmd: str, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("env", ENV)
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise AssertionError(f"{shlex.join(cmd)} failed ({result.returncode}):\n"
                             f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="session")
def slurm_cluster():
    assert importlib.util.find_spec("snakemake_executor_plugin_slurm"), \
        "the snakemake SLURM executor plugin is missing: pip install -e '.[slurm]' (make test-slurm does)"
    state = Path(tempfile.mkdtemp(prefix="lopd-slurm-"))
    try:
        run(str(CLUSTER_SH), "start", str(state), timeout=300)
        yield state
    finally:
        stop = subprocess.run([str(CLUSTER_SH), "stop", str(state)], check=False, capture_output=True, text=True,
                              timeout=300)
        if stop.returncode != 0:
            print(f"stopping the SLURM test cluster failed:\n{stop.stdout}\n{stop.stderr}", file=sys.stderr)
        else:
            shutil.rmtree(state, ignore_errors=True)


def merged_config() -> dict:
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    for path in CONFIGS:
        config = merge(config, yaml.safe_load((REPO / path).read_text()))
    return config


def minutes(timelimit: str) -> int:
    """sacct's [D-]HH:MM:SS in minutes."""
    days, _, hms = timelimit.rpartition("-")
    h, m, s = (int(x) for x in hms.split(":"))
    return int(days or 0) * 1440 + h * 60 + m + (s > 0)


def tres(text: str) -> dict[str, int]:
    """billing=2,cpu=2,gres/gpu=1,mem=2000M,node=1 -> {'cpu': 2, 'gres/gpu': 1, 'mem': 2000, ...}; mem in MB."""
    out = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=")
        scale = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 ** 2}.get(value[-1])
        out[key] = round(float(value[:-1]) * scale) if scale else int(value)
    return out


def cluster_defaults() -> dict:
    partition = run("scontrol", "show", "partition", "-o").stdout
    fields = dict(re.findall(r"(\w+)=(\S+)", partition))
    account = run("sacctmgr", "-n", "-P", "list", "user", getpass.getuser(), "format=defaultaccount").stdout.strip()
    return {"partition": fields["PartitionName"], "account": account}


@pytest.fixture(scope="module")
def slurm_run(slurm_cluster, tmp_path_factory):
    """The README's `snakemake --profile slurm`, from the root of a copy of the repository."""
    work = copy_repo(tmp_path_factory.mktemp("repo"), "profiles", "tests/configs")
    shutil.copy(REPO / "slurm", work / "slurm", follow_symlinks=False)  # the link to profiles/slurm
    snakemake = [str(VENV_BIN / "snakemake"), "--profile", "slurm", "--configfile", *CONFIGS]
    planned = planned_jobs(run(*snakemake, "-n", TARGET, cwd=work).stdout)
    started = datetime.now().strftime("%Y-%m-%dT%H:%M:%S")
    # the plugin polls 40 s after a start or a finished job by default: every job costs a poll; poll sooner
    result = run(*snakemake, "--slurm-init-seconds-before-status-checks", "2", TARGET, cwd=work, timeout=1200)
    log = result.stdout + result.stderr
    run_id = re.search(r"SLURM run ID: (\S+)", log).group(1)
    fields = ["JobID", "JobName", "Comment", "State", "Account", "Partition", "Timelimit", "ReqTRES", "AllocTRES"]
    sacct = run("sacct", "-X", "-P", "-n", "--name", run_id, "-S", started, "-o", ",".join(fields)).stdout
    jobs = [dict(zip(fields, line.split("|"))) for line in sacct.splitlines()]
    return {"work": work, "planned": planned, "log": log, "jobs": jobs}


def rule_of(job: dict) -> str:
    """The plugin names jobs after the run and puts the rule into the comment: rule_<rule>[_wildcards_<w>]."""
    match = re.fullmatch(r"rule_(\w+?)(_wildcards_.*)?", job["Comment"])
    assert match, f"SLURM job {job['JobID']} has no rule in its comment: {job}"
    return match.group(1)


def test_profile_names_no_partition_or_account():
    profile = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())
    assert profile["executor"] == "slurm"
    assert not re.search(r"partition|account", yaml.safe_dump(profile)), profile
    assert (REPO / "slurm").resolve() == (REPO / "profiles/slurm").resolve()


def test_every_job_is_a_completed_slurm_job_of_its_rule(slurm_run):
    jobs = slurm_run["jobs"]
    assert set(slurm_run["planned"]) == set(KIND), slurm_run["planned"]
    assert Counter(rule_of(job) for job in jobs) == Counter(slurm_run["planned"]), jobs
    assert len(re.findall(r"has been submitted with SLURM jobid", slurm_run["log"])) == len(jobs)
    assert [job for job in jobs if job["State"] != "COMPLETED"] == []


def test_jobs_ask_for_the_config_resources(slurm_run):
    config = merged_config()["resources"]
    defaults = cluster_defaults()
    for job in slurm_run["jobs"]:
        rule = rule_of(job)
        # `light` does not start from `default` (workflow/rules/common.smk); tests/configs/slurm.yaml sets all of it
        want = config["light"] if KIND[rule] == "light" else {**config["default"], **config[KIND[rule]]}
        for key in ("ReqTRES", "AllocTRES"):
            got = tres(job[key])
            assert (got["cpu"], got.get("gres/gpu", 0), got["mem"]) == (want["cpus"], want["gpus"], want["mem_mb"]), \
                f"{rule}: {key} {job[key]}, config {want}"
        assert minutes(job["Timelimit"]) == want["runtime"], f"{rule}: time limit {job['Timelimit']}, config {want}"
        # no partition or account in the profile: the cluster's defaults
        assert (job["Partition"], job["Account"]) == (defaults["partition"], defaults["account"]), job
    assert config["train"]["gpus"] == 1 and any(rule_of(j) == "sft" for j in slurm_run["jobs"])


def test_a_stage_split_over_jobs_runs_as_slurm_jobs_and_a_gather(slurm_run):
    """sft_data with jobs: 2 (tests/configs/slurm.yaml): two SLURM jobs each write a part, a third joins them."""
    rules = Counter(rule_of(job) for job in slurm_run["jobs"])
    assert (rules["sft_data"], rules["sft_data_gather"]) == (2, 1)
    parts = [pq.read_table(p) for p in sorted((slurm_run["work"] / "results/tiny/sft_data").glob("*.parts/*.parquet"))]
    assert len(parts) == 2 and all(part.num_rows for part in parts)
    data = pq.read_table(slurm_run["work"] / "results/tiny/sft_data/teacher-A.parquet")
    sft = pq.read_table(slurm_run["work"] / "results/tiny/data/sft.parquet")
    assert sorted(data.column("id").to_pylist()) == sorted(sft.column("id").to_pylist())


def test_outputs_exist_and_are_up_to_date(slurm_run):
    work = slurm_run["work"]
    model = work / TARGET
    assert (model / "model.safetensors").stat().st_size > 0
    assert (model / "provenance.json").is_file()
    assert (model / "train_log.jsonl").read_text().strip()  # written by the training in the GPU job
    dry = run(str(VENV_BIN / "snakemake"), "--profile", "slurm", "--configfile", *CONFIGS, "-n", TARGET, cwd=work)
    assert "Nothing to be done" in dry.stdout + dry.stderr


def test_code_in_a_gpu_job_falls_back_to_cpu(slurm_cluster, tmp_path):
    """SLURM hands the job a (fake) GPU; with no CUDA, torch and the package's device choice use the CPU."""
    out = tmp_path / "job.out"
    code = ("import os, torch; from lightning_opd.modeling import pick_device; "
            "print(os.environ.get('CUDA_VISIBLE_DEVICES'), torch.cuda.is_available(), pick_device())")
    run("sbatch", "--wait", "--gpus=1", "--cpus-per-task=1", "--mem=1000", "--time=5", "--output", str(out),
        "--wrap", f"PYTHONPATH={shlex.quote(str(REPO / 'src'))} {shlex.quote(sys.executable)} -c {shlex.quote(code)}",
        timeout=300)
    assert out.read_text().split() == ["0", "False", "cpu"], out.read_text()


def test_launch_command_across_nodes(slurm_cluster):
    """The multi-node launch: srun starts one torchrun per node, which meet at the address SLURM reaches the
    job's first node at (scontrol expands the node list and shows the nodes' NodeAddr: the test cluster's
    SLURM node names resolve nowhere), each node is known by its NodeAddr, and the first hosts the store."""
    from lightning_opd import launch

    env = {"SLURM_JOB_ID": "7", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "lopd[1-2]"}
    cmd = launch.command("m", ["--a"], 8, 2, env)
    assert cmd[:4] == ["srun", "--overlap", "--nodes=2", "--ntasks-per-node=1"]
    assert f"--rdzv-endpoint=127.0.0.1:{launch.RENDEZVOUS_PORT}" in cmd and "--rdzv-id=7" in cmd
    assert cmd[-3:] == ["-m", "m", "--a"] and "--nnodes=2" in cmd and "--nproc-per-node=8" in cmd
    assert cmd[5:9] == ["sh", "-c", launch.node_wrapper({"lopd1": "127.0.0.1", "lopd2": "127.0.0.1"}), "sh"], cmd


def test_a_training_runs_across_two_slurm_nodes(slurm_run, tmp_path):
    """`resources: train: {nodes: 2}` under `--profile slurm`: one SLURM job on both nodes of the test
    cluster, whose command (the launcher) starts a torchrun per node with srun; the two processes meet
    and train the same SFT model, bit for bit, as the run's two processes on one node."""
    work = tmp_path / "repo"
    shutil.copytree(slurm_run["work"], work, symlinks=True)  # the one-node run's inputs, up to date
    weights = "results/tiny/models/sft-A/model.safetensors"
    one_node = load_file(slurm_run["work"] / weights)
    overlay = work / "two_nodes.yaml"
    overlay.write_text(yaml.safe_dump({"resources": {"train": {"nodes": 2, "processes": 1}}}))
    snakemake = [str(VENV_BIN / "snakemake"), "--profile", "slurm", "--configfile", *CONFIGS, str(overlay)]
    assert planned_jobs(run(*snakemake, "-n", TARGET, "--forcerun", "sft", cwd=work).stdout) == {"sft": 1}
    started = datetime.now().strftime("%Y-%m-%dT%H:%M:%S")
    # LOGLEVEL=INFO: torchrun logs the MASTER_ADDR its workers meet at
    result = run(*snakemake, "--slurm-init-seconds-before-status-checks", "2", TARGET, "--forcerun", "sft",
                 cwd=work, timeout=900, env={**ENV, "LOGLEVEL": "INFO"})
    run_id = re.search(r"SLURM run ID: (\S+)", result.stdout + result.stderr).group(1)
    jobs = run("sacct", "-X", "-P", "-n", "--name", run_id, "-S", started, "-o", "JobID").stdout.split()
    assert len(jobs) == 1, jobs
    job = jobs[0]
    steps = run("sacct", "-P", "-n", "-j", job, "-o", "JobID,NNodes,State").stdout.splitlines()
    # the job, its batch step on the first node, and the launcher's srun step: a torchrun on each node
    assert any(line.startswith(f"{job}|2|COMPLETED") for line in steps), steps
    assert any(re.fullmatch(rf"{job}\.\d+\|2\|COMPLETED", line) for line in steps), steps
    log = next((work / "results/tiny/logs/sft").glob("*.log")).read_text()
    assert "--nnodes=2" in log and "--rdzv-endpoint=127.0.0.1:" in log, log[-3000:]
    # the workers meet at the rendezvous' rank-0 node's NodeAddr, not at its getfqdn() ("localhost" here)
    assert re.findall(r"master_addr=(\S+)", log) == ["127.0.0.1"] * 2, log[-3000:]
    provenance = json.loads((work / "results/tiny/models/sft-A/provenance.json").read_text())
    assert provenance["trained_on"]["processes"] == 2, provenance["trained_on"]
    # priced at what it held: a (fake) GPU on each of two nodes
    assert (work / "results/tiny/benchmarks/sft/A.devices").read_text().split() == ["2"]
    two_nodes = load_file(work / weights)
    assert one_node.keys() == two_nodes.keys()
    assert all(torch.equal(one_node[name], two_nodes[name]) for name in one_node)


def test_a_job_without_its_slurm_variables_finds_its_nodes(slurm_cluster, tmp_path):
    """What the launcher of a multi-node training sees under Snakemake's jobstep plugin (only SLURM_JOB_ID
    kept): scontrol gives it the job's node count and list, the same as the job's own variables."""
    out = tmp_path / "job.out"
    code = ("import os; from lightning_opd.launch import job_nodes; "
            "print(*job_nodes({'SLURM_JOB_ID': os.environ['SLURM_JOB_ID']}), os.environ['SLURM_NNODES'], "
            "os.environ['SLURM_JOB_NODELIST'])")
    run("sbatch", "--wait", "--cpus-per-task=1", "--mem=1000", "--time=5", "--output", str(out),
        "--wrap", f"PYTHONPATH={shlex.quote(str(REPO / 'src'))} {shlex.quote(sys.executable)} -c {shlex.quote(code)}",
        timeout=300)
    nodes, nodelist, env_nodes, env_nodelist = out.read_text().split()
    assert (nodes, nodelist) == (env_nodes, env_nodelist) and int(nodes) == 1, out.read_text()


def test_a_training_across_nodes_asks_sbatch_for_one_task_per_node(tmp_path):
    """The sbatch line Snakemake's SLURM plugin makes of a two-node training rule's resources (from a dry
    run of config/paper/qwen3-8b.yaml): two nodes, one task each, the GPUs per node as GRES. Without
    tasks_per_gpu 0 the plugin took `tasks` as --ntasks-per-gpu: 16 tasks per node of 8 GPUs."""
    from types import SimpleNamespace

    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    override = tmp_path / "nodes.yaml"
    override.write_text(yaml.safe_dump({"results_dir": str(tmp_path / "results"),
                                        "resources": {"train": {"gpus": 8, "nodes": 2}}}))
    result = run(str(VENV_BIN / "snakemake"), "-n", "--workflow-profile", "none", "--configfile",
                 "config/paper/qwen3-8b.yaml", str(override), cwd=REPO, timeout=300)
    block = result.stdout.split("rule sft:")[1].split("\n\n")[0]
    line = re.search(r"resources: (.*)", block).group(1)

    class Resources(dict):
        __getattr__ = dict.__getitem__

    resources = Resources()
    for item in line.split(", "):
        key, value = item.split("=", 1)
        resources[key] = int(value) if value.isdigit() else value
    job = SimpleNamespace(resources=resources, threads=resources["cpus_per_task"], is_group=lambda: False)
    sbatch = get_submit_command(job, {"run_uuid": "u", "slurm_logfile": "l", "comment_str": "c", "account": "",
                                      "partition": "", "workdir": str(tmp_path)}) + set_gres_string(job)
    assert "--nodes=2" in sbatch and "--ntasks=2" in sbatch and "--gres=gpu:8" in sbatch, sbatch
    assert "--ntasks-per-gpu" not in sbatch and "--gpus" not in sbatch, sbatch
