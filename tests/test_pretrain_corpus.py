"""The student base's plain-text corpus holds every solution style, so that
SFT on either teacher's style starts from the same footing."""
from __future__ import annotations

from lightning_opd.artifacts import TASK_SCHEMA, read_table
from lightning_opd.modeling import load_tokenizer
from lightning_opd.pretrain import corpus_examples


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
