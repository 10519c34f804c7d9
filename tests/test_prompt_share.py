"""Multi-round Lightning OPD's prompt shares: disjoint, covering, and what round 1 keeps of pi_ref's cache."""
from __future__ import annotations

import pyarrow as pa
import pytest

from lightning_opd.artifacts import TASK_SCHEMA, ArtifactError, read_table, write_table
from lightning_opd.lightning_opd import rows_of_prompts
from lightning_opd.prompt_share import main, share_ids


def task_file(path, n):
    rows = [{"id": f"opd-{i:06d}", "problem": f"{i} + 1", "answer": str(i + 1), "solution": "", "solution_words": ""}
            for i in range(n)]
    write_table(path, rows, TASK_SCHEMA, {"stage": "task_data", "split": "opd"})
    return path


@pytest.mark.parametrize("n_rows, shares", [(10, 4), (9, 3), (5, 5)])
def test_shares_are_disjoint_interleaved_and_cover_the_prompts(tmp_path, n_rows, shares):
    prompts = task_file(tmp_path / "opd.parquet", n_rows)
    parts = []
    for i in range(1, shares + 1):
        main(["--prompts", str(prompts), "--share", f"{i}-of-{shares}", "--out", str(tmp_path / f"s{i}.parquet")])
        parts.append(share_ids(tmp_path / f"s{i}.parquet"))
        table, meta = read_table(tmp_path / f"s{i}.parquet", TASK_SCHEMA)
        assert meta["share"] == f"{i}-of-{shares}" and meta["split"] == "opd"
        assert table.column("id").to_pylist() == [f"opd-{j:06d}" for j in range(i - 1, n_rows, shares)]
    assert sum(map(len, parts)) == n_rows and set().union(*parts) == {f"opd-{j:06d}" for j in range(n_rows)}


def test_more_shares_than_prompts_is_refused_and_writes_nothing(tmp_path):
    prompts = task_file(tmp_path / "opd.parquet", 3)
    with pytest.raises(ArtifactError, match="cannot make 4 non-empty shares"):
        main(["--prompts", str(prompts), "--share", "4-of-4", "--out", str(tmp_path / "s.parquet")])
    assert not (tmp_path / "s.parquet").exists()


def test_share_ids_refuses_a_file_that_is_no_share(tmp_path):
    with pytest.raises(ArtifactError, match="not a prompt share"):
        share_ids(task_file(tmp_path / "opd.parquet", 3))


def test_round_one_keeps_the_rollouts_of_its_prompts_also_with_several_per_prompt():
    table = pa.table({"id": ["opd-1#0", "opd-1#1", "opd-2#0", "opd-3", "opd-30"]})
    kept = rows_of_prompts(table, {"opd-1", "opd-3"}, "cache.parquet", "share.parquet")
    assert kept.column("id").to_pylist() == ["opd-1#0", "opd-1#1", "opd-3"]
    with pytest.raises(ArtifactError, match="cache.parquet: no rollout of the prompts of share.parquet"):
        rows_of_prompts(table, {"opd-9"}, "cache.parquet", "share.parquet")

