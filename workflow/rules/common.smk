# Paths, model locations, code inputs and resources shared by all rules.
import itertools
import json
import os
import shlex
from pathlib import Path

from snakemake.exceptions import WorkflowError

R = f"{config['results_dir']}/{config['experiment']}"
SRC = Path(workflow.basedir).parent / "src"
PKG = SRC / "lightning_opd"
# Jobs run `python -m lightning_opd.<stage>` from this checkout, with or
# without `pip install -e .`, locally, in conda envs and in SLURM jobs alike.
os.environ.update(PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])))

# Every module a stage imports from the package; listed as inputs so that an
# edit of the code reruns the stage (Snakemake does not see it otherwise).
SHARED_CODE = ["__init__.py", "artifacts.py", "hparams.py", "provenance.py", "modeling.py"]
TRAIN_CODE = ["training.py", "launch.py"]
BACKEND_CODE = ["backends/__init__.py", "backends/base.py", "backends/hf.py", "backends/vllm.py"]


def code(*modules):
    return [os.path.relpath(PKG / m) for m in (*modules, *SHARED_CODE)]


def js(obj):
    """A shell-quoted JSON argument; also a stable params value for rerun checks."""
    return shlex.quote(json.dumps(obj, sort_keys=True))


# data preparation, tokenizer and report: one core and no GPU, whatever `default` says
LIGHT = {"gpus": 0, "cpus": 1, "mem_mb": 4000, "runtime": 60}


def res(stage):
    """Resources of a kind of rule: the config's `resources.default` updated by
    `resources.<kind>`; the `light` kind starts from LIGHT instead."""
    base = LIGHT if stage == "light" else config["resources"]["default"]
    return {**base, **config["resources"].get(stage, {})}


def stage_resources(stage):
    r = res(stage)
    nodes = r.get("nodes", 1)
    out = {"mem_mb": r["mem_mb"], "runtime": r["runtime"], "cpus_per_task": r["cpus"]}
    if r["gpus"]:
        out["gpu"] = r["gpus"] * nodes  # the SLURM plugin asks for --gpus (per job); config gpus are per node
    if nodes > 1:
        out["nodes"] = nodes
    return out


def launch(stage):
    """How a training stage starts its module: one process, or torchrun with one
    process per GPU (or `processes`), across the job's nodes with srun."""
    r = res(stage)
    processes = r.get("processes") or r["gpus"] or 1
    return f"python -m lightning_opd.launch --nproc-per-node {processes} --nnodes {r.get('nodes', 1)}"


def devices(stage):
    """Devices a stage holds, for device-hours: GPUs if it has any, else CPU cores."""
    r = res(stage)
    return (r["gpus"] or r["cpus"]) * r.get("nodes", 1)


def bench(stage, pattern=""):
    return f"{R}/benchmarks/{stage}/{pattern or stage}.tsv"


def logfile(stage, pattern=""):
    return f"{R}/logs/{stage}/{pattern or stage}.log"


# ---- models: built by this pipeline (a path under R) or given (hub id / path)
def model_path(spec, built_at):
    return built_at if "build" in spec else spec["path"]


def tokenizer_path():
    return model_path(config["tokenizer"], f"{R}/models/tokenizer")


def teacher_path(name):
    return model_path(config["teachers"][name], f"{R}/models/teacher-{name}")


def student_base_path():
    return model_path(config["student_base"], f"{R}/models/student_base")


def built(path):
    """A model directory this pipeline makes is a file input; a hub id is not."""
    return [path] if str(path).startswith(R) else []


# ---- the OPD runs: (SFT teacher, OPD teacher, seed)
RUNS = config["runs"]


def opd_runs():
    for sft_t, opd_t, seed in itertools.product(RUNS["sft_teachers"], RUNS["opd_teachers"], RUNS["seeds"]):
        if sft_t != opd_t and not config["allow_teacher_mismatch"]:
            continue
        yield sft_t, opd_t, seed


METHODS = ["lightning"] + (["standard"] if config["standard_opd"]["enabled"] else [])


def opd_label(method, sft_t, opd_t, seed):
    return f"{method}-sft-{sft_t}_teacher-{opd_t}_seed-{seed}"


def opd_labels():
    return [opd_label(method, *run) for run in opd_runs() for method in METHODS]


def eval_model_path(label):
    if label.startswith("teacher-"):
        return teacher_path(label.removeprefix("teacher-"))
    if label == "student_base":
        return student_base_path()
    return f"{R}/models/{label}"


def eval_labels():
    labels = [f"teacher-{t}" for t in config["teachers"]] + ["student_base"]
    labels += [f"sft-{t}" for t in RUNS["sft_teachers"]]
    labels += opd_labels()
    return labels


# ---- the benchmarks: `eval.tasks`, each a wildcard of the evaluation rule
def eval_task_yaml(task):
    """An lm-eval task file: a task of src/lightning_opd/lm_eval_tasks/ by name, or a path to a task yaml."""
    return Path(task) if task.endswith((".yaml", ".yml")) else PKG / "lm_eval_tasks" / task / f"{task}.yaml"


def benchmark_name(task):
    """A benchmark's name in paths, data.eval and the report: the task name, or a task yaml's file stem."""
    return eval_task_yaml(task).stem


BENCHMARKS = {benchmark_name(task): eval_task_yaml(task) for task in config["eval"]["tasks"]}


def eval_data(benchmark):
    """A benchmark's problems: its own prepared set under `data.eval`, or the synthetic task's held-out set."""
    return f"{R}/data/eval/{benchmark}.parquet" if "data" in config else f"{R}/data/eval.parquet"


def dataset(split):
    """`data.<split>`; `eval/<benchmark>` is the benchmark's entry of `data.eval`."""
    kind, _, benchmark = split.partition("/")
    return config["data"]["eval"][benchmark] if kind == "eval" else config["data"][split]


for task, task_yaml in zip(config["eval"]["tasks"], BENCHMARKS.values()):
    if not task_yaml.is_file():
        raise WorkflowError(f"eval.tasks: {task!r}: {task_yaml} not found (give a task of "
                            f"{PKG / 'lm_eval_tasks'} by name, or a path to a task yaml)")
if len(BENCHMARKS) != len(config["eval"]["tasks"]):
    raise WorkflowError(f"eval.tasks {config['eval']['tasks']}: two tasks share a name (a task yaml's file stem "
                        "names its benchmark)")
if "data" in config and set(config["data"]["eval"]) != set(BENCHMARKS):
    raise WorkflowError(f"data.eval has datasets for {sorted(config['data']['eval'])} but eval.tasks names the "
                        f"benchmarks {list(BENCHMARKS)}: give data.eval one dataset per benchmark, by its name")


def eval_task_code(benchmark):
    """The Python beside a task file and the shared checker: inputs, so that an edit reruns the evaluation."""
    return sorted({os.path.relpath(p) for p in [*BENCHMARKS[benchmark].parent.glob("*.py"),
                                                PKG / "lm_eval_tasks/answer_check.py"]})


def opd_params(w):
    # the mismatch switch reaches only inconsistent runs, so flipping it does
    # not invalidate the consistent ones
    allow = w.sft_teacher != w.opd_teacher and config["allow_teacher_mismatch"]
    return js({**config["lightning_opd"], "seed": int(w.seed), "allow_teacher_mismatch": allow})


# ---- the report's manifest: models, their evaluations and the stages that made them
def stage_entry(stage, pattern):
    return {"stage": stage, "job": pattern or stage, "benchmark": bench(stage, pattern),
            "devices": devices(stage_kind(stage))}


def stage_kind(stage):
    """Which `resources` entry a rule uses."""
    return {"pretrain_teacher": "pretrain", "pretrain_student_base": "pretrain", "sft_data": "generate",
            "rollouts": "generate", "teacher_cache": "generate", "sft": "train", "lightning_opd": "train",
            "standard_opd": "train", "evaluate": "evaluate", "task_data": "light", "prepare_data": "light",
            "tokenizer": "light", "report": "light"}.get(stage, "default")


def report_manifest():
    models = []
    for t, spec in config["teachers"].items():
        models.append({"label": f"teacher-{t}", "role": "teacher", "teacher": t,
                       "cost": [stage_entry("pretrain_teacher", t)] if "build" in spec else []})
    models.append({"label": "student_base", "role": "student_base",
                   "cost": [stage_entry("pretrain_student_base", "")] if "build" in config["student_base"] else []})
    for t in RUNS["sft_teachers"]:
        models.append({"label": f"sft-{t}", "role": "sft", "sft_teacher": t,
                       "cost": [stage_entry("sft_data", t), stage_entry("sft", t)]})
    for sft_t, opd_t, seed in opd_runs():
        pair = f"sft-{sft_t}_teacher-{opd_t}"
        cost = {"lightning": [stage_entry("rollouts", sft_t), stage_entry("teacher_cache", pair),
                              stage_entry("lightning_opd", f"{pair}_seed-{seed}")],
                "standard": [stage_entry("standard_opd", f"{pair}_seed-{seed}")]}
        for method in METHODS:
            label = opd_label(method, sft_t, opd_t, seed)
            models.append({"label": label, "role": f"{method}_opd", "sft_teacher": sft_t, "opd_teacher": opd_t,
                           "seed": seed, "model_dir": f"{R}/models/{label}", "cost": cost[method]})
    for m in models:
        m["evals"] = {b: f"{R}/eval/{b}/{m['label']}.json" for b in BENCHMARKS}
    if "data" in config:
        stages = [stage_entry("prepare_data", split) for split in ("sft", "opd", *(f"eval/{b}" for b in BENCHMARKS))]
    else:
        stages = [stage_entry("task_data", "")]
    if "build" in config["tokenizer"]:
        stages.append(stage_entry("tokenizer", ""))
    stages += [entry for m in models for entry in m["cost"] if entry not in stages]
    stages += [stage_entry("evaluate", f"{b}/{m['label']}") for b in BENCHMARKS for m in models]
    kind = "gpu" if any(res(k)["gpus"] for k in ("generate", "train", "evaluate")) else "cpu"
    return {"experiment": config["experiment"], "device_kind": kind, "models": models, "stages": stages,
            "eval": {"k": config["eval"]["k"], "benchmarks": list(BENCHMARKS)}}


wildcard_constraints:
    teacher="[A-Za-z0-9]+",
    sft_teacher="[A-Za-z0-9]+",
    opd_teacher="[A-Za-z0-9]+",
    seed="[0-9]+",
    model="[A-Za-z0-9_\\-]+",
    benchmark="[A-Za-z0-9_\\-]+",
