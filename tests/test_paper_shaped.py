"""The paper's DAG for real on CPU: config/paper/qwen3-8b.yaml with every hub
id swapped for a local path (tiny models; data files in the columns of
OpenThoughts3, DAPO-Math-17k, AIME 2024 and AIME 2025), the hf backends and tiny
hyperparameters; everything else (dataset preparation, path models, the
aime24 and aime25 tasks, standard OPD beside Lightning OPD, the report) as configured."""
from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from lightning_opd.artifacts import TASK_SCHEMA, read_cache, read_table
from lightning_opd.backends import get_backend
from lightning_opd.provenance import read_model_provenance
from test_pipeline import REPO, copy_repo, merge, planned_jobs, snakemake, write_yaml
from test_prepare_data import DAPO

TINY_TRAIN = {"max_steps": 2, "epochs": 1, "bf16": False, "fsdp": None, "save_steps": 100, "logging_steps": 1}


def hub_shaped_files(world, root) -> dict[str, dict]:
    """The three datasets in their hub columns, written from the tiny task's problems."""
    def problems(split):
        return read_table(world["data"] / f"{split}.parquet", TASK_SCHEMA)[0].to_pylist()

    openthoughts = root / "openthoughts3.jsonl"
    openthoughts.write_text("".join(json.dumps({"conversations": [
        {"from": "human", "value": p["problem"]}, {"from": "gpt", "value": p["solution"]}]}) + "\n"
        for p in problems("sft")))
    dapo = root / "dapo_math_17k.parquet"  # DAPO's answer-format wrapper, every problem twice (the hub's is ~100x)
    pq.write_table(pa.Table.from_pylist([{"prompt": [{"role": "user", "content": DAPO.format(problem=p["problem"])}],
                                          "reward_model": {"ground_truth": p["answer"], "style": "rule"}}
                                         for _ in range(2) for p in problems("opd")]), dapo)
    aime24 = root / "aime_2024.parquet"
    pq.write_table(pa.Table.from_pylist([{"ID": f"2024-I-{i + 1}", "Problem": p["problem"], "Solution": "",
                                          "Answer": int(p["answer"])} for i, p in enumerate(problems("eval"))]),
                   aime24)
    aime25 = root / "aime25.jsonl"  # math-ai/aime25 is a JSONL file on the hub; here its first half
    aime25.write_text("".join(json.dumps({"problem": p["problem"], "answer": p["answer"], "id": str(i)}) + "\n"
                              for i, p in enumerate(problems("eval")[:4])))
    return {"sft": {"source": str(openthoughts), "split": "train", "problem_field": "conversations.0.value"},
            "opd": {"source": str(dapo), "split": "train", "problem_field": "prompt.0.content",
                    "answer_field": "reward_model.ground_truth"},
            "eval": {"aime24": {"source": str(aime24), "split": "train", "problem_field": "Problem",
                                "answer_field": "Answer"},
                     "aime25": {"source": str(aime25), "split": "test", "problem_field": "problem",
                                "answer_field": "answer"}}}


@pytest.fixture(scope="module")
def paper_run(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    results = root / "results"
    local = merge(yaml.safe_load((REPO / "config/paper/qwen3-8b.yaml").read_text()), {
        "results_dir": str(results),
        "data": hub_shaped_files(world, root),
        "tokenizer": {"path": str(world["tokenizer"])},
        "teachers": {"A": {"path": str(world["teacher_A"])}},
        "student_base": {"path": str(world["student_base"])},
        "generation": {"backend": "hf", "backend_options": {}},
        "sft_data": {"sampling": {"max_new_tokens": 12, "batch_size": 16}},
        "sft": {"train": {**TINY_TRAIN, "batch_size": 8, "micro_batch_size": 4}, "keep_unfinished": True},
        "rollouts": {"sampling": {"max_new_tokens": 12, "batch_size": 16}},
        "teacher_cache": {"backend": "hf", "backend_options": {}},
        "lightning_opd": {**TINY_TRAIN, "batch_size": 4, "micro_batch_size": 2},
        "standard_opd": {"sampling": {"n": 2, "max_new_tokens": 12, "batch_size": 16}},
        "opd_drift": {"n_prompts": 4, "max_new_tokens": 12},
        "eval": {"k": 2, "max_gen_toks": 16, "backend": "hf", "backend_options": {}, "batch_size": 16},
        "resources": {"default": {"gpus": 0, "cpus": 2, "mem_mb": 4000, "runtime": 60}},
    })
    for section in ("generation", "sft_data", "rollouts", "teacher_cache", "eval"):
        if "backend_options" in local[section]:
            local[section]["backend_options"] = {}  # the paper's are vLLM's; a merged override could not drop them
        if section != "eval":
            local[section]["data_parallel"] = 1  # the paper's engines are one per GPU
    local["eval"]["teacher_backend_options"] = None
    # the paper's baseline samples with a colocated vLLM engine; vllm is not installed here
    # (tests/test_vllm_backend.py runs that sampler, in `make test-vllm`)
    local["standard_opd"].update(sampler="hf", sampler_options={})
    # as the README's example of other models leaves it: the default's `build`, which no job needs when
    # every model is given by path (the report must not wait for its benchmark file)
    local["tokenizer"] = {"build": {"vocab_size": 512}}
    config_file = write_yaml(root / "qwen3-8b-local.yaml", local)
    work = copy_repo(root / "repo")
    config = ["--configfile", str(config_file)]
    snakemake(*config, cwd=work)
    return results / "qwen3-8b", config, work


def test_paper_dag_runs_from_local_files(paper_run, world):
    out, _, _ = paper_run
    opd_set = read_table(out / "data/opd.parquet", TASK_SCHEMA)[0]
    assert sorted(opd_set.column("problem").to_pylist()) == sorted(
        read_table(world["data"] / "opd.parquet", TASK_SCHEMA)[0].column("problem").to_pylist())
    answers = read_table(world["data"] / "eval.parquet", TASK_SCHEMA)[0].column("answer").to_pylist()
    n_problems = {"aime24": len(answers), "aime25": 4}
    for benchmark, n in n_problems.items():
        eval_set = read_table(out / f"data/eval/{benchmark}.parquet", TASK_SCHEMA)[0]
        assert eval_set.column("answer").to_pylist() == answers[:n]
    _, meta = read_cache(out / "cache/sft-A_teacher-A.parquet")
    assert meta["teacher"]["path"] == str(world["teacher_A"]) and meta["teacher"]["label"] == "A"
    assert read_model_provenance(out / "models/sft-A")["sft_teacher"]["label"] == "A"
    for label in ("teacher-A", "student_base", "sft-A", "lightning-sft-A_teacher-A_seed-0",
                  "standard-sft-A_teacher-A_seed-0"):
        for benchmark, n in n_problems.items():
            summary = json.loads((out / f"eval/{benchmark}/{label}.json").read_text())
            assert summary["task"] == benchmark and summary["k"] == 2 and summary["n_problems"] == n
    table = pd.read_csv(out / "report/table.csv")
    assert {"aime24 avg@2", "aime25 avg@2"} <= set(table.columns)  # a column per benchmark
    assert table["model"].tolist() == ["teacher A", "student base", "SFT (pi_ref) (SFT data: A)",
                                       "standard OPD (SFT data: A, OPD teacher: A) [hf sampler]",
                                       "Lightning OPD (SFT data: A, OPD teacher: A)"]
    stages = set(pd.read_csv(out / "report/stage_costs.csv")["stage"])
    assert {"prepare_data", "sft_data", "sft", "rollouts", "teacher_cache", "lightning_opd", "standard_opd",
            "evaluate"} <= stages
    assert not {"task_data", "tokenizer", "pretrain_teacher", "pretrain_student_base"} & stages


def test_paper_dag_second_run_does_nothing(paper_run):
    _, config, work = paper_run
    assert planned_jobs(snakemake("-n", *config, cwd=work).stdout) == {}


def test_backend_refuses_options_of_the_other_backend(world):
    with pytest.raises(ValueError, match=r"backend 'hf' does not take the option\(s\) \['gpu_memory_utilization', "
                                         r"'tensor_parallel_size'\]"):
        get_backend("hf", str(world["teacher_A"]), tensor_parallel_size=8, gpu_memory_utilization=0.9)
