"""The teacher cache against a direct transformers forward, and the checks
that a cache which does not line up is refused with a clear error."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM

from lightning_opd import artifacts, teacher_cache
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


@pytest.mark.parametrize("column, inside", [("prompt_ids", False), ("response_ids", True), ("teacher_logprobs", True)])
def test_a_null_is_refused_naming_file_row_and_column(world, tmp_path, column, inside):
    def put_null(rows):
        if inside:
            rows[3][column][0] = None
        else:
            rows[3][column] = None

    bad = rewrite(world["cache_A"], tmp_path / "null.parquet", put_null)
    where = " inside its list" if inside else ""
    with pytest.raises(ArtifactError, match=rf"null\.parquet: row 3 \(id 'opd-000003'\) has a null in column "
                                            rf"'{column}'{where}"):
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


# ---- the top-k cache (teacher_cache.top_k)
from lightning_opd.artifacts import TOPK_FIELDS, cache_schema  # noqa: E402


def test_top_k_cache_equals_direct_forward(world):
    """k ids and log-probs per response token: the teacher's k most likely tokens, most likely first, the
    log-probs to float16 precision; the sampled-token column as in a cache without top-k."""
    table, meta = read_cache(world["cache_A_top8"])
    plain, _ = read_cache(world["cache_A"])
    assert meta["top_k"] == 8 and meta["top_k_dtypes"] == {"ids": "int32", "logprobs": "float16"}
    assert table.column("teacher_logprobs").to_pylist() == plain.column("teacher_logprobs").to_pylist()
    model = AutoModelForCausalLM.from_pretrained(world["teacher_A"]).eval()
    for row in table.to_pylist():
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([row["prompt_ids"] + row["response_ids"]])).logits[0], -1)
        n_prompt, n = len(row["prompt_ids"]), len(row["response_ids"])
        best, ids = logprobs[n_prompt - 1:n_prompt - 1 + n].topk(8, dim=-1)
        stored_ids = np.array(row["teacher_topk_ids"]).reshape(n, 8)
        stored = np.array(row["teacher_topk_logprobs"], np.float32).reshape(n, 8)
        np.testing.assert_allclose(stored, best.numpy(), atol=2e-3, rtol=1e-3)  # float16 rounding
        assert (np.diff(stored, axis=1) <= 0).all()
        assert (np.sort(stored_ids, 1) == np.sort(ids.numpy(), 1)).all()


def test_top_k_log_probs_below_float16s_range_are_stored_at_its_floor(world, tmp_path):
    """A cold teacher (temperature 1e-6) puts its less likely top-k tokens far below float16's -65504 (a
    probability of 0 either way): stored at -65504, not as -inf, which the finished cache's checks refuse."""
    out = tmp_path / "cold.parquet"
    teacher_cache.build_cache(str(world["teacher_A"]), world["rollouts"], out, label="A", top_k=8, temperature=1e-6)
    table, _ = read_cache(out)
    stored = np.concatenate([np.array(r, np.float32) for r in table.column("teacher_topk_logprobs").to_pylist()])
    assert stored.min() == np.finfo(np.float16).min and np.isfinite(stored).all()


def test_rollouts_cut_at_max_response_tokens_keep_the_text_of_their_kept_tokens_and_count_as_unfinished(
        world, tmp_path):
    rollouts, _ = read_table(world["rollouts"], artifacts.SAMPLES_SCHEMA)
    lengths = [len(r) for r in rollouts.column("response_ids").to_pylist()]
    limit = min(lengths) // 2  # every row loses more than an end-of-sequence token
    out = tmp_path / "cut.parquet"
    teacher_cache.build_cache(str(world["teacher_A"]), world["rollouts"], out, label="A", max_response_tokens=limit)
    table, _ = read_cache(out)
    tokenizer = teacher_cache.load_tokenizer(str(world["teacher_A"]))
    assert table.num_rows == rollouts.num_rows > 0
    for before, after in zip(rollouts.to_pylist(), table.to_pylist()):
        assert after["response_ids"] == before["response_ids"][:limit]
        assert len(after["teacher_logprobs"]) == limit
        assert not after["finished"]
        assert after["response_text"] == tokenizer.decode(after["response_ids"], skip_special_tokens=True)
        assert after["response_text"] != before["response_text"]


def test_the_context_check_counts_a_rollout_as_cut_at_max_response_tokens(world, tmp_path):
    """A rollout longer than the teacher's 256 positions is refused, naming it; cut to fit by
    max_response_tokens it is scored."""
    table, meta = read_table(world["rollouts"], artifacts.SAMPLES_SCHEMA)
    rows = table.to_pylist()
    rows[0]["response_ids"] = rows[0]["response_ids"] * 40
    long = tmp_path / "long.parquet"
    artifacts.write_table(long, rows, artifacts.SAMPLES_SCHEMA, meta)
    with pytest.raises(ValueError, match=rf"{long}: 1 sequence\(s\) longer than the context .* {rows[0]['id']!r}"):
        teacher_cache.build_cache(str(world["teacher_A"]), long, tmp_path / "refused.parquet", label="A")
    assert not (tmp_path / "refused.parquet").exists()
    teacher_cache.build_cache(str(world["teacher_A"]), long, tmp_path / "cut.parquet", label="A",
                              max_response_tokens=64)
    assert len(read_cache(tmp_path / "cut.parquet")[0].column("response_ids")[0]) == 64


def test_top_k_cache_schema_is_int32_ids_and_float16_logprobs(world):
    schema = pq.read_schema(world["cache_A_top8"])
    assert [schema.field(f.name).type for f in TOPK_FIELDS] == [pa.list_(pa.int32()), pa.list_(pa.float16())]
    assert cache_schema(8).names == [*CACHE_SCHEMA.names, *(f.name for f in TOPK_FIELDS)]


def rewrite_top_k(src, dst, mutate_rows=None, mutate_meta=None):
    table = pq.read_table(src)
    meta = json.loads(table.schema.metadata[METADATA_KEY])
    rows = table.to_pylist()
    if mutate_rows:
        mutate_rows(rows)
    if mutate_meta:
        mutate_meta(meta)
    schema = cache_schema(8) if "teacher_topk_ids" in rows[0] else CACHE_SCHEMA
    pq.write_table(pa.Table.from_pylist(rows, schema=schema).replace_schema_metadata(
        {METADATA_KEY: json.dumps(meta)}), dst)
    return dst


def set_top(row, column, position, value):
    def mutate(rows):
        rows[row][column][position] = value
    return mutate


def duplicate_id(rows):
    rows[1]["teacher_topk_ids"][1] = rows[1]["teacher_topk_ids"][0]


@pytest.mark.parametrize("mutate, message", [
    (set_top(2, "teacher_topk_logprobs", 5, float("nan")), r"row 'opd-000002' has teacher top-k log-prob nan at "
                                                          r"response token 0"),
    (set_top(2, "teacher_topk_logprobs", 9, 0.5), r"row 'opd-000002' has teacher top-k log-prob 0.5 at response "
                                                  r"token 1; a log-prob must be finite and <= 0"),
    (lambda rows: rows[4].update(teacher_topk_ids=rows[4]["teacher_topk_ids"][:-1]),
     r"row 'opd-000004' has \d+ response tokens but \d+ values in teacher_topk_ids \(top_k 8: 8 per token\)"),
    (duplicate_id, r"row 'opd-000001' has top-k token ids .* at response token 0; they must be distinct"),
    (lambda rows: rows[3].update(teacher_topk_logprobs=[-0.01] * len(rows[3]["teacher_topk_logprobs"])),
     r"row 'opd-000003' has teacher top-k probabilities summing to 7\.92\d* > 1 at response token 0"),
])
@pytest.mark.parametrize("block", [None, 3], ids=["one block", "blocks of 3 tokens"])
def test_top_k_cache_damage_is_refused_naming_file_and_row(world, tmp_path, monkeypatch, mutate, message, block):
    """Also with the checks in blocks of 3 response tokens: the damage then sits in a later block, often
    mid-row, and the error still names its row and token."""
    if block:
        monkeypatch.setattr(artifacts, "TOP_K_CHECK_TOKENS", block)
    bad = rewrite_top_k(world["cache_A_top8"], tmp_path / "bad.parquet", mutate)
    with pytest.raises(ArtifactError, match=r"bad\.parquet: " + message + ".*delete the cache and rerun"):
        read_cache(bad)


@pytest.mark.parametrize("column", ["teacher_topk_ids", "teacher_topk_logprobs"])
def test_a_null_inside_the_top_k_lists_is_refused_naming_file_row_and_column(world, tmp_path, column):
    bad = rewrite_top_k(world["cache_A_top8"], tmp_path / "null.parquet", set_top(2, column, 3, None))
    with pytest.raises(ArtifactError, match=rf"null\.parquet: row 2 \(id 'opd-000002'\) has a null in column "
                                            rf"'{column}' inside its list"):
        read_cache(bad)


def test_top_k_columns_missing_where_the_provenance_says_top_k(world, tmp_path):
    bad = rewrite_top_k(world["cache_A"], tmp_path / "nocols.parquet", mutate_meta=lambda m: m.update(top_k=8))
    with pytest.raises(ArtifactError, match=r"nocols\.parquet: missing columns \['teacher_topk_ids', "
                                            r"'teacher_topk_logprobs'\].*\(its provenance says top_k 8\)"):
        read_cache(bad)


def test_report_shows_cache_state_bytes_per_token(world):
    """8 bytes per response token without top-k (int32 id, float32 log-prob), 8 + 8 x 6 with the top 8."""
    from lightning_opd.report import cache_state

    table = cache_state([str(world["cache_A"]), str(world["cache_A_top8"]), "/nowhere/cache.parquet"])
    assert table.top_k.tolist() == [0, 8]
    assert table.state_bytes_per_token.tolist() == [8.0, 56.0]
    assert table.logprobs.tolist() == ["float32", "float32 + top-k float16"]


@pytest.mark.parametrize("loss, k", [("sampled", 0), ("topk_reverse_kl", 3)])
def test_the_training_set_keeps_the_cache_in_arrow_and_makes_each_example_on_load(world, loss, k):
    """Lightning OPD's training set is the cache's Arrow columns; a loaded row is the example built from
    the row itself: the teacher's log-probs (and first k of the stored top 8) at the response positions."""
    from lightning_opd.hparams import OPDParams
    from lightning_opd.lightning_opd import load_checked_cache
    from lightning_opd.modeling import load_tokenizer
    from lightning_opd.opd_trainer import opd_example
    from lightning_opd.provenance import describe_model

    cache = world["cache_A_top8"]
    dataset, meta = load_checked_cache(cache, describe_model(world["sft_A"]), load_tokenizer(world["sft_A"]), False,
                                       OPDParams(loss=loss, top_k=k or None))
    rows = pq.read_table(cache).to_pylist()
    assert len(dataset) == len(rows) and meta.get("loss_top_k", 0) == k
    assert dataset.table.column_names == ["prompt_ids", "response_ids", "teacher_logprobs"]  # Arrow, no lists
    for n in (0, len(rows) - 1):
        row, top = rows[n], [None, None]
        if k:
            top = [[values[i:i + 8][:k] for i in range(0, len(values), 8)]
                   for values in (row["teacher_topk_ids"], row["teacher_topk_logprobs"])]
        expected = opd_example(row["prompt_ids"], row["response_ids"], row["teacher_logprobs"], *top)
        got = dataset[n]
        assert set(got) == set(expected) and got["input_ids"] == expected["input_ids"]
        for key in expected:
            assert np.allclose(np.asarray(got[key], float), np.asarray(expected[key], float), atol=1e-3), key
    assert len(dataset.__getitems__([0, 1])) == 2


def test_rows_of_a_cache_in_many_chunks_load_as_from_one_and_out_of_range_is_refused(world):
    """A cache gathered from shards reads back in one chunk per shard (a row group each): its rows
    load as the same examples as from a table of one chunk, top k included."""
    from lightning_opd.lightning_opd import CacheRows, TopK

    table, _ = read_cache(world["cache_A_top8"])
    chunked = pa.concat_tables([table.slice(start, 5) for start in range(0, table.num_rows, 5)])
    assert chunked.column("response_ids").num_chunks == 3
    whole, parts = CacheRows(table, TopK(table, 8, 3)), CacheRows(chunked, TopK(chunked, 8, 3))
    picked = [11, 0, 5, 4, 10]
    for got, expected in zip(parts.__getitems__(picked), whole.__getitems__(picked), strict=True):
        assert got["input_ids"] == expected["input_ids"] and got["teacher_logprobs"] == expected["teacher_logprobs"]
        assert np.array_equal(got["teacher_topk_ids"], expected["teacher_topk_ids"])
    with pytest.raises(IndexError, match=r"rows \[12\] of a training set of 12 cached rollouts"):
        parts.__getitems__([3, 12])


def test_loading_a_micro_batch_copies_no_column_of_a_chunked_cache():
    """Loading rows takes one-row slices of the chunks: no column is joined into one array (what
    pyarrow's Table.take does to a chunked column, a copy of the whole cache per micro-batch).
    In a fresh process, so that the Arrow pool's peak starts from this table alone."""
    import subprocess
    import sys

    script = """
import numpy as np, pyarrow as pa
from lightning_opd.lightning_opd import CacheRows
rows, tokens = 2000, 500  # 4 MB of log-probs in 8 chunks
offsets = pa.array(np.arange(0, rows * tokens + 1, tokens, dtype=np.int32))
whole = pa.table({name: pa.ListArray.from_arrays(offsets, pa.array(values)) for name, values in (
    ("prompt_ids", np.zeros(rows * tokens, np.int32)), ("response_ids", np.ones(rows * tokens, np.int32)),
    ("teacher_logprobs", np.full(rows * tokens, -0.5, np.float32)))})
table = pa.concat_tables([whole.slice(start, 250) for start in range(0, rows, 250)])
pool, dataset = pa.default_memory_pool(), CacheRows(table)
before = pool.max_memory()
batch = dataset.__getitems__([1999, 0, 750, 1234])
assert [len(e["input_ids"]) for e in batch] == [2 * tokens] * 4
print(pool.max_memory() - before)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert int(out.split()[-1]) < 100_000  # one column of the table is 4,000,000 bytes


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_top_k_rows_from_the_cache_collate_to_the_tensors_of_the_same_examples_as_lists(world, packed):
    """A loaded top-k row carries the teacher's top k as (tokens, k) arrays sliced from the cache's columns,
    not as nested Python lists; a micro-batch of them collates to the same tensors, bit for bit and dtype for
    dtype, as the same examples written out as lists (how they were made before), padded or packed."""
    from lightning_opd.hparams import OPDParams
    from lightning_opd.lightning_opd import load_checked_cache
    from lightning_opd.modeling import load_tokenizer
    from lightning_opd.provenance import describe_model
    from lightning_opd.training import PackCollator, PadCollator, supervised_example

    cache, k, stored = world["cache_A_top8"], 3, 8
    dataset, _ = load_checked_cache(cache, describe_model(world["sft_A"]), load_tokenizer(world["sft_A"]), False,
                                    OPDParams(loss="topk_forward_kl", top_k=k))
    rows = pq.read_table(cache).to_pylist()
    picked = [0, 2, 1, len(rows) - 1]
    loaded = dataset.__getitems__(picked)
    assert all(isinstance(e["teacher_topk_ids"], np.ndarray) for e in loaded)
    as_lists = []
    for n in picked:
        row, prompt = rows[n], len(rows[n]["prompt_ids"])
        example = supervised_example(row["prompt_ids"], row["response_ids"])
        example["teacher_logprobs"] = [0.0] * len(row["prompt_ids"]) + row["teacher_logprobs"]
        for key in ("teacher_topk_ids", "teacher_topk_logprobs"):
            per_token = [row[key][i:i + stored][:k] for i in range(0, len(row[key]), stored)]
            zero = 0.0 if "logprobs" in key else 0
            example[key] = [[zero] * k] * prompt + [[type(zero)(x) for x in t] for t in per_token]
        as_lists.append(example)
    collate = PackCollator() if packed else PadCollator(0)
    got, expected = collate(loaded), collate(as_lists)
    assert set(got) == set(expected) and got["teacher_topk_ids"].shape[-1] == k
    for key, tensor in expected.items():
        if isinstance(tensor, torch.Tensor):
            assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key


def test_top_k_ids_outside_the_students_vocabulary_are_refused_with_the_row(world, tmp_path):
    from lightning_opd.hparams import OPDParams
    from lightning_opd.lightning_opd import load_checked_cache
    from lightning_opd.modeling import load_tokenizer, vocab_size
    from lightning_opd.provenance import describe_model

    width = vocab_size(world["sft_A"])
    bad = rewrite_top_k(world["cache_A_top8"], tmp_path / "wide.parquet", set_top(3, "teacher_topk_ids", 9, width))
    with pytest.raises(ArtifactError, match=rf"wide.parquet: row 'opd-000003' has top-k token id {width}, outside"):
        load_checked_cache(bad, describe_model(world["sft_A"]), load_tokenizer(world["sft_A"]), False,
                           OPDParams(loss="topk_forward_kl", top_k=4))
