# Paths, model locations, the rule table (module and kind of resources of every rule),
# code inputs and resources shared by all rules.
import ast
import itertools
import json
import os
import re
import shlex
from pathlib import Path
from typing import NamedTuple

from snakemake.exceptions import WorkflowError

R = f"{config['results_dir']}/{config['experiment']}"
SRC = Path(workflow.basedir).parent / "src"
PKG = SRC / "lightning_opd"
# Jobs run `python -m lightning_opd.<stage>` from this checkout, with or
# without `pip install -e .`, locally, in conda envs and in SLURM jobs alike.
os.environ.update(PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])))


# ---- the table of rules: for each, the module of the package it runs (through the
# multi-process launcher for training) and its kind of resources (`resources.<kind>` of the
# config), written once. The command, code inputs, threads and resources of a rule and the
# report's device counts all come from here.
class Stage(NamedTuple):
    runs: str  # the module, lightning_opd.<runs>
    kind: str
    launched: bool = False


KINDS = ("light", "pretrain", "generate", "train", "evaluate")
STAGES = {
    "task_data": Stage("task_data", "light"),
    "prepare_data": Stage("prepare_data", "light"),
    "tokenizer": Stage("build_tokenizer", "light"),
    "pretrain_teacher": Stage("pretrain", "pretrain", launched=True),
    "pretrain_student_base": Stage("pretrain", "pretrain", launched=True),
    "sft_data": Stage("generate", "generate"),
    "sft": Stage("sft", "train", launched=True),
    "rollouts": Stage("generate", "generate"),
    "teacher_cache": Stage("teacher_cache", "generate"),
    "lightning_opd": Stage("lightning_opd", "train", launched=True),
    # rounds 2.. of multi-round Lightning OPD: the current student's rollouts on its prompt share, scored
    "prompt_share": Stage("prompt_share", "light"),
    "round_rollouts": Stage("generate", "generate"),
    "round_teacher_cache": Stage("teacher_cache", "generate"),
    "standard_opd": Stage("standard_opd", "train", launched=True),
    "evaluate": Stage("evaluate", "evaluate"),
    "report": Stage("report", "light"),
    # a generation stage split over jobs: the job that joins the parts (gather.smk)
    "sft_data_gather": Stage("shards", "light"),
    "rollouts_gather": Stage("shards", "light"),
    "teacher_cache_gather": Stage("shards", "light"),
}
if unknown := {name: s.kind for name, s in STAGES.items() if s.kind not in KINDS}:
    raise WorkflowError(f"STAGES in workflow/rules/common.smk: unknown kind(s) {unknown}; the kinds are {KINDS}")


def stage(name):
    if name not in STAGES:
        raise WorkflowError(
            f"no entry for the rule {name!r} in STAGES of workflow/rules/common.smk; add the "
            f"module it runs and its kind of resources, one of {KINDS}"
        )
    return STAGES[name]


def check_stage_table(rules):
    """Every rule but the target rule `all` runs a module of the table."""
    missing = sorted(r.name for r in rules if r.name != "all" and r.name not in STAGES)
    if missing:
        raise WorkflowError(
            f"rule(s) {missing} have no entry in STAGES (workflow/rules/common.smk): add the "
            f"module each runs and its kind of resources, one of {KINDS}"
        )


# ---- code inputs: the package files a rule's module imports, followed transitively; inputs
# so that an edit of the code reruns the rule (Snakemake does not see it otherwise)
def package_file(name):
    """The file of module or package `name` (dotted, e.g. lightning_opd.backends.hf), or None
    for a name that is not a module (e.g. a function imported from one)."""
    base = SRC.joinpath(*name.split("."))
    return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)


def imported_names(path, name):
    """Absolute names that module `name` (at `path`) imports anywhere, also inside functions.
    `from a import b` gives `a` and `a.b`, since b may be a module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            parent = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            source = ".".join([*parent, *([node.module] if node.module else [])])
            yield source
            yield from (f"{source}.{alias.name}" for alias in node.names)


def import_closure(*modules):
    """The package files that `python -m lightning_opd.<module>` may import: the modules, the
    packages above them (their `__init__.py`) and, transitively, what those import."""
    todo = [f"lightning_opd.{m}" for m in modules]
    found = {}
    while todo:
        parts = todo.pop().split(".")
        if parts[0] != "lightning_opd":
            continue
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b first
            name = ".".join(parts[:i])
            if name not in found and (path := package_file(name)):
                found[name] = path
                todo.extend(imported_names(path, name))
    return sorted(os.path.relpath(p) for p in found.values())


def task_code(task_yaml):
    """The Python an lm-eval task file calls (`!function module.function`): a file beside it, or a
    module of this package with what it imports."""
    files = set()
    for module in re.findall(r"!function\s+([\w.]+)\.\w+", Path(task_yaml).read_text()):
        beside = Path(task_yaml).parent.joinpath(*module.split(".")).with_suffix(".py")
        if beside.is_file():
            files.add(os.path.relpath(beside))
        elif module.startswith("lightning_opd."):
            files.update(import_closure(module.removeprefix("lightning_opd.")))
    return sorted(files)


def code_inputs(name):
    s = stage(name)
    return import_closure(s.runs, *(["launch"] if s.launched else []))


def command(name, pattern=None):
    """The command that starts a rule's module, `python -m lightning_opd.<module>`; for training
    through the launcher (one process, or torchrun with one process per GPU or `processes`,
    across the job's nodes with srun). With the `pattern` of the rule's benchmark file (`bench`),
    the command first writes the devices the job holds beside that file (`held_devices_file`), so
    that the report prices the job as it ran, whatever the config says later."""
    s = stage(name)
    cmd = f"python -m lightning_opd.{s.runs}"
    if s.launched:
        r = res(s.kind)
        processes = r.get("processes") or r["gpus"] or 1
        cmd = (
            f"python -m lightning_opd.launch --nproc-per-node {processes} --nnodes {r.get('nodes', 1)} "
            f"--gpus-per-node {r['gpus']} lightning_opd.{s.runs}"
        )
    record = None if pattern is None else held_devices_file(bench(name, pattern))

    # The processes change how a step is computed, not what (the global batch is the config's, and a
    # rerun resumes from checkpoints of another layout): like the engines of a generation stage, a
    # param function (of `threads`, `resources`) stays out of Snakemake's rerun check.
    def job_command(wildcards, threads, resources):
        if record is None:
            return cmd
        held = job_devices(resources, threads)
        path = record.format(**dict(wildcards.items()))
        return f"mkdir -p {shlex.quote(os.path.dirname(path))} && printf '%s\\n' {held} > {shlex.quote(path)} && {cmd}"

    return job_command


def job_devices(resources, threads):
    """The devices of a job's resources: its GPUs (`gpu`, or `gres` gpu:N per node across nodes), else
    its CPU cores."""
    nodes = getattr(resources, "nodes", 1) or 1
    gpus = getattr(resources, "gpu", 0) or 0
    gres = getattr(resources, "gres", "") or ""
    if not gpus and gres.startswith("gpu:"):
        gpus = int(gres.rsplit(":", 1)[1]) * nodes
    return gpus or threads * nodes


def held_devices_file(benchmark):
    """Where a job records the devices it held (GPUs, else CPU cores) beside its benchmark file."""
    return str(Path(benchmark).with_suffix(".devices"))


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
        raise WorkflowError(
            f"tracking.run_name {template!r}: not a template of {{experiment}}, {{stage}} " f"and {{label}} ({error!r})"
        ) from None
    return js(
        {
            "report_to": t.get("report_to", []),
            "project": t.get("project") or config["experiment"],
            "run_name": run_name,
            "log_dir": f"{R}/tracking/{stage}/{label}",
        }
    )


# data preparation, tokenizer and report: one core and no GPU, whatever `default` says
LIGHT = {"gpus": 0, "cpus": 1, "mem_mb": 4000, "runtime": 60}


def res(kind):
    """Resources of a kind of rule: the config's `resources.default` updated by
    `resources.<kind>`; the `light` kind starts from LIGHT instead."""
    base = LIGHT if kind == "light" else config["resources"]["default"]
    return {**base, **config["resources"].get(kind, {})}


def rule_threads(name):
    return res(stage(name).kind)["cpus"]


def rule_resources(name):
    r = res(stage(name).kind)
    nodes = r.get("nodes", 1)
    out = {"mem_mb": r["mem_mb"], "runtime": r["runtime"], "cpus_per_task": r["cpus"]}
    if nodes == 1:
        if r["gpus"]:
            out["gpu"] = r["gpus"]  # the SLURM plugin asks for --gpus
        return out
    # Across nodes the job's command starts one launcher per node itself (lightning_opd.launch: srun +
    # torchrun). The SLURM jobstep plugin runs an `mpi` job's command as it is; any other it wraps in a
    # one-task step, which SLURM keeps on one node.
    # tasks_per_gpu 0: the SLURM plugin would take `tasks` as --ntasks-per-gpu for a GPU job (tasks x GPUs)
    out.update(nodes=nodes, mpi="srun", tasks=nodes, tasks_per_gpu=0)
    if r["gpus"]:
        out["gres"] = f"gpu:{r['gpus']}"  # per node (the plugin's --gpus counts the whole job's)
    return out


def devices(name):
    """Devices a rule's job holds, for device-hours: GPUs if it has any, else CPU cores."""
    r = res(stage(name).kind)
    return (r["gpus"] or r["cpus"]) * r.get("nodes", 1)


def bench(name, pattern=""):
    return f"{R}/benchmarks/{name}/{pattern or name}.tsv"


def logfile(name, pattern=""):
    return f"{R}/logs/{name}/{pattern or name}.log"


# ---- models: built by this pipeline (a path under R) or given (hub id / path)
def model_path(spec, built_at):
    """A built model's directory, or the given hub id / path (``org/name@revision`` with a revision)."""
    if "build" in spec:
        return built_at
    return f"{spec['path']}@{spec['revision']}" if spec.get("revision") else spec["path"]


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
    "teacher_cache": (
        f"{R}/cache/sft-{{sft_teacher}}_teacher-{{opd_teacher}}.parquet",
        "cache",
        "sft-{sft_teacher}_teacher-{opd_teacher}",
    ),
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
        stage_entry(f"{stage}_gather", pattern)
    ]


scattergather:
    **{stage: gen_option(stage, "jobs") for stage in GEN_STAGES},


# ---- the OPD runs: (SFT teacher, OPD teacher, seed)
RUNS = config["runs"]


def opd_runs():
    for sft_t, opd_t, seed in itertools.product(RUNS["sft_teachers"], RUNS["opd_teachers"], RUNS["seeds"]):
        if sft_t != opd_t and not config["allow_teacher_mismatch"]:
            continue
        yield sft_t, opd_t, seed


# Each Lightning OPD variant is lightning_opd with its changes: checked as lightning_opd is.
def check_lightning_runs():
    import jsonschema
    import yaml

    schema = yaml.safe_load(open(f"{workflow.basedir}/schemas/config.schema.yaml"))
    fields_schema = {"$defs": schema["$defs"], **schema["properties"]["lightning_opd"]}
    cache_k = config["teacher_cache"].get("top_k", 0)
    if unknown := [n for n in config["runs"].get("variants", []) if n not in config["lightning_variants"]]:
        raise WorkflowError(
            f"runs.variants: {unknown} are not defined under lightning_variants (defined: "
            f"{sorted(config['lightning_variants'])}); define them there or remove them from runs.variants"
        )
    runs = {"lightning_opd": {}, **{f"lightning_variants.{n}": c for n, c in config["lightning_variants"].items()}}
    for where, changes in runs.items():
        coerce_types(changes, fields_schema)  # a variant's fields are typed as lightning_opd's
        fields = {**config["lightning_opd"], **changes}
        errors = sorted(jsonschema.Draft202012Validator(fields_schema).iter_errors(fields), key=str)
        if errors:
            error = errors[0]
            at = ".".join(map(str, error.path)) or "(the variant)"
            raise WorkflowError(f"{where}: {at}: {error.message} (a variant takes the fields of lightning_opd)")
        k = fields.get("top_k") or cache_k
        runs_it = where == "lightning_opd" or where.partition(".")[2] in config["runs"].get("variants", [])
        if runs_it and where != "lightning_opd" and fields == config["lightning_opd"]:
            raise WorkflowError(
                f"{where}: {changes or 'no change'} leaves every field of lightning_opd as it is: the variant would "
                "train the main run's model again; change a field or remove it from runs.variants"
            )
        if runs_it and fields.get("loss", "sampled") != "sampled" and not 1 <= k <= cache_k:
            raise WorkflowError(
                f"{where}: loss {fields['loss']} over the teacher's top {k or 'k'} tokens needs a cache of them, "
                f"but teacher_cache.top_k is {cache_k}: set teacher_cache.top_k to at least {k or 1} or lower top_k"
            )
        if runs_it and 0 < fields.get("max_steps", -1) < fields.get("rounds", 1):
            raise WorkflowError(
                f"{where}: max_steps {fields['max_steps']} < rounds {fields['rounds']}: the rounds share the steps; "
                "raise max_steps or lower rounds"
            )
        if runs_it and "data" not in config and fields.get("rounds", 1) > config["task"]["n_opd"]:
            raise WorkflowError(
                f"{where}: rounds {fields['rounds']} > task.n_opd {config['task']['n_opd']}: every round needs "
                "prompts; lower rounds or raise task.n_opd"
            )


check_lightning_runs()


# ---- Lightning OPD: the main run ("") and the variants of `lightning_variants` ("-<name>"), each
# the fields of lightning_opd with the variant's changes; a run of R rounds ends in its model and
# leaves rounds 1..R-1 at <model>_round-<i>
LIGHTNING = {
    "": config["lightning_opd"],
    **{
        f"-{name}": {**config["lightning_opd"], **config["lightning_variants"][name]}
        for name in RUNS.get("variants", [])
    },
}
METHODS = [f"lightning{variant}" for variant in LIGHTNING] + (["standard"] if config["standard_opd"]["enabled"] else [])


def run_methods(sft_t, opd_t):
    """The methods of an OPD run: the variants only where the teachers are consistent (the
    inconsistent pairs are the consistency ablation of the main methods)."""
    return [m for m in METHODS if sft_t == opd_t or not m.startswith("lightning-")]


def opd_label(method, sft_t, opd_t, seed):
    return f"{method}-sft-{sft_t}_teacher-{opd_t}_seed-{seed}"


def rounds_of(w):
    return LIGHTNING[w.variant].get("rounds", 1)


# Scheduling priority of the rules on the DAG's longest path (`priority:`, highest first): an R-round
# Lightning OPD run is a chain of 3R - 2 jobs after the cache, so the cache, its rollouts and the
# longest chains start before the other Lightning OPD jobs and run beside them instead of alone at the end.
CHAIN_PRIORITY = max(run.get("rounds", 1) for run in LIGHTNING.values())
# A standard OPD run is one job at least as long as the longest of those chains (it samples, scores and
# trains every step): the longest jobs go first, so that the short Lightning OPD jobs fill the cores at the end.
STANDARD_PRIORITY = CHAIN_PRIORITY + 1


def round_index(w):
    """The round a Lightning OPD job trains: the last one for the run's model, I for <model>_round-<I>."""
    if not w.round:
        return rounds_of(w)
    i = int(w.round.removeprefix("_round-"))
    if not 1 <= i < rounds_of(w):
        raise WorkflowError(f"{w.round}: lightning{w.variant} has rounds 1..{rounds_of(w)}; its last one is the model")
    return i


def round_model(w, i):
    """Round i's model of the run of `w` (the last round's is the run's model)."""
    label = opd_label(f"lightning{w.variant}", w.sft_teacher, w.opd_teacher, w.seed)
    return f"{R}/models/{label}" + ("" if i == rounds_of(w) else f"_round-{i}")


def round_artifact(kind, w, i):
    """Rollouts (kind "rollouts") or teacher cache ("cache") of round i > 1 of the run of `w`."""
    label = opd_label(f"lightning{w.variant}", w.sft_teacher, w.opd_teacher, w.seed)
    return f"{R}/{kind}/{label}_round-{i}.parquet"


def prompt_share(i, n):
    return f"{R}/data/opd_shares/share-{i}-of-{n}.parquet"


def lightning_init(w):
    i = round_index(w)
    return f"{R}/models/sft-{w.sft_teacher}" if i == 1 else round_model(w, i - 1)


def lightning_cache(w):
    """Round 1 trains on pi_ref's cache (of its share of prompts when there are rounds after it)."""
    i = round_index(w)
    return f"{R}/cache/sft-{w.sft_teacher}_teacher-{w.opd_teacher}.parquet" if i == 1 else round_artifact("cache", w, i)


def round_sampling(w):
    """rollouts.sampling, seeded per run and round"""
    sampling = config["rollouts"]["sampling"]
    return js({**sampling, "seed": sampling["seed"] + 1000 * int(w.i) + int(w.seed)})


def lightning_share(w):
    return [prompt_share(1, rounds_of(w))] if round_index(w) == 1 and rounds_of(w) > 1 else []


def opd_labels():
    return [opd_label(method, *run) for run in opd_runs() for method in run_methods(*run[:2])]


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


def drift_prompts_input():
    """The held-out problems the OPD trainings log their drift on (the first benchmark's); none with
    opd_drift.n_prompts 0, so that a re-prepared evaluation set does not retrain the OPD models."""
    return eval_data(next(iter(BENCHMARKS))) if config["opd_drift"]["n_prompts"] else []


def dataset(split):
    """`data.<split>`; `eval/<benchmark>` is the benchmark's entry of `data.eval`."""
    kind, _, benchmark = split.partition("/")
    return config["data"]["eval"][benchmark] if kind == "eval" else config["data"][split]


for task, task_yaml in zip(config["eval"]["tasks"], BENCHMARKS.values()):
    if not task_yaml.is_file():
        raise WorkflowError(
            f"eval.tasks: {task!r}: {task_yaml} not found (give a task of "
            f"{PKG / 'lm_eval_tasks'} by name, or a path to a task yaml)"
        )
if len(BENCHMARKS) != len(config["eval"]["tasks"]):
    raise WorkflowError(
        f"eval.tasks {config['eval']['tasks']}: two tasks share a name (a task yaml's file stem " "names its benchmark)"
    )
if "data" in config and set(config["data"]["eval"]) != set(BENCHMARKS):
    raise WorkflowError(
        f"data.eval has datasets for {sorted(config['data']['eval'])} but eval.tasks names the "
        f"benchmarks {list(BENCHMARKS)}: give data.eval one dataset per benchmark, by its name"
    )


def eval_task_code(benchmark):
    """The Python a benchmark's task file calls: inputs, so that an edit reruns its evaluation."""
    return task_code(BENCHMARKS[benchmark])


def opd_fields(fields, w):
    """A training's OPDParams: the fields without `rounds` (the DAG's business), with the run's seed.
    The mismatch switch reaches only inconsistent runs, so flipping it does not invalidate the
    consistent ones."""
    allow = w.sft_teacher != w.opd_teacher and config["allow_teacher_mismatch"]
    fields = {k: v for k, v in fields.items() if k != "rounds"}
    return {**fields, "seed": int(w.seed), "allow_teacher_mismatch": allow}


def opd_params(w):
    """A Lightning OPD job's fields; a round of several with max_steps takes its part of the steps."""
    fields = opd_fields(LIGHTNING[w.variant], w)
    rounds, i = rounds_of(w), round_index(w)
    if rounds > 1 and fields.get("max_steps", -1) > 0:
        fields["max_steps"] = fields["max_steps"] * i // rounds - fields["max_steps"] * (i - 1) // rounds
    return js(fields)


def standard_opd_params(w):
    """Lightning OPD's fields without its loss choice: standard OPD trains with the sampled loss (and a
    change of lightning_opd.loss does not rerun it)."""
    return js({k: v for k, v in opd_fields(config["lightning_opd"], w).items() if k not in ("loss", "top_k")})


# ---- the report's manifest: models, their evaluations and the stages that made them
def stage_entry(name, pattern):
    return {"stage": name, "job": pattern or name, "benchmark": bench(name, pattern), "devices": devices(name)}


def lightning_cost(variant, rounds, sft_t, opd_t, seed):
    """The stages of a Lightning OPD run: pi_ref's rollouts and their cache (the share its first
    round trains on, 1/rounds of their rows), then per round its training and, after the first,
    the prompt share, fresh rollouts and cache it trains on."""
    pair = f"sft-{sft_t}_teacher-{opd_t}"
    run = f"{pair}_seed-{seed}{variant}"
    label = opd_label(f"lightning{variant}", sft_t, opd_t, seed)
    entries = [{**e, "share": 1 / rounds} for e in gen_entries("rollouts", sft_t) + gen_entries("teacher_cache", pair)]
    for i in range(1, rounds + 1):
        suffix = "" if i == rounds else f"_round-{i}"
        if rounds > 1:
            entries.append(stage_entry("prompt_share", f"share-{i}-of-{rounds}"))
        if i > 1:
            entries += [stage_entry(s, f"{label}_round-{i}") for s in ("round_rollouts", "round_teacher_cache")]
        entries.append(stage_entry("lightning_opd", f"{run}{suffix}"))
    return [{k: v for k, v in e.items() if k != "share" or v != 1} for e in entries]


def report_manifest():
    models = []
    for t, spec in config["teachers"].items():
        models.append(
            {
                "label": f"teacher-{t}",
                "role": "teacher",
                "teacher": t,
                "cost": [stage_entry("pretrain_teacher", t)] if "build" in spec else [],
                **({"model_dir": f"{R}/models/teacher-{t}"} if "build" in spec else {}),
            }
        )
    models.append(
        {
            "label": "student_base",
            "role": "student_base",
            "cost": [stage_entry("pretrain_student_base", "")] if "build" in config["student_base"] else [],
            **({"model_dir": f"{R}/models/student_base"} if "build" in config["student_base"] else {}),
        }
    )
    for t in RUNS["sft_teachers"]:
        models.append(
            {
                "label": f"sft-{t}",
                "role": "sft",
                "sft_teacher": t,
                "model_dir": f"{R}/models/sft-{t}",
                "cost": [*gen_entries("sft_data", t), stage_entry("sft", t)],
            }
        )
    for sft_t, opd_t, seed in opd_runs():
        pair = f"sft-{sft_t}_teacher-{opd_t}"
        cost = {"standard": [stage_entry("standard_opd", f"{pair}_seed-{seed}")]}
        for variant, fields in LIGHTNING.items():  # (a variant of an inconsistent pair does not run)
            cost[f"lightning{variant}"] = lightning_cost(variant, fields.get("rounds", 1), sft_t, opd_t, seed)
        for method in run_methods(sft_t, opd_t):
            label = opd_label(method, sft_t, opd_t, seed)
            variant = method.partition("-")[2]
            models.append(
                {
                    "label": label,
                    "role": f"{method.partition('-')[0]}_opd",
                    "variant": variant,
                    "variant_fields": config["lightning_variants"].get(variant, {}),
                    "sft_teacher": sft_t,
                    "opd_teacher": opd_t,
                    "seed": seed,
                    "model_dir": f"{R}/models/{label}",
                    "cost": cost[method],
                }
            )
    for m in models:
        m["evals"] = {b: f"{R}/eval/{b}/{m['label']}.json" for b in BENCHMARKS}
    if "data" in config:
        stages = [stage_entry("prepare_data", split) for split in ("sft", "opd", *(f"eval/{b}" for b in BENCHMARKS))]
    else:
        stages = [stage_entry("task_data", "")]
    # built only for the models the pipeline pretrains: with every model given by `path`, no job makes it
    if "build" in config["tokenizer"] and any(e["stage"].startswith("pretrain_") for m in models for e in m["cost"]):
        stages.append(stage_entry("tokenizer", ""))
    for entry in (e for m in models for e in m["cost"]):
        if (whole := {k: v for k, v in entry.items() if k != "share"}) not in stages:
            stages.append(whole)
    stages += [stage_entry("evaluate", f"{b}/{m['label']}") for b in BENCHMARKS for m in models]
    kind = "gpu" if any(res(k)["gpus"] for k in ("generate", "train", "evaluate")) else "cpu"
    return {
        "experiment": config["experiment"],
        "device_kind": kind,
        "models": models,
        "caches": sorted({f"{R}/cache/sft-{s}_teacher-{t}.parquet" for s, t, _ in opd_runs()}),
        "stages": stages,
        "eval": {"k": config["eval"]["k"], "benchmarks": list(BENCHMARKS)},
    }


def dataset_options(spec):
    """The command-line options of a `data.<split>` entry (quoted in the shell by :q)."""
    flags = {
        "split": "--split",
        "revision": "--revision",
        "problem_field": "--problem-field",
        "problem_regex": "--problem-regex",
        "answer_field": "--answer-field",
        "seed": "--seed",
        "limit": "--limit",
    }
    return [arg for key, flag in flags.items() if spec.get(key) is not None for arg in (flag, str(spec[key]))]


wildcard_constraints:
    teacher="[A-Za-z0-9]+",
    sft_teacher="[A-Za-z0-9]+",
    opd_teacher="[A-Za-z0-9]+",
    seed="[0-9]+",
    variant="(-[a-z][a-z0-9]*)?",
    round="(_round-[0-9]+)?",
    i="[0-9]+",
    n="[0-9]+",
    model="[A-Za-z0-9_\\-]+",
    benchmark="[A-Za-z0-9_\\-]+",
    scatteritem="[0-9]+-of-[0-9]+",


# ---- the planner: every run (dry runs included) prints its per-stage prediction, and a config that
# cannot fit the declared memory is refused before anything runs
def plan_or_refuse():
    import sys

    from snakemake.exceptions import WorkflowError

    sys.path.insert(0, str(SRC))
    from lightning_opd.plan import PlanError, batch_errors, check, plan, report

    if errors := batch_errors(config):
        raise WorkflowError("batches that the training jobs would refuse:\n  " + "\n  ".join(errors))
    try:
        plans = plan(config)
    except PlanError as error:  # a model the planner cannot size: say so, do not refuse
        print(f"plan: not planned: {error}", file=sys.stderr)
        return
    print(report(plans), file=sys.stderr)  # at parse time: whether this is a dry run is not known yet
    try:
        check(plans, f"experiment {config['experiment']}")
    except PlanError as error:
        raise WorkflowError(str(error))


def eval_backend_options(label):
    """The engine layout of a model's evaluation: the teachers' own where given
    (a 32B teacher may need tensor parallel where a student runs data parallel)."""
    teacher = config["eval"].get("teacher_backend_options")
    if label.startswith("teacher-") and teacher is not None:
        return teacher
    return config["eval"]["backend_options"]


if workflow.is_main_process:
    plan_or_refuse()
