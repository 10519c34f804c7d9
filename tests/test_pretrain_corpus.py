"""The student base's plain-text corpus holds every solution style, so that
SFT on either teacher's style starts from the same footing; the facts corpus
is drawn with the task params its split records."""
from __future__ import annotations

import json
import re

import pyarrow.parquet as pq
import pytest

from lightning_opd.artifacts import METADATA_KEY, TASK_SCHEMA, ArtifactError, read_table
from lightning_opd.hparams import TaskParams
from lightning_opd.modeling import load_tokenizer
from lightning_opd.pretrain import corpus_examples
from lightning_opd.task import arithmetic_facts
from lightning_opd.task_data import recorded_task


def test_raw_solutions_hold_both_styles_of_every_problem(world):
    tokenizer = load_tokenizer(world["tokenizer"])
    table = read_table(world["data"] / "teacher.parquet", TASK_SCHEMA)[0]
    texts = [tokenizer.decode(e["input_ids"], skip_special_tokens=True)
             for e in corpus_examples("raw_solutions", "chain", world["data"] / "teacher.parquet", tokenizer)]
    assert len(texts) == 2 * table.num_rows
    decoded = {" ".join(t.split()) for t in texts}
    for problem, chain, words in zip(table.column("problem").to_pylist(), table.column("solution").to_pylist(),
                                     table.column("solution_words").to_pylist()):
        assert " ".join(f"{problem} {chain}".split()) in decoded
        assert " ".join(f"{problem} {words}".split()) in decoded


def test_facts_follow_the_recorded_task_and_a_split_without_params_is_named(world, tmp_path):
    path = world["data"] / "teacher.parquet"
    meta = read_table(path, TASK_SCHEMA)[1]
    task = recorded_task(path, meta)
    assert task == TaskParams(**meta["params"]) and task.n_teacher == 60  # conftest's task
    tokenizer = load_tokenizer(world["tokenizer"])
    facts = corpus_examples("facts", "chain", path, tokenizer)
    assert len(facts) == len(arithmetic_facts(task)) > 0
    table = pq.read_table(path)
    cases = (("none.parquet", None, ArtifactError, "the provenance records no task params"),
             ("odd.parquet", {"n_sft": 2, "colour": 1}, ValueError, "unknown TaskParams keys ['colour']"))
    for name, params, error, message in cases:
        bad = tmp_path / name
        record = {**meta, "params": params} if params else {k: v for k, v in meta.items() if k != "params"}
        pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps(record)}), bad)
        with pytest.raises(error, match=re.escape(f"{bad}: ") + ".*" + re.escape(message)):
            corpus_examples("facts", "chain", bad, tokenizer)
