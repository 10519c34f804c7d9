"""The benchmarks through lm-eval (AIME 2024, AIME 2025, MATH-500): the answer
checker on AIME- and MATH-style responses, each task end to end from a local
file with its hub set's columns through prepare_data and evaluate, and
`eval.tasks` planning one evaluation per benchmark and model."""
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


# MATH-500's answers are LaTeX, compared as math by math-verify
@pytest.mark.parametrize("response, gold, right", [
    ("So the answer is $\\boxed{\\dfrac{14}{3}}$.", "\\frac{14}{3}", True),
    ("\\boxed{\\frac{14}{5}}", "\\frac{14}{3}", False),
    ("\\boxed{4.67}", "\\frac{14}{3}", False),
    ("\\boxed{(3, \\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("The answer is \\boxed{3\\sqrt{13}}.", "3\\sqrt{13}", True),
    ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", True),
])
def test_checker_on_math500_style_answers(response, gold, right):
    assert is_correct(response, gold) is right


# ---- end to end from a local file with the hub set's schema -----------------------------------
# Short competition-style problems, so that prompt and answer fit the tiny models' 256 positions,
# in the columns of each benchmark's hub set: Maxwell-Jia/AIME_2024 (ID, Problem, Solution, Answer
# an integer), math-ai/aime25 (id, problem, answer a string), HuggingFaceH4/MATH-500 (problem,
# solution, answer in LaTeX, subject, level, unique_id).
PROBLEMS = [
    ("Find the remainder when $7^{100}$ is divided by $1000$.", "1"),
    ("How many positive divisors does $2024$ have?", "16"),
    ("Find $a+b$ if $a^2+b^2=65$, $ab=28$ and $a,b>0$.", "11"),
    ("Find the sum of the digits of $3^{10}$.", "27"),
    ("Find the number of subsets of $\\{1,2,\\dots,9\\}$ with sum $9$.", "8"),
]
MATH500_PROBLEMS = [
    ("Compute $\\frac{7}{3} + \\frac{7}{3}$.", "\\frac{14}{3}"),
    ("Convert $(0,3)$ to polar coordinates $(r,\\theta)$.", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("Simplify $\\sqrt{117}$.", "3\\sqrt{13}"),
]
SETS = {"aime24": PROBLEMS, "aime25": PROBLEMS, "math500": MATH500_PROBLEMS}
HUB = {
    "aime24": (pa.schema([("ID", pa.string()), ("Problem", pa.string()), ("Solution", pa.string()),
                          ("Answer", pa.int64())]),
               [{"ID": f"2024-X-{i}", "Problem": p, "Solution": "...", "Answer": int(a)}
                for i, (p, a) in enumerate(PROBLEMS)]),
    "aime25": (pa.schema([("problem", pa.string()), ("answer", pa.string()), ("id", pa.string())]),
               [{"problem": p, "answer": a, "id": str(i)} for i, (p, a) in enumerate(PROBLEMS)]),
    "math500": (pa.schema([("problem", pa.string()), ("solution", pa.string()), ("answer", pa.string()),
                           ("subject", pa.string()), ("level", pa.int64()), ("unique_id", pa.string())]),
                [{"problem": p, "solution": "...", "answer": a, "subject": "Algebra", "level": 2,
                  "unique_id": f"test/algebra/{i}.json"} for i, (p, a) in enumerate(MATH500_PROBLEMS)]),
}
PAPER = yaml.safe_load((REPO / "config/paper/qwen3-8b.yaml").read_text())
# the data entries of the paper configs; MATH-500's is the one their comment gives
DATA = {**PAPER["data"]["eval"], "math500": {"source": "HuggingFaceH4/MATH-500", "split": "test",
                                            "problem_field": "problem", "answer_field": "answer"}}
K = 2


def task_yaml(benchmark: str) -> Path:
    return REPO / f"src/lightning_opd/lm_eval_tasks/{benchmark}/{benchmark}.yaml"


def prepare(benchmark: str, tmp_path: Path) -> Path:
    """The benchmark's data entry of the paper config, with a local file in place of the hub id."""
    tmp_path.mkdir(exist_ok=True)
    schema, rows = HUB[benchmark]
    source = tmp_path / f"{benchmark}_hub.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), source)
    entry = DATA[benchmark]
    out = tmp_path / f"{benchmark}.parquet"
    prepare_data.main(["--source", str(source), "--split", entry["split"], "--problem-field", entry["problem_field"],
                       "--answer-field", entry["answer_field"], "--name", benchmark, "--out", str(out)])
    return out


def run_task(world, benchmark: str, eval_file: Path, out: Path) -> tuple[dict, list[dict]]:
    evaluate.main(["--model", str(world["teacher_A"]), "--eval-file", str(eval_file), "--out", str(out),
                   "--k", str(K), "--max-gen-toks", "24", "--batch-size", "16",
                   "--task-yaml", str(task_yaml(benchmark)), "--backend-options", '{"dtype": "float32"}'])
    samples = [json.loads(line) for line in out.with_suffix(".samples.jsonl").read_text().splitlines()]
    return json.loads(out.read_text()), samples


def test_paper_configs_evaluate_aime24_and_aime25():
    for paper in sorted((REPO / "config/paper").glob("*.yaml")):
        config = yaml.safe_load(paper.read_text())
        assert config["eval"]["tasks"] == ["aime24", "aime25"], paper
        assert config["data"]["eval"] == PAPER["data"]["eval"], paper
    assert DATA["aime24"]["source"] == "Maxwell-Jia/AIME_2024" and DATA["aime25"]["source"] == "math-ai/aime25"


@pytest.mark.parametrize("benchmark", HUB)
def test_prepared_hub_schema_file_is_the_task_parquet(benchmark, tmp_path):
    table, _ = read_table(prepare(benchmark, tmp_path), TASK_SCHEMA)
    assert table.column("problem").to_pylist() == [p for p, _ in SETS[benchmark]]
    assert table.column("answer").to_pylist() == [a for _, a in SETS[benchmark]]
    assert table.column("id").to_pylist() == [f"{benchmark}-{i:07d}" for i in range(len(SETS[benchmark]))]


@pytest.mark.parametrize(
    "benchmark, right, wrong",
    [
        ("aime24", "<think>7^100 = 1 mod 1000</think>\n\nThe remainder is $\\boxed{001}$.", "\\boxed{7}"),
        ("aime25", "The remainder is $\\boxed{1}$.", "\\boxed{1000}"),
        ("math500", "$\\frac73+\\frac73=\\boxed{\\dfrac{14}{3}}$", "\\boxed{\\frac{7}{3}}"),
    ],
)
def test_task_prompt_target_and_scoring(benchmark, right, wrong, tmp_path):
    from lm_eval.tasks import TaskManager

    config = evaluate.task_config(task_yaml(benchmark), prepare(benchmark, tmp_path), K, 0.6, 0.95, 64)
    task = TaskManager().load([config])["tasks"][benchmark]
    doc = next(iter(task.test_docs()))
    problem, answer = SETS[benchmark][0]
    assert (
        task.doc_to_text(doc) == problem + "\nPlease reason step by step, and put your final answer within \\boxed{}."
    )
    assert task.doc_to_target(doc) == answer
    assert task.config.repeats == K and task.config.generation_kwargs["max_gen_toks"] == 64
    # the task scores through the shared checker: a right answer counts (the random tiny
    # models of the end-to-end test only ever score 0)
    assert task.process_results(doc, [[right, wrong]]) == {"avg_at_k": 0.5, "pass_at_k": 1.0}


@pytest.mark.parametrize("benchmark", HUB)
def test_task_defaults_are_the_paper_protocol(benchmark):
    config = yaml.safe_load(task_yaml(benchmark).read_text().replace("!function ", ""))
    assert config["task"] == benchmark
    assert config["repeats"] == 32 and config["filter_list"][0]["filter"][0]["k"] == 32
    assert {k: config["generation_kwargs"][k] for k in ("do_sample", "temperature", "top_p")} == {
        "do_sample": True,
        "temperature": 0.6,
        "top_p": 0.95,
    }
    assert config["process_results"] == "lightning_opd.lm_eval_tasks.answer_check.avg_at_k"


@pytest.mark.parametrize("benchmark", HUB)
def test_task_end_to_end(benchmark, world, tmp_path):
    summary, samples = run_task(world, benchmark, prepare(benchmark, tmp_path), tmp_path / "teacher-A.json")
    problems = SETS[benchmark]
    assert summary["task"] == benchmark and summary["k"] == K and summary["backend"] == "hf"
    assert summary["backend_options"] == {"dtype": "float32"}  # the engine layout is recorded
    assert summary["n_problems"] == len(problems)
    assert 0 <= summary["avg_at_k"] <= 1
    assert summary["sampling"] == {"temperature": 0.6, "top_p": 0.95, "max_gen_toks": 24, "seed": 0}
    assert [s["id"] for s in samples] == [f"{benchmark}-{i:07d}" for i in range(len(problems))]
    assert [s["answer"] for s in samples] == [a for _, a in problems]
    assert all(len(s["responses"]) == K for s in samples)
    # every score is the checker's verdict on the stored responses, and avg@k their mean
    for s in samples:
        assert s["avg_at_k"] == sum(is_correct(r, s["answer"]) for r in s["responses"]) / K
    assert summary["avg_at_k"] == pytest.approx(sum(s["avg_at_k"] for s in samples) / len(samples))


# ---- the config key and the DAG ---------------------------------------------------------------
def dry_run(*configfiles: Path | str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [SNAKEMAKE, "--workflow-profile", "none", "--cores", "2", "-n", "-p", "--configfile", *map(str, configfiles)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )


def task_yamls(output: str) -> list[str]:
    return re.findall(r"--task-yaml (\S+)", output)


@pytest.mark.parametrize(
    "configfile, tasks, n_models",
    [
        ("config/paper/qwen3-8b.yaml", ["aime24", "aime25"], 5),
        (None, ["synth_arith"], 9),  # and the 4 Lightning OPD variants
    ],
)
def test_dry_run_evaluates_every_model_on_every_benchmark(configfile, tasks, n_models, tmp_path):
    override = tmp_path / "o.yaml"
    override.write_text(yaml.safe_dump({"results_dir": str(tmp_path / "results")}))
    result = dry_run(*filter(None, [configfile, override]))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    evaluate_jobs = [job for job in result.stdout.split("\nrule ") if job.startswith("evaluate:")]
    assert len(evaluate_jobs) == len(tasks) * n_models
    for benchmark in tasks:
        task = f"src/lightning_opd/lm_eval_tasks/{benchmark}/{benchmark}.yaml"
        jobs = [job for job in evaluate_jobs if f"--task-yaml {task} " in job]
        assert len(jobs) == n_models, benchmark
        # each benchmark reads its own problems and writes its own results
        data = f"data/eval/{benchmark}.parquet" if configfile else "data/eval.parquet"
        assert all(data in job and f"/eval/{benchmark}/" in job for job in jobs), benchmark
        # the task file and its checker are inputs of every evaluation: an edit of either reruns them
        assert all("src/lightning_opd/lm_eval_tasks/answer_check.py" in job for job in jobs)


def test_eval_task_can_be_a_yaml_path_and_a_missing_one_is_named(tmp_path):
    mine = tmp_path / "tasks/my_aime.yaml"
    mine.parent.mkdir()
    mine.write_text(task_yaml("aime24").read_text().replace("task: aime24", "task: my_aime"))
    override = tmp_path / "o.yaml"
    override.write_text(
        yaml.safe_dump({"results_dir": str(tmp_path / "results"), "eval": {"tasks": ["synth_arith", str(mine)]}})
    )
    result = dry_run(override)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert set(task_yamls(result.stdout)) == {
        os.path.relpath(mine, REPO),
        "src/lightning_opd/lm_eval_tasks/synth_arith/synth_arith.yaml",
    }
    assert "/eval/my_aime/teacher-A.json" in result.stdout  # the yaml's file stem names the benchmark

    override.write_text(yaml.safe_dump({"results_dir": str(tmp_path / "results"), "eval": {"tasks": ["aime26"]}}))
    result = dry_run(override)
    assert result.returncode != 0
    assert "eval.tasks: 'aime26'" in result.stdout and "lm_eval_tasks/aime26/aime26.yaml not found" in result.stdout


@pytest.mark.parametrize(
    "change, message",
    [
        # the one-benchmark form of earlier versions is refused with the new form spelled out
        ({"eval": {"task": "aime24"}}, "eval.task and a single data.eval dataset were replaced by eval.tasks"),
        (
            {"data": {"eval": {"source": "Maxwell-Jia/AIME_2024", "problem_field": "Problem"}}},
            "eval.task and a single data.eval dataset were replaced by eval.tasks",
        ),
        # every benchmark needs its dataset, and every dataset its benchmark
        (
            {"eval": {"tasks": ["aime24"]}},
            "data.eval has datasets for ['aime24', 'aime25'] but eval.tasks names the benchmarks ['aime24']",
        ),
        (
            {"eval": {"tasks": ["aime24", "aime25", "math500"]}},
            "data.eval has datasets for ['aime24', 'aime25'] but eval.tasks names the benchmarks "
            "['aime24', 'aime25', 'math500']",
        ),
    ],
)
def test_paper_config_refuses_benchmarks_without_data(change, message, tmp_path):
    override = tmp_path / "o.yaml"
    override.write_text(yaml.safe_dump({"results_dir": str(tmp_path / "results"), **change}))
    result = dry_run("config/paper/qwen3-8b.yaml", override)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(
    "tasks, message",
    [
        (["aime 24"], "does not match"),
        ([24], "24 is not of type 'string'"),
        ([], "should be non-empty"),
        (["aime24", "aime24"], "has non-unique elements"),
        ("aime24", "'aime24' is not of type 'array'"),
    ],
)
def test_schema_rejects_bad_eval_tasks(tasks, message):
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    config["eval"]["tasks"] = tasks
    with pytest.raises(WorkflowError, match=re.escape(message)):
        validate(config, str(REPO / "workflow/schemas/config.schema.yaml"))
