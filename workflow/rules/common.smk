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
BACKEND_CODE = ["backends/__init__.py", "backends/base.py", "backends/hf.py", "backends/vllm.py", "sampling.py",
                "logprobs.py"]


def code(*modules):
    return [os.path.relpath(PKG / m) for m in (*modules, *SHARED_CODE)]


def js(obj):
    """A shell-quoted JSON argument; also a stable params value for rerun checks."""
    return shlex.quote(json.dumps(obj, sort_keys=True))


def tracking(stage, label):
    """The --tracking argument of a training rule: the config's `tracking`,
    the run named `<experiment>/<label>` unless `tracking.run_name` says
    otherwise, TensorBoard's event files in an undeclared directory (as the
    checkpoints) under `tracking/<stage>/<label>`."""
    t = config["tracking"]
    template = t.get("run_name") or "{experiment}/{label}"
    try:
        run_name = template.format(experiment=config["experiment"], stage=stage, label=label)
    except (KeyError, IndexError, ValueError) as error:
        raise WorkflowError(f"tracking.run_name {template!r}: not a template of {{experiment}}, {{stage}} "
                            f"and {{label}} ({error!r})") from None
    return js({"report_to": t.get("report_to", []), "project": t.get("project") or config["experiment"],
               "run_name": run_name, "log_dir": f"{R}/tracking/{stage}/{label}"})


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


# ---- the generation stages: artifacts, shards, engines, jobs
GEN_ARTIFACTS = {  # stage: (artifact, schema, job name)
    "sft_data": (f"{R}/sft_data/teacher-{{teacher}}.parquet", "samples", "{teacher}"),
    "rollouts": (f"{R}/rollouts/sft-{{sft_teacher}}.parquet", "samples", "{sft_teacher}"),
    "teacher_cache": (f"{R}/cache/sft-{{sft_teacher}}_teacher-{{opd_teacher}}.parquet", "cache",
                      "sft-{sft_teacher}_teacher-{opd_teacher}"),
}
GEN_STAGES = tuple(GEN_ARTIFACTS)


def gen_option(stage, key):
    """A setting of a generation stage: sft_data and rollouts fall back on `generation`'s."""
    if stage == "teacher_cache":
        return config[stage][key]
    return config[stage].get(key, config["generation"][key])


def engines(stage):
    """The stage's `data_parallel`, as a param that Snakemake leaves out of its
    rerun check (a function of `threads` counts as derived): more engines make
    a stage faster, not different."""
    n = gen_option(stage, "data_parallel")
    return lambda wildcards, threads: n


def split(stage):
    return gen_option(stage, "jobs") > 1


def gen_output(stage, final):
    """The artifact a job of the stage writes: `final`, or when the stage is
    split over jobs, one part of it (joined by the stage's gather rule)."""
    return final.replace(".parquet", ".parts/{scatteritem}.parquet") if split(stage) else final


def gen_job(stage, pattern):
    """Log and benchmark name of a job of the stage (one per part when split)."""
    return f"{pattern}_part-{{scatteritem}}" if split(stage) else pattern


def part_option(wildcards):
    return ["--part", wildcards.scatteritem] if "scatteritem" in wildcards.keys() else []


def gen_entries(stage, pattern):
    """The report's cost entries of a generation stage: its jobs, and its gather job when split."""
    if not split(stage):
        return [stage_entry(stage, pattern)]
    jobs = gen_option(stage, "jobs")
    return [stage_entry(stage, f"{pattern}_part-{i}-of-{jobs}") for i in range(1, jobs + 1)] + [
        stage_entry(f"{stage}_gather", pattern)]


scattergather:
    **{stage: gen_option(stage, "jobs") for stage in GEN_STAGES},


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


def opd_params(w):
    # the mismatch switch reaches only inconsistent runs, so flipping it does
    # not invalidate the consistent ones
    allow = w.sft_teacher != w.opd_teacher and config["allow_teacher_mismatch"]
    return js({**config["lightning_opd"], "seed": int(w.seed), "allow_teacher_mismatch": allow})


# ---- the report's manifest: models, their evaluations and the stages that made them
def stage_entry(stage, pattern):
    return {"stage": stage, "benchmark": bench(stage, pattern), "devices": devices(stage_kind(stage))}


def stage_kind(stage):
    """Which `resources` entry a rule uses."""
    return {"pretrain_teacher": "pretrain", "pretrain_student_base": "pretrain", "sft_data": "generate",
            "rollouts": "generate", "teacher_cache": "generate", "sft": "train", "lightning_opd": "train",
            "standard_opd": "train", "evaluate": "evaluate", "task_data": "light", "prepare_data": "light",
            "tokenizer": "light", "report": "light", "sft_data_gather": "light", "rollouts_gather": "light",
            "teacher_cache_gather": "light"}.get(stage, "default")


def report_manifest():
    models = []
    for t, spec in config["teachers"].items():
        models.append({"label": f"teacher-{t}", "role": "teacher", "teacher": t,
                       "cost": [stage_entry("pretrain_teacher", t)] if "build" in spec else []})
    models.append({"label": "student_base", "role": "student_base",
                   "cost": [stage_entry("pretrain_student_base", "")] if "build" in config["student_base"] else []})
    for t in RUNS["sft_teachers"]:
        models.append({"label": f"sft-{t}", "role": "sft", "sft_teacher": t,
                       "cost": [*gen_entries("sft_data", t), stage_entry("sft", t)]})
    for sft_t, opd_t, seed in opd_runs():
        pair = f"sft-{sft_t}_teacher-{opd_t}"
        cost = {"lightning": [*gen_entries("rollouts", sft_t), *gen_entries("teacher_cache", pair),
                              stage_entry("lightning_opd", f"{pair}_seed-{seed}")],
                "standard": [stage_entry("standard_opd", f"{pair}_seed-{seed}")]}
        for method in METHODS:
            label = opd_label(method, sft_t, opd_t, seed)
            models.append({"label": label, "role": f"{method}_opd", "sft_teacher": sft_t, "opd_teacher": opd_t,
                           "seed": seed, "model_dir": f"{R}/models/{label}", "cost": cost[method]})
    for m in models:
        m["eval"] = f"{R}/eval/{m['label']}.json"
    if "data" in config:
        stages = [stage_entry("prepare_data", split) for split in ("sft", "opd", "eval")]
    else:
        stages = [stage_entry("task_data", "")]
    if "build" in config["tokenizer"]:
        stages.append(stage_entry("tokenizer", ""))
    stages += [entry for m in models for entry in m["cost"] if entry not in stages]
    stages += [stage_entry("evaluate", m["label"]) for m in models]
    kind = "gpu" if any(res(k)["gpus"] for k in ("generate", "train", "evaluate")) else "cpu"
    return {"experiment": config["experiment"], "device_kind": kind, "models": models, "stages": stages,
            "eval": {"k": config["eval"]["k"]}}


wildcard_constraints:
    teacher="[A-Za-z0-9]+",
    sft_teacher="[A-Za-z0-9]+",
    opd_teacher="[A-Za-z0-9]+",
    seed="[0-9]+",
    model="[A-Za-z0-9_\\-]+",
    scatteritem="[0-9]+-of-[0-9]+",
