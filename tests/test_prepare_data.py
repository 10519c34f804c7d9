"""prepare_data at paper scale, from local files in the hub's columns:
duplicates (up to whitespace and case) are dropped and counted, the shuffle
is reproducible from its seed, the limit applies after deduplication, and
DAPO-Math-17k's answer-format wrapper is stripped so that OPD prompts and
the evaluation ask for the answer in one way (the paper configs' template
equals the aime24 task's prompt)."""
from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from lightning_opd import prepare_data
from lightning_opd.artifacts import TASK_SCHEMA, read_table
from lightning_opd.modeling import prompt_ids
from test_pipeline import REPO

DAPO = ("Solve the following math problem step by step. The last line of your response should be of the form "
        "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{problem}\n\n"
        "Remember to put your answer on its own line after \"Answer:\".")
PAPER_CONFIG = yaml.safe_load((REPO / "config/paper/qwen3-8b.yaml").read_text())


def dapo_file(path, problems: list[tuple[str, str]]):
    """Rows in DAPO-Math-17k's columns (prompt as a chat turn, reward_model.ground_truth)."""
    pq.write_table(pa.Table.from_pylist([
        {"data_source": "math_dapo", "prompt": [{"role": "user", "content": DAPO.format(problem=p)}],
         "ability": "MATH", "reward_model": {"ground_truth": a, "style": "rule-lighteval/MATH_v2"},
         "extra_info": {"index": str(i)}} for i, (p, a) in enumerate(problems)]), path)
    return path


def prepare(source, out, **options) -> tuple[list[dict], dict]:
    spec = {**PAPER_CONFIG["data"]["opd"], **options}
    args = ["--source", str(source), "--name", "opd", "--out", str(out), "--problem-field", spec["problem_field"],
            "--answer-field", spec["answer_field"], "--problem-regex", spec["problem_regex"]]
    args += [x for key in ("seed", "limit") if spec.get(key) is not None for x in (f"--{key}", str(spec[key]))]
    prepare_data.main(args)
    table, meta = read_table(out, TASK_SCHEMA)
    return table.to_pylist(), meta


@pytest.fixture
def hundredfold(tmp_path):
    """20 problems, each 5 times over (DAPO's accident, smaller), some copies differing in spacing or case."""
    problems = [(f"Find x if x + {i} = {2 * i}.", str(i)) for i in range(20)]
    rows = [(p if copy % 2 == 0 else "  " + p.upper().replace(" ", "\n "), a) for copy in range(5) for p, a in problems]
    return dapo_file(tmp_path / "dapo.parquet", rows), problems


def test_duplicates_dropped_and_counted_and_wrapper_stripped(hundredfold, tmp_path, capsys):
    source, problems = hundredfold
    rows, meta = prepare(source, tmp_path / "opd.parquet", seed=None)
    assert [(r["problem"], r["answer"]) for r in rows] == problems  # first occurrences, in source order
    assert [r["id"] for r in rows] == [f"opd-{i:07d}" for i in range(20)]
    assert meta["duplicates_dropped"] == 80 and meta["rows"] == 100
    assert "100 rows, 80 duplicates dropped, 20 unique problems" in capsys.readouterr().out


def test_seeded_shuffle_is_reproducible_and_the_limit_comes_after_dedup(hundredfold, tmp_path):
    source, problems = hundredfold
    first, _ = prepare(source, tmp_path / "a.parquet", seed=0, limit=15)
    again, _ = prepare(source, tmp_path / "b.parquet", seed=0, limit=15)
    other, _ = prepare(source, tmp_path / "c.parquet", seed=1, limit=15)
    assert first == again and first != other
    assert len(first) == 15 and len({r["problem"] for r in first}) == 15  # 15 distinct problems, not copies
    assert {r["problem"] for r in first} < {p for p, _ in problems}
    assert [r["problem"] for r in first] != [p for p, _ in problems[:15]]  # a sample, not the first rows


def test_bad_input_is_named(hundredfold, tmp_path):
    source, _ = hundredfold
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": [{"role": "user", "content": "What is 1+1?"}],
                                          "reward_model": {"ground_truth": "2"}}]), plain)
    with pytest.raises(SystemExit, match=r"plain.parquet: row 0: the problem does not match problem_regex"):
        prepare(plain, tmp_path / "x.parquet")
    with pytest.raises(SystemExit, match="a limit needs a seed"):
        prepare(source, tmp_path / "y.parquet", seed=None, limit=3)
    with pytest.raises(SystemExit, match="limit 0: keep at least one problem"):  # not "no limit"
        prepare(source, tmp_path / "y.parquet", seed=0, limit=0)
    assert not (tmp_path / "y.parquet").exists()
    no_answer = dapo_file(tmp_path / "no_answer.parquet", [("Find x if x + 1 = 2.", "1"), ("Find y if y = 3.", None)])
    with pytest.raises(SystemExit, match=r"no_answer.parquet: row 1: the field 'reward_model.ground_truth' is null"):
        prepare(no_answer, tmp_path / "z.parquet")
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(source.read_bytes()[:500])
    with pytest.raises(SystemExit, match=r"truncated.parquet: not a readable parquet file \(.*magic bytes"):
        prepare(truncated, tmp_path / "t.parquet")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"problem": "1 + 1", "answer": "2"}\n{"problem": \n')
    with pytest.raises(SystemExit, match=r"broken.jsonl: not a readable jsonl file \(.*JSON parse error"):
        prepare_data.main(["--source", str(broken), "--name", "x", "--problem-field", "problem",
                           "--out", str(tmp_path / "j.parquet")])
    assert not any((tmp_path / name).exists() for name in ("x.parquet", "y.parquet", "z.parquet", "t.parquet",
                                                           "j.parquet"))


def test_one_prompt_protocol_for_opd_and_evaluation(tmp_path):
    """The user turn every stage sends (prompt_template, rendered by modeling.prompt_ids) is
    the aime24 task's prompt for the same problem, word for word."""
    from lm_eval.tasks import TaskManager

    from lightning_opd import evaluate

    aime = tmp_path / "aime.parquet"
    pq.write_table(pa.Table.from_pylist([{"ID": "2024-I-1", "Problem": "Find $x$ if $x^2 = 4$ and $x > 0$.",
                                          "Solution": "", "Answer": 2}]), aime)
    prepare_data.main(["--source", str(aime), "--problem-field", "Problem", "--answer-field", "Answer",
                       "--name", "eval", "--out", str(tmp_path / "eval.parquet")])
    task_yaml = REPO / "src/lightning_opd/lm_eval_tasks/aime24/aime24.yaml"
    task_config = evaluate.task_config(task_yaml, tmp_path / "eval.parquet", 1, 0.6, 0.95, 16)
    task = TaskManager(include_defaults=False).load([task_config])["tasks"]["aime24"]
    doc = next(iter(task.test_docs()))

    class Recorder:  # what prompt_ids hands the chat template
        def apply_chat_template(self, messages, **_):
            self.content = messages[0]["content"]
            return ""

        def __call__(self, text, **_):
            return {"input_ids": []}

    for paper in ("qwen3-4b", "qwen3-8b", "qwen3-30b-a3b", "qwen3-4b-1gpu"):
        config = yaml.safe_load((REPO / f"config/paper/{paper}.yaml").read_text())
        recorder = Recorder()
        prompt_ids(recorder, doc["problem"], config["prompt_template"])
        assert recorder.content == task.doc_to_text(doc), paper
        assert re.search(r"\\boxed\{\}", config["prompt_template"])
