"""AIME 2024 through lm-eval: the answer checker on AIME-style responses, the
task end to end from a local file with the hub set's schema (ID, Problem,
Solution, Answer) through prepare_data and evaluate, and the paper configs
planning their evaluations with it."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from lightning_opd import evaluate, prepare_data
from lightning_opd.artifacts import TASK_SCHEMA, read_table
from lightning_opd.lm_eval_tasks.answer_check import avg_at_k, is_correct

REPO = Path(__file__).resolve().parents[1]
AIME_YAML = REPO / "src/lightning_opd/lm_eval_tasks/aime24/aime24.yaml"
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


# ---- the checker ------------------------------------------------------------------------------
@pytest.mark.parametrize("response, gold, right", [
    ("Adding the two distances, the answer is $\\boxed{204}$.", "204", True),
    ("So $m+n=\\boxed{205}$.", "204", False),
    ("I could not finish this problem.", "204", False),
    # AIME answers are 000-999 and models often write three digits; the hub gives the integer
    ("The answer is \\boxed{033}.", "33", True),
    ("The answer is \\boxed{33}.", "033", True),
    ("The answer is \\boxed{330}.", "33", False),
    # with nothing boxed math-verify falls back to the last number of the response
    ("Therefore the requested remainder is 33", "33", True),
    # a reasoning model: only the part after its thinking counts ...
    ("<think>Try \\boxed{12}; no, it is 33.</think>\n\nThe answer is \\boxed{33}.", "33", True),
    ("<think>So 33.</think>\n\nThe answer is \\boxed{12}.", "33", False),
    # ... and one cut off while thinking has answered nothing, whatever number it wrote last
    ("<think>Let me check 12 + 21 = 33", "33", False),
    # two boxed values are read as the set {12, 33}: not the integer 33
    ("First \\boxed{12}, then the answer \\boxed{33}.", "33", False),
])
def test_checker_on_aime_style_responses(response, gold, right):
    assert is_correct(response, gold) is right


def test_avg_at_k_is_the_fraction_right_and_pass_at_k_any():
    responses = ["\\boxed{204}", "\\boxed{205}", "no idea", "$\\boxed{204}$"]
    assert avg_at_k({"answer": "204"}, [responses]) == {"avg_at_k": 0.5, "pass_at_k": 1.0}
    assert avg_at_k({"answer": "7"}, [responses]) == {"avg_at_k": 0.0, "pass_at_k": 0.0}


# ---- end to end from a local file with the hub set's schema -----------------------------------
# Short AIME-style problems in the columns of Maxwell-Jia/AIME_2024 (Answer an integer); short so
# that prompt and answer fit the tiny models' 256 positions.
AIME_ROWS = [
    {"ID": "2024-X-1", "Problem": "Find the remainder when $7^{100}$ is divided by $1000$.",
     "Solution": "By Euler, ... so the remainder is $001$.", "Answer": 1},
    {"ID": "2024-X-2", "Problem": "How many positive divisors does $2024$ have?",
     "Solution": "$2024=2^3\\cdot 11\\cdot 23$, so $4\\cdot2\\cdot2=16$.", "Answer": 16},
    {"ID": "2024-X-3", "Problem": "Find $a+b$ if $a^2+b^2=65$, $ab=28$ and $a,b>0$.",
     "Solution": "$(a+b)^2=65+56=121$.", "Answer": 11},
    {"ID": "2024-X-4", "Problem": "Find the sum of the digits of $3^{10}$.",
     "Solution": "$3^{10}=59049$.", "Answer": 27},
    {"ID": "2024-X-5", "Problem": "Find the number of subsets of $\\{1,2,\\dots,9\\}$ with sum $9$.",
     "Solution": "Count them.", "Answer": 8},
]
HUB_SCHEMA = pa.schema([("ID", pa.string()), ("Problem", pa.string()), ("Solution", pa.string()),
                        ("Answer", pa.int64())])
K = 2


def prepare(rows: list[dict], tmp_path: Path) -> Path:
    """The paper configs' eval entry, with a local file in place of the hub id."""
    tmp_path.mkdir(exist_ok=True)
    source = tmp_path / "aime_2024_problems.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=HUB_SCHEMA), source)
    out = tmp_path / "eval.parquet"
    prepare_data.main(["--source", str(source), "--split", "train", "--problem-field", "Problem",
                       "--answer-field", "Answer", "--name", "eval", "--out", str(out)])
    return out


def run_aime(world, eval_file: Path, out: Path) -> tuple[dict, list[dict]]:
    evaluate.main(["--model", str(world["teacher_A"]), "--eval-file", str(eval_file), "--out", str(out),
                   "--k", str(K), "--max-gen-toks", "24", "--batch-size", "16", "--task-yaml", str(AIME_YAML)])
    samples = [json.loads(line) for line in out.with_suffix(".samples.jsonl").read_text().splitlines()]
    return json.loads(out.read_text()), samples


def test_prepared_hub_schema_file_is_the_task_parquet(tmp_path):
    table, _ = read_table(prepare(AIME_ROWS, tmp_path), TASK_SCHEMA)
    assert table.column("problem").to_pylist() == [r["Problem"] for r in AIME_ROWS]
    assert table.column("answer").to_pylist() == ["1", "16", "11", "27", "8"]


def test_aime_task_prompt_target_and_scoring(tmp_path):
    from lm_eval.tasks import TaskManager

    config = evaluate.task_config(AIME_YAML, prepare(AIME_ROWS, tmp_path), K, 0.6, 0.95, 64)
    task = TaskManager().load([config])["tasks"]["aime24"]
    doc = next(iter(task.test_docs()))
    assert task.doc_to_text(doc) == (AIME_ROWS[0]["Problem"] + "\nPlease reason step by step, "
                                     "and put your final answer within \\boxed{}.")
    assert task.doc_to_target(doc) == "1"
    assert task.config.repeats == K and task.config.generation_kwargs["max_gen_toks"] == 64
    # the task scores through the shared checker: a right answer counts (the random tiny
    # models of the end-to-end test only ever score 0)
    responses = ["<think>7^100 = 1 mod 1000</think>\n\nThe remainder is $\\boxed{001}$.", "\\boxed{7}"]
    assert task.process_results(doc, [responses]) == {"avg_at_k": 0.5, "pass_at_k": 1.0}


def test_aime_task_defaults_are_the_paper_protocol():
    config = yaml.safe_load(AIME_YAML.read_text().replace("!function ", ""))
    assert config["repeats"] == 32 and config["filter_list"][0]["filter"][0]["k"] == 32
    assert {k: config["generation_kwargs"][k] for k in ("do_sample", "temperature", "top_p")} == {
        "do_sample": True, "temperature": 0.6, "top_p": 0.95}


def test_aime_end_to_end(world, tmp_path):
    summary, samples = run_aime(world, prepare(AIME_ROWS, tmp_path), tmp_path / "teacher-A.json")
    assert summary["task"] == "aime24" and summary["k"] == K and summary["backend"] == "hf"
    assert summary["n_problems"] == len(AIME_ROWS)
    assert 0 <= summary["avg_at_k"] <= 1
    assert summary["sampling"] == {"temperature": 0.6, "top_p": 0.95, "max_gen_toks": 24, "seed": 0}
    assert [s["id"] for s in samples] == [f"eval-{i:07d}" for i in range(len(AIME_ROWS))]
    assert [s["answer"] for s in samples] == [str(r["Answer"]) for r in AIME_ROWS]
    assert all(len(s["responses"]) == K for s in samples)
    # every score is the checker's verdict on the stored responses, and avg@k their mean
    for s in samples:
        assert s["avg_at_k"] == sum(is_correct(r, s["answer"]) for r in s["responses"]) / K
    assert summary["avg_at_k"] == pytest.approx(sum(s["avg_at_k"] for s in samples) / len(samples))


# ---- the config key and the DAG ---------------------------------------------------------------
def dry_run(*configfiles: Path | str) -> subprocess.CompletedProcess:
    return subprocess.run([SNAKEMAKE, "--workflow-profile", "none", "--cores", "2", "-n", "-p",
                           "--configfile", *map(str, configfiles)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=ENV)


def task_yamls(output: str) -> list[str]:
    return re.findall(r"--task-yaml (\S+)", output)


@pytest.mark.parametrize("configfile, task, n_evals", [
    ("config/paper/qwen3-8b.yaml", "src/lightning_opd/lm_eval_tasks/aime24/aime24.yaml", 5),
    (None, "src/lightning_opd/lm_eval_tasks/synth_arith/synth_arith.yaml", 5),
])
def test_dry_run_evaluates_with_the_configured_task(configfile, task, n_evals, tmp_path):
    override = tmp_path / "o.yaml"
    override.write_text(yaml.safe_dump({"results_dir": str(tmp_path / "results")}))
    result = dry_run(*filter(None, [configfile, override]))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert task_yamls(result.stdout) == [task] * n_evals
    # the task file and its checker are inputs of every evaluation: an edit of either reruns them
    evaluate_jobs = [job for job in result.stdout.split("\nrule ") if job.startswith("evaluate:")]
    assert len(evaluate_jobs) == n_evals
    for job in evaluate_jobs:
        assert task in job and "src/lightning_opd/lm_eval_tasks/answer_check.py" in job


def test_eval_task_can_be_a_yaml_path_and_a_missing_one_is_named(tmp_path):
    mine = tmp_path / "tasks/my_aime.yaml"
    mine.parent.mkdir()
    mine.write_text(AIME_YAML.read_text().replace("task: aime24", "task: my_aime"))
    override = tmp_path / "o.yaml"
    override.write_text(yaml.safe_dump({"results_dir": str(tmp_path / "results"), "eval": {"task": str(mine)}}))
    result = dry_run(override)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert set(task_yamls(result.stdout)) == {os.path.relpath(mine, REPO)}

    override.write_text(yaml.safe_dump({"results_dir": str(tmp_path / "results"), "eval": {"task": "aime25"}}))
    result = dry_run(override)
    assert result.returncode != 0
    assert "eval.task 'aime25'" in result.stdout and "lm_eval_tasks/aime25/aime25.yaml not found" in result.stdout


@pytest.mark.parametrize("task, message", [("aime 24", "does not match"), (24, "24 is not of type 'string'")])
def test_schema_rejects_a_bad_eval_task(task, message):
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    config["eval"]["task"] = task
    with pytest.raises(WorkflowError, match=re.escape(message)):
        validate(config, str(REPO / "workflow/schemas/config.schema.yaml"))
