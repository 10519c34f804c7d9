"""The teacher cache against a direct transformers forward, and the checks
that a cache which does not line up is refused with a clear error."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM

from lightning_opd.artifacts import CACHE_SCHEMA, METADATA_KEY, ArtifactError, read_cache, read_table
from lightning_opd.provenance import model_fingerprint


def test_cache_equals_direct_forward(world):
    table, meta = read_cache(world["cache_A"])
    model = AutoModelForCausalLM.from_pretrained(world["teacher_A"]).eval()
    assert table.num_rows == 12
    for row in table.to_pylist():
        ids = torch.tensor([row["prompt_ids"] + row["response_ids"]])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
        n_prompt = len(row["prompt_ids"])
        expected = [logprobs[n_prompt - 1 + t, token].item() for t, token in enumerate(row["response_ids"])]
        np.testing.assert_allclose(row["teacher_logprobs"], expected, atol=1e-5)
    assert meta["teacher"]["fingerprint"] == model_fingerprint(world["teacher_A"])
    assert meta["sft_teacher"]["fingerprint"] == model_fingerprint(world["teacher_A"])
    assert meta["rollout_policy"]["fingerprint"] == model_fingerprint(world["sft_A"])
    assert meta["rollouts"]["sampling"]["temperature"] == 0.7


def test_cache_stores_float32_lists(world):
    schema = pq.read_schema(world["cache_A"])
    assert schema.field("teacher_logprobs").type == CACHE_SCHEMA.field("teacher_logprobs").type
    assert str(schema.field("teacher_logprobs").type.value_type) == "float"


def rewrite(src, dst, mutate_rows=None, mutate_meta=None):
    table = pq.read_table(src)
    meta = json.loads(table.schema.metadata[METADATA_KEY])
    rows = table.to_pylist()
    if mutate_rows:
        mutate_rows(rows)
    if mutate_meta:
        mutate_meta(meta)
    out = type(table).from_pylist(rows, schema=CACHE_SCHEMA)
    pq.write_table(out.replace_schema_metadata({METADATA_KEY: json.dumps(meta)}), dst)
    return dst


def test_length_mismatch_is_refused_naming_file_and_row(world, tmp_path):
    def drop_last_logprob(rows):
        rows[3]["teacher_logprobs"] = rows[3]["teacher_logprobs"][:-1]

    bad = rewrite(world["cache_A"], tmp_path / "short.parquet", drop_last_logprob)
    with pytest.raises(
        ArtifactError, match=r"short\.parquet: row 'opd-000003' has \d+ response tokens but \d+ teacher"
    ):
        read_cache(bad)


def test_missing_and_malformed_parquet(tmp_path):
    with pytest.raises(ArtifactError, match="nowhere.parquet: file not found"):
        read_table(tmp_path / "nowhere.parquet", CACHE_SCHEMA)
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"this is not parquet at all")
    with pytest.raises(ArtifactError, match="garbage.parquet: not a readable parquet file"):
        read_table(garbage, CACHE_SCHEMA)


def test_missing_column_is_named(world, tmp_path):
    table = pq.read_table(world["cache_A"]).drop_columns(["teacher_logprobs"])
    pq.write_table(table, tmp_path / "nocol.parquet")
    with pytest.raises(ArtifactError, match=r"nocol.parquet: missing columns \['teacher_logprobs'\]"):
        read_cache(tmp_path / "nocol.parquet")
