"""The config as a user gives it: every key of the schema documented in config/README.md, and
numbers in scientific notation accepted from config files and from nested `--config` values
(which Snakemake passes as strings)."""
from __future__ import annotations

import json
import re

import pytest
import yaml

from test_pipeline import REPO, copy_repo, default_config, merge, planned_jobs, snakemake, write_yaml

SCHEMA = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
README = (REPO / "config/README.md").read_text()


def schema_keys(node) -> set[str]:
    """Every property name anywhere in the schema, $defs included."""
    keys = set()
    if isinstance(node, dict):
        keys |= set(node.get("properties", {}))
        for value in node.values():
            keys |= schema_keys(value)
    elif isinstance(node, list):
        for value in node:
            keys |= schema_keys(value)
    return keys


def schema_descriptions(node) -> list[str]:
    if isinstance(node, dict):
        found = [node["description"]] if isinstance(node.get("description"), str) else []
        return found + [d for value in node.values() for d in schema_descriptions(value)]
    if isinstance(node, list):
        return [d for value in node for d in schema_descriptions(value)]
    return []


def test_readme_documents_every_config_key():
    documented = set(re.findall(r"`([A-Za-z_][\w.]*)`", README))
    documented |= {part for key in documented for part in key.split(".")}
    missing = sorted(schema_keys(SCHEMA) - documented)
    assert not missing, f"config/README.md does not document {missing}"


def test_readme_agrees_with_the_schema_descriptions():
    """What the schema says of a key is what the README says (word for word, up to markdown)."""
    text = " ".join(README.replace("\\|", "|").replace("`", "").split())
    differing = [d for d in schema_descriptions(SCHEMA) if " ".join(d.replace("`", "").split()) not in text]
    assert not differing, f"schema descriptions not in config/README.md: {differing}"


def opd_hyperparameters(dry_run_output: str) -> dict:
    """The --opd JSON that the Lightning OPD job of a `snakemake -n -p` gets."""
    command = next(line for line in dry_run_output.splitlines()
                   if "lightning_opd.lightning_opd " in line and "/models/lightning-sft-" in line)
    return json.loads(re.search(r"--opd '([^']*)'", command).group(1))


def test_scientific_notation_in_a_config_file(tmp_path):
    # written by hand: YAML 1.1 reads 1e-5 (no dot) as the string "1e-5"
    override = tmp_path / "o.yaml"
    override.write_text(
        f"results_dir: {tmp_path / 'results'}\nlightning_opd: {{learning_rate: 1e-5, max_steps: 2e1}}\n"
    )
    assert yaml.safe_load(override.read_text())["lightning_opd"]["learning_rate"] == "1e-5"
    opd = opd_hyperparameters(snakemake("-n", "-p", "--configfile", str(override)).stdout)
    assert opd["learning_rate"] == 1e-5 and opd["max_steps"] == 20 and isinstance(opd["max_steps"], int)


def test_scientific_notation_and_other_typed_values_in_nested_config(tmp_path):
    result = snakemake(
        "-n",
        "-p",
        "--config",
        f"results_dir={tmp_path / 'results'}",
        # packed micro-batches of 16 sequences: the whole batch of 64 in one packed row would not fit the
        # default's 4 GB on the CPU (the planner counts its attention scores)
        "lightning_opd={learning_rate: 2.0e-5, tau: null, packing: true, micro_batch_size: 16, epochs: 3}",
    )
    opd = opd_hyperparameters(result.stdout)
    assert opd["learning_rate"] == 2e-5 and opd["tau"] is None and opd["packing"] is True and opd["epochs"] == 3
    assert opd["micro_batch_size"] == 16
    assert opd["adam_beta2"] == 0.98  # the other keys of config/config.yaml stay
    assert not (tmp_path / "results").exists()


def test_a_nested_override_reruns_what_it_changes(tiny_run):
    """The same value written as 6e-4 in --config and as 6.0e-4 in the config: nothing to do."""
    work, config = tiny_run
    assert (
        planned_jobs(snakemake("-n", *config, "--config", "lightning_opd={learning_rate: 6e-4}", cwd=work).stdout) == {}
    )


@pytest.mark.parametrize(
    "override, message, key",
    [
        ("eval={k: 2.5}", "'2.5' is not of type 'integer'", "['eval']['k']"),
        (
            "lightning_opd={learning_rate: 1e-5x}",
            "'1e-5x' is not of type 'number'",
            "['lightning_opd']['learning_rate']",
        ),
        ("sft={keep_unfinished: maybe}", "'maybe' is not of type 'boolean'", "['sft']['keep_unfinished']"),
        (
            "chat_template_kwargs={enable_thinking: maybe}",
            "'maybe' is not of type 'boolean'",
            "['chat_template_kwargs']['enable_thinking']",
        ),
    ],
)
def test_values_of_the_wrong_type_are_refused_with_the_key(override, message, key, tmp_path):
    result = snakemake("-n", "--config", f"results_dir={tmp_path / 'results'}", override, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Error validating config file" in output and message in output and f"On instance{key}" in output


def test_a_misspelt_key_of_a_model_entry_is_refused(tmp_path):
    """`revison` beside a hub id would otherwise leave the revision unpinned: the hub's newest would be taken."""
    misspelt = {"path": "Qwen/Qwen3-4B-Base", "revison": "abc123"}
    override = write_yaml(tmp_path / "model.yaml", {"results_dir": str(tmp_path / "results"), "student_base": misspelt})
    result = snakemake("-n", "--configfile", "config/paper/qwen3-4b.yaml", str(override), check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Error validating config file" in output
    assert "Additional properties are not allowed ('revison' was unexpected)" in output, output[-3000:]


def test_top_k_options_reach_the_cache_and_lightning_opd_but_not_standard_opd(tmp_path):
    result = snakemake("-n", "-p", "--config", f"results_dir={tmp_path / 'results'}", "teacher_cache={top_k: 16}",
                       "lightning_opd={loss: topk_forward_kl, top_k: 4}")
    opd = opd_hyperparameters(result.stdout)
    assert opd["loss"] == "topk_forward_kl" and opd["top_k"] == 4
    cache = next(line for line in result.stdout.splitlines() if "lightning_opd.teacher_cache " in line)
    assert "--top-k 16 " in cache
    standard = next(line for line in result.stdout.splitlines() if "lightning_opd.standard_opd " in line)
    standard_opd = json.loads(re.search(r"--opd '([^']*)'", standard).group(1))
    assert "loss" not in standard_opd and "top_k" not in standard_opd  # it trains with the sampled loss


def test_variants_train_with_their_fields_and_rounds_stay_in_the_dag(tmp_path):
    result = snakemake("-n", "-p", "--config", f"results_dir={tmp_path / 'results'}",
                       "runs={variants: [topk16, rounds4]}")
    commands = [line for line in result.stdout.splitlines() if "lightning_opd.lightning_opd " in line]
    opd = {re.search(r"--out \S*/models/(\S+)", c).group(1): json.loads(re.search(r"--opd '([^']*)'", c).group(1))
           for c in commands}
    assert set(opd) == {"lightning-sft-A_teacher-A_seed-0", "lightning-topk16-sft-A_teacher-A_seed-0",
                        "lightning-rounds4-sft-A_teacher-A_seed-0",
                        *(f"lightning-rounds4-sft-A_teacher-A_seed-0_round-{i}" for i in (1, 2, 3))}
    assert opd["lightning-topk16-sft-A_teacher-A_seed-0"]["loss"] == "topk_reverse_kl"
    assert opd["lightning-topk16-sft-A_teacher-A_seed-0"]["top_k"] == 16
    assert all("rounds" not in fields and fields["loss"] == "sampled"
               for label, fields in opd.items() if "topk16" not in label)
    assert planned_jobs(result.stdout)["round_rollouts"] == 3


@pytest.mark.parametrize("override, message", [
    ("runs={variants: [topk3]}", "runs.variants: ['topk3'] are not defined under lightning_variants"),
    ("lightning_variants={topk4: {top_k: 0}}", "lightning_variants.topk4: top_k: 0 is less than the minimum of 1"),
    ("teacher_cache={top_k: 8}", "lightning_variants.topk16: loss topk_reverse_kl over the teacher's top 16 tokens"),
    ("lightning_variants={rounds2: {rounds: 1}}", "lightning_variants.rounds2: {'rounds': 1} leaves every field of "
                                                  "lightning_opd as it is"),
])
def test_a_bad_variant_is_refused_with_its_key(override, message, tmp_path):
    result = snakemake("-n", "--config", f"results_dir={tmp_path / 'results'}", override, check=False)
    assert result.returncode != 0 and message in result.stdout + result.stderr, (result.stdout + result.stderr)[-800:]


@pytest.mark.parametrize("overrides, message", [
    (["lightning_opd={batch_size: 10, micro_batch_size: 4}"],
     "lightning_opd: batch_size 10 is not a multiple of micro_batch_size 4 x 1 processes (resources.train)"),
    (["lightning_opd={batch_size: 240, micro_batch_size: 6}", "standard_opd={sampling: {n: 4}}"],
     "standard_opd: --opd micro_batch_size (config lightning_opd.micro_batch_size) 6: standard OPD's micro-batch "
     "counts sequences and every prompt gives n = 4 of them"),
    (["sft={train: {batch_size: 32, micro_batch_size: 12}}"],
     "sft.train: batch_size 32 is not a multiple of micro_batch_size 12"),
    (["resources={train: {processes: 3}}"],
     "lightning_opd: batch_size 256 is not a multiple of micro_batch_size 32 x 3"),
])
def test_a_batch_the_training_jobs_would_refuse_is_refused_before_any_job(overrides, message, tmp_path):
    result = snakemake("-n", "--config", f"results_dir={tmp_path / 'results'}", *overrides, check=False)
    assert result.returncode != 0 and message in result.stdout + result.stderr, (result.stdout + result.stderr)[-800:]


def test_an_unknown_loss_is_refused_with_the_key(tmp_path):
    result = snakemake("-n", "--config", f"results_dir={tmp_path / 'results'}", "lightning_opd={loss: topk_kl}",
                       check=False)
    assert result.returncode != 0 and "loss" in result.stdout + result.stderr
    assert "topk_kl" in result.stdout + result.stderr


@pytest.mark.parametrize("text, key", [("lightning_opd: {learning_rate: .nan}\n", "lightning_opd.learning_rate"),
                                       ("lightning_variants: {topk4: {tau: .inf}}\n", "lightning_variants.topk4.tau")])
def test_a_non_finite_number_in_a_config_file_is_refused_with_its_key(text, key, tmp_path):
    override = tmp_path / "o.yaml"
    override.write_text(f"results_dir: {tmp_path / 'results'}\n{text}")  # YAML reads .nan and .inf as floats
    result = snakemake("-n", "--configfile", str(override), check=False)
    assert result.returncode != 0 and f"{key}: not a finite number" in result.stdout + result.stderr
    assert not (tmp_path / "results").exists()


def shell_commands(dry_run_output: str, module: str) -> list[str]:
    return [line for line in dry_run_output.splitlines() if f" lightning_opd.{module} " in line]  # -m or launched


def quoted_json(command: str, option: str):
    return json.loads(re.search(f"{option} '([^']*)'", command).group(1))


def test_free_form_values_and_the_thinking_switch_reach_the_jobs_typed(tmp_path):
    """Values of free-form mappings read as numbers and booleans, from a config file (YAML 1.1 reads
    9e-1 as a string) and from a nested --config (every value a string); enable_thinking: false
    reaches every stage as JSON false, not the string "false" (which a chat template takes as true)."""
    override = tmp_path / "o.yaml"
    override.write_text(f"results_dir: {tmp_path / 'results'}\n"
                        "eval: {backend_options: {gpu_memory_utilization: 9e-1, enforce_eager: true}}\n")
    result = snakemake("-n", "-p", "--configfile", str(override), "--config",
                       "chat_template_kwargs={enable_thinking: false, reasoning: low}",
                       "eval={think_end_token: </think>}",
                       "rollouts={backend_options: {batch_size: 8, dtype: float32}}",
                       "lightning_opd={fsdp: {version: 2, activation_checkpointing: false}}",
                       "standard_opd={sampler_options: {gpu_memory_utilization: 9e-1, enable_sleep_mode: true}}")
    templated = re.findall(r"--chat-template-kwargs '([^']*)'", result.stdout)
    assert len(templated) >= 5 and set(templated) == {'{"enable_thinking": false, "reasoning": "low"}'}
    evaluate = shell_commands(result.stdout, "evaluate")
    assert evaluate and all("--think-end-token '</think>'" in c for c in evaluate)
    assert {json.dumps(quoted_json(c, "--backend-options")) for c in evaluate} == {
        '{"enforce_eager": true, "gpu_memory_utilization": 0.9}'}  # JSON: no 1 for true, no "0.9" for 0.9
    rollouts = [c for c in shell_commands(result.stdout, "generate") if "/rollouts/sft-" in c]
    assert rollouts and {json.dumps(quoted_json(c, "--backend-options")) for c in rollouts} == {
        '{"batch_size": 8, "dtype": "float32"}'}
    assert json.dumps(opd_hyperparameters(result.stdout)["fsdp"], sort_keys=True) == \
        '{"activation_checkpointing": false, "version": 2}'
    standard = shell_commands(result.stdout, "standard_opd")
    assert standard and {json.dumps(quoted_json(c, "--sampler-options")) for c in standard} == {
        '{"enable_sleep_mode": true, "gpu_memory_utilization": 0.9}'}


def test_thinking_without_a_think_end_token_is_refused_before_any_job(tmp_path):
    result = snakemake("-n", "--config", f"results_dir={tmp_path / 'results'}",
                       "chat_template_kwargs={enable_thinking: true}", check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "chat_template_kwargs.enable_thinking is true but eval.think_end_token is not set" in output
    assert "set eval.think_end_token" in output and "Job stats" not in output
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("override, message", [
    ("teacher_cache={backend: vllm, temperature: 0.8}", "teacher_cache.temperature 0.8: the vllm backend scores "
                                                        "at temperature 1.0 only"),
    ("teacher_cache={backend: vllm, backend_options: {enable_prefix_caching: true}}",
     "teacher_cache.backend_options.enable_prefix_caching: must be off for teacher scoring"),
])
def test_what_the_vllm_scorer_refuses_is_refused_before_any_job(override, message, tmp_path):
    result = snakemake("-n", "--config", f"results_dir={tmp_path / 'results'}", override, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and message in output and "Job stats" not in output
    assert not (tmp_path / "results").exists()


def test_a_rule_missing_from_the_stage_table_is_refused(tmp_path):
    work = copy_repo(tmp_path / "work")
    with open(work / "workflow/rules/report.smk", "a") as rules:
        rules.write('\n\nrule unlisted:\n    output:\n        "x.txt",\n    shell:\n        "touch {output}"\n')
    result = snakemake("-n", "--config", f"results_dir={tmp_path / 'results'}", cwd=work, check=False)
    assert result.returncode != 0
    assert "rule(s) ['unlisted'] have no entry in STAGES" in result.stdout + result.stderr


# ---- the default column of config/README.md's tables: a cell that starts with a backtick is
# "`value`", or several "`value` in `section`" joined by "; ", each checked against config/config.yaml
# (the training fields: against TrainParams, and OPDParams in `lightning_opd`); other cells are prose
CONFIG = yaml.safe_load((REPO / "config/config.yaml").read_text())
# the sections of config/config.yaml that each table (by the start of its heading) documents
TABLE_SECTIONS = {
    "Experiment and task": ["experiment", "results_dir", "task", "data", "prompt_template"],
    "Prompts and tracking": ["chat_template_kwargs", "tracking"],
    "Models": ["tokenizer", "teachers", "student_base"],
    "Runs": ["runs", "allow_teacher_mismatch"],
    "Stages": ["generation", "sft_data", "sft", "rollouts", "teacher_cache", "lightning_opd", "lightning_variants",
               "standard_opd", "opd_drift", "eval"],
    "Sampling": ["sft_data.sampling", "rollouts.sampling", "standard_opd.sampling", "opd_drift"],
    "Evaluation": ["eval"],
    "Resources": ["resources"],
}
TRAINING_TABLE = "Training fields"
SEGMENT = r"`([^`]+)`(?: in `([\w.]+)`)?"


def module_defaults() -> dict[str, object]:
    """Defaults of keys that config/config.yaml leaves out: what the module that reads them uses."""
    from lightning_opd.hparams import SAMPLER_ENGINE_DEFAULTS
    from lightning_opd.plan import DEFAULT_GPU_MEM_GB
    from test_defaults import cli_defaults

    return {"split": cli_defaults("prepare_data")["split"], "gpu_mem_gb": DEFAULT_GPU_MEM_GB,
            "nodes": cli_defaults("launch")["nnodes"], **SAMPLER_ENGINE_DEFAULTS}


def readme_defaults() -> list[tuple[str, str, str]]:
    """(table heading, key, default cell) of every table row whose default cell starts with a backtick."""
    rows, heading = [], ""
    for line in README.splitlines():
        if line.startswith("#"):
            heading = line.lstrip("# ")
        elif line.startswith("| `"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            if cells[2].startswith("`"):
                rows.append((heading, re.match(r"`([^`]+)`", cells[0]).group(1), cells[2]))
    return rows


def config_paths(node, path=()):
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from config_paths(value, (*path, key))


def canonical(value):
    """A value to compare: 2 and 2.0 are the same number, but true is not 1."""
    if isinstance(value, dict):
        return {k: canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [canonical(v) for v in value]
    return (type(value).__name__ if isinstance(value, bool | str | None) else "number", value)


def test_readme_defaults_are_the_embedded_config_and_the_dataclass_defaults():
    from lightning_opd.hparams import OPDParams, TrainParams

    modules = module_defaults()
    checked, wrong = 0, []
    for heading, key, cell in readme_defaults():
        assert re.fullmatch(f"{SEGMENT}(; {SEGMENT})*", cell), f"config/README.md, {key}: default {cell!r} unreadable"
        segments = [(m.group(1), m.group(2)) for m in re.finditer(SEGMENT, cell)]
        if heading.startswith(TRAINING_TABLE):
            scoped = {scope for _, scope in segments if scope}
            assert scoped <= {"lightning_opd"}, f"config/README.md, {key}: training fields are in lightning_opd or not"
            train, opd = (("TrainParams",), getattr(TrainParams(), key)), (("OPDParams",), getattr(OPDParams(), key))
            places = {"": [train] if scoped else [train, opd], "lightning_opd": [opd]}
        else:
            sections = next(s for table, s in TABLE_SECTIONS.items() if heading.startswith(table))
            parts = tuple(key.split("."))
            candidates = [(path, value) for path, value in config_paths(CONFIG)
                          if path[-len(parts):] == parts and any(".".join(path).startswith(s) for s in sections)]
            places = {}
            for _, scope in segments:
                if scope:
                    places[scope] = [(p, v) for p, v in candidates if ".".join(p).startswith(scope)]
                    assert places[scope], f"config/README.md, {key}: no {key} in {scope} of config/config.yaml"
            if any(not scope for _, scope in segments):
                claimed = [p for paths in places.values() for p, _ in paths]
                places[""] = [(p, v) for p, v in candidates if p not in claimed]
                if not places[""]:  # left out of config/config.yaml: the module's default
                    assert key in modules, f"config/README.md, {key}: default given, but no config or module default"
                    places[""] = [(("module default",), modules[key])]
        for text, scope in segments:
            for path, value in places[scope or ""]:
                checked += 1
                if canonical(yaml.safe_load(text)) != canonical(value):
                    wrong.append(f"{key} ({heading}): README says {text}, {'.'.join(map(str, path))} is {value!r}")
    assert not wrong, "config/README.md's default column:\n" + "\n".join(wrong)
    assert checked > 80  # every table was read


def test_paper_configs_run_the_standard_opd_baseline_with_the_vllm_sampler():
    """The baseline of a paper-scale cost comparison samples as the systems the paper compares
    against do (a colocated vLLM engine), not with transformers' generate."""
    enabled = []
    for path in sorted((REPO / "config/paper").glob("*.yaml")):
        config = merge(default_config(), yaml.safe_load(path.read_text()))  # as Snakemake merges --configfile
        if config["standard_opd"]["enabled"]:
            enabled.append(path.name)
            assert config["standard_opd"]["sampler"] == "vllm", f"{path.name}: standard_opd.sampler"
    assert enabled, "no paper config runs standard OPD"


def test_long_chains_config_plans_longer_chains_with_a_student_as_large_as_the_teacher(tmp_path):
    """config/long_chains.yaml (docs/embedded-task.md, "Longer chains"): chains longer than any of the default's,
    a student base with the teacher's architecture, and the sampled and top-k Lightning OPD runs beside standard OPD."""
    default = default_config()
    config = merge(default, yaml.safe_load((REPO / "config/long_chains.yaml").read_text()))
    assert config["task"]["min_operands"] > default["task"]["max_operands"]
    assert config["student_base"]["build"]["arch"] == config["teachers"]["A"]["build"]["arch"]
    override = write_yaml(tmp_path / "o.yaml", {"results_dir": str(tmp_path / "results")})
    result = snakemake("-n", "-p", "--configfile", "config/long_chains.yaml", str(override))
    jobs = planned_jobs(result.stdout)
    assert jobs["lightning_opd"] == 3 and jobs["standard_opd"] == 1 and jobs["pretrain_student_base"] == 1, jobs
    assert '"min_operands": 5' in result.stdout and '"max_operands": 8' in result.stdout
    pretrain = next(line for line in result.stdout.splitlines()
                    if "lightning_opd.pretrain" in line and "/models/student_base" in line)
    arch = json.loads(re.search(r"--arch '([^']*)'", pretrain).group(1))
    assert arch == config["teachers"]["A"]["build"]["arch"] != default["student_base"]["build"]["arch"]


def test_long_training_config_trains_both_methods_and_every_variant_30_epochs_at_lr_3e_4(tmp_path):
    """config/long_training.yaml (docs/embedded-task.md, "Trained to convergence on the fixed rollouts"): the
    default with 240 OPD steps for standard OPD, Lightning OPD and each variant (every round's share included)."""
    override = write_yaml(tmp_path / "o.yaml", {"results_dir": str(tmp_path / "results")})
    result = snakemake("-n", "-p", "--configfile", "config/long_training.yaml", str(override))
    jobs = planned_jobs(result.stdout)
    assert jobs["lightning_opd"] == 9 and jobs["standard_opd"] == 1, jobs
    trainings = [line for line in result.stdout.splitlines()
                 if re.search(r"lightning_opd\.(lightning|standard)_opd ", line) and "--opd '" in line]
    assert len(trainings) == 10
    for line in trainings:
        opd = json.loads(re.search(r"--opd '([^']*)'", line).group(1))
        assert opd["epochs"] == 30 and opd["learning_rate"] == 3e-4, line[:200]
    assert f"{tmp_path}/results/long_training/" in result.stdout


def opd_trainings(dry_run_output: str) -> dict[str, dict]:
    """Every OPD training job of a dry run by its output: method, optimiser steps, sequences and prompts a step, lr
    (one row per OPD prompt or cached rollout: the rollouts sample n = 1)."""
    task = json.loads(re.search(r"lightning_opd\.task_data .*--hparams '([^']*)'", dry_run_output).group(1))
    rollouts = re.search(r"lightning_opd\.generate .*/rollouts/.*", dry_run_output)
    assert rollouts and json.loads(re.search(r"--sampling '([^']*)'", rollouts.group(0)).group(1))["n"] == 1
    sampling = re.search(r"lightning_opd\.standard_opd .*--sampling '([^']*)'", dry_run_output).group(1)
    n_samples = json.loads(sampling)["n"]
    runs = {}
    for line in dry_run_output.splitlines():
        if match := re.search(r"lightning_opd\.(lightning|standard)_opd .*--opd '([^']*)'.*--out (\S+)", line):
            method, opd, out = match.group(1), json.loads(match.group(2)), match.group(3)
            samples = n_samples if method == "standard" else 1
            runs[out] = {"method": method, "steps": opd["epochs"] * task["n_opd"] / opd["batch_size"],
                         "sequences": opd["batch_size"] * samples, "prompts": opd["batch_size"],
                         "lr": opd["learning_rate"], "loss": opd.get("loss"), "top_k": opd.get("top_k"),
                         "n_opd": task["n_opd"]}
    return runs


# The default's OPD runs: OPD prompts, optimiser steps, prompts and sequences a step, lr
DEFAULT_OPD_SHAPE = (8192, 120, 256, 256, 6e-4)


def test_the_default_trains_both_methods_the_papers_steps_on_the_same_prompts_and_sequences_a_step(tmp_path):
    """The embedded default (README, "Results of the default experiment"): 8,192 OPD prompts, and standard OPD,
    Lightning OPD and the top-k variants train 120 steps of 256 prompts, 256 sequences each (standard OPD samples
    n = 1 live response per prompt), at lr 6e-4; config/short_opd.yaml keeps the previous default's 16 steps of
    64 prompts (x 4 live samples for standard OPD) at lr 1e-4."""
    override = write_yaml(tmp_path / "o.yaml", {"results_dir": str(tmp_path / "results")})
    runs = opd_trainings(snakemake("-n", "-p", "--configfile", str(override)).stdout)
    single_round = {out: run for out, run in runs.items() if "rounds" not in out}
    assert sorted(run["method"] for run in single_round.values()) == ["lightning"] * 3 + ["standard"], runs
    for out, run in single_round.items():
        shape = (run["n_opd"], run["steps"], run["prompts"], run["sequences"], run["lr"])
        assert shape == DEFAULT_OPD_SHAPE, (out, run)
    assert sorted(run["top_k"] or 0 for run in single_round.values()) == [0, 0, 4, 16]
    short = opd_trainings(snakemake("-n", "-p", "--configfile", "config/short_opd.yaml", str(override)).stdout)
    standard = next(run for run in short.values() if run["method"] == "standard")
    lightning = next(run for out, run in short.items() if "/lightning-sft-" in out)
    assert (standard["n_opd"], standard["steps"], standard["prompts"], standard["sequences"], standard["lr"]) == \
        (512, 16, 64, 256, 1e-4), standard
    assert (lightning["steps"], lightning["prompts"], lightning["sequences"]) == (16, 64, 64), lightning


def test_comparison_runs_its_grid_in_the_defaults_regime(tmp_path):
    """config/comparison.yaml (README, "The paper's comparison on the embedded task"): the 2x2 grid of SFT teacher x
    OPD teacher, three seeds, every run in the default's regime (8,192 prompts, 120 steps of 256 at lr 6e-4), no
    variants."""
    override = write_yaml(tmp_path / "o.yaml", {"results_dir": str(tmp_path / "results")})
    grid = opd_trainings(snakemake("-n", "-p", "--configfile", "config/comparison.yaml", str(override)).stdout)
    names = {out.rstrip("/").rsplit("/", 1)[-1] for out in grid}
    assert names == {f"{method}-sft-{sft}_teacher-{teacher}_seed-{seed}" for method in ("lightning", "standard")
                     for sft in "AB" for teacher in "AB" for seed in range(3)}, sorted(names)
    for out, run in grid.items():
        shape = (run["n_opd"], run["steps"], run["prompts"], run["sequences"], run["lr"])
        assert shape == DEFAULT_OPD_SHAPE, (out, run)


def test_paper_baseline_config_gives_standard_opd_4_live_samples_per_prompt_and_4x_lightning_opds_sequences(tmp_path):
    """config/paper_baseline.yaml (docs/embedded-task.md, "Against the paper's baseline"): the default's OPD
    regime, but standard OPD samples 4 answers per prompt, so at the same 120 steps of 256 prompts it trains on
    1,024 sequences a step; Lightning OPD and top-k 16 keep 256 cached rollouts a step; three seeds, in a results
    directory of their own."""
    override = write_yaml(tmp_path / "o.yaml", {"results_dir": str(tmp_path / "results")})
    result = snakemake("-n", "-p", "--configfile", "config/paper_baseline.yaml", str(override))
    assert f"{tmp_path}/results/paper_baseline/" in result.stdout
    runs = opd_trainings(result.stdout)
    names = {out.rstrip("/").rsplit("/", 1)[-1] for out in runs}
    assert names == {f"{name}-sft-A_teacher-A_seed-{seed}" for name in ("standard", "lightning", "lightning-topk16")
                     for seed in range(3)}, sorted(names)
    for out, run in runs.items():
        shape = (run["n_opd"], run["steps"], run["prompts"], run["lr"])
        assert shape == (8192, 120, 256, 6e-4), (out, run)
        assert run["sequences"] == (1024 if run["method"] == "standard" else 256), (out, run)


def test_large_cache_config_gives_every_opd_run_240_steps_and_batch256_standard_opds_sequences_a_step(tmp_path):
    """config/large_cache.yaml (docs/embedded-task.md, "A larger cache and larger steps close the gap"): 4,096
    OPD prompts; standard OPD (64 prompts x n samples a step), Lightning OPD and topk16 (64 cached rollouts a
    step) and the variant batch256 (n x 64 rollouts a step: standard OPD's sequences) all train the same number
    of steps."""
    override = write_yaml(tmp_path / "o.yaml", {"results_dir": str(tmp_path / "results")})
    result = snakemake("-n", "-p", "--configfile", "config/large_cache.yaml", str(override))
    jobs = planned_jobs(result.stdout)
    assert jobs["lightning_opd"] == 3 and jobs["standard_opd"] == 1 and jobs["teacher_cache"] == 1, jobs
    runs = opd_trainings(result.stdout)
    assert len(runs) == 4 and {run["n_opd"] for run in runs.values()} == {4096}, runs
    assert {run["steps"] for run in runs.values()} == {240} and {run["lr"] for run in runs.values()} == {3e-4}, runs
    batch256 = next(run for out, run in runs.items() if "batch256" in out)
    standard = next(run for out, run in runs.items() if "/standard" in out)
    assert batch256["sequences"] == standard["sequences"] == 4 * 64, runs
    assert sorted(run["sequences"] for run in runs.values()) == [64, 64, 256, 256], runs
    topk16 = next(run for out, run in runs.items() if "topk16" in out)
    assert (topk16["loss"], topk16["top_k"]) == ("topk_reverse_kl", 16)


PARAMS_OUTSIDE_THE_RERUN_CHECK = """
import json, sys
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.rules import Rule
from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings

with SnakemakeApi(OutputSettings()) as api:
    workflow = api.workflow(resource_settings=ResourceSettings(cores=1),
                            config_settings=ConfigSettings(config={"results_dir": sys.argv[1]}),
                            snakefile=Path("workflow/Snakefile"), workdir=Path("."))._workflow
    print(json.dumps(sorted([rule.name, name] for rule in workflow.rules for name, value in rule.params._allitems()
                            if callable(value) and Rule._is_deriving_function(value))))
"""


def test_only_params_that_change_no_result_stay_out_of_the_rerun_check(tmp_path):
    """Snakemake leaves a param function of `input`, `output`, `threads` or `resources` out of its rerun check:
    such a param may only hold the job's own paths (which the check covers as files), the engines of a
    generation stage, or a rule's command (the processes of a training, which change how the job computes,
    not what, and the devices the job records for the report). The student base's path was one, so that
    pointing `student_base` at another model reran no SFT."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", PARAMS_OUTSIDE_THE_RERUN_CHECK, str(tmp_path / "results")],
                            cwd=REPO, capture_output=True, text=True, check=True)
    derived = {tuple(pair) for pair in json.loads(result.stdout.splitlines()[-1])}
    paths = {("task_data", "out_dir"), ("report", "out_dir"), ("lightning_opd", "share"),
             ("lightning_opd", "drift_prompts"), ("standard_opd", "drift_prompts")}
    engines = {(rule, "data_parallel") for rule in ("sft_data", "rollouts", "teacher_cache", "round_rollouts",
                                                     "round_teacher_cache")}
    commands = {pair for pair in derived if pair[1] == "cmd"}
    assert derived - commands == paths | engines
    assert {rule for rule, _ in commands} >= {"pretrain_teacher", "pretrain_student_base", "sft", "lightning_opd",
                                               "standard_opd", "rollouts", "teacher_cache", "evaluate"}


def test_training_on_more_processes_reruns_nothing_that_is_done(tiny_run):
    """The global batch is the config's on any number of processes: a finished run stays finished."""
    work, config = tiny_run
    layout = "resources={train: {processes: 2}, pretrain: {processes: 2}}"
    assert set(planned_jobs(snakemake("-n", *config, "--config", layout, cwd=work).stdout)) <= {"report", "all"}
