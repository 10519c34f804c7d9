"""Damaged, empty, non-finite, mismatched, foreign and over-long artifacts
given to the stage that reads them: each is refused with an error that names
the file and says what to do, nothing is left at the target path, and the
stage completes once the input is put right."""
from __future__ import annotations

import json
import shutil

import pytest
from inject import assert_nothing_at, assert_refused, call, rewrite

from lightning_opd import generate, lightning_opd, sft, teacher_cache
from lightning_opd.artifacts import SAMPLES_SCHEMA, read_table, write_table

TWO_STEPS = {"max_steps": 2, "batch_size": 4, "save_steps": 100, "learning_rate": 1e-4}


def set_logprob(value):
    def mutate(rows):
        rows[2]["teacher_logprobs"][1] = value
    return mutate


def drop_meta(*keys):
    def mutate(meta):
        for dotted in keys:
            *parents, last = dotted.split(".")
            node = meta
            for part in parents:
                node = node[part]
            del node[last]
    return mutate


def lengthen(rows):
    """One rollout longer than the models' 256-token context, with log-probs that line up."""
    rows[0]["response_ids"] = rows[0]["response_ids"] * 40
    rows[0]["teacher_logprobs"] = rows[0]["teacher_logprobs"] * 40


CACHE_FAULTS = {
    "nan-logprob": (dict(mutate_rows=set_logprob(float("nan"))), "teacher log-prob nan"),
    "inf-logprob": (dict(mutate_rows=set_logprob(float("inf"))), "teacher log-prob inf"),
    "minus-inf-logprob": (dict(mutate_rows=set_logprob(float("-inf"))), "teacher log-prob -inf"),
    "positive-logprob": (dict(mutate_rows=set_logprob(3.0)), "must be finite and <= 0"),
    "fewer-logprobs-than-tokens": (dict(mutate_rows=lambda rows: rows[4].update(
        teacher_logprobs=rows[4]["teacher_logprobs"][:-1])), "does not line up"),
    "empty": (dict(mutate_rows=lambda rows: []), "has no rows"),
    "metadata-lacks-rollout-policy": (dict(mutate_meta=drop_meta("rollout_policy")), "lacks ['rollout_policy.path'"),
    "metadata-lacks-teacher-fingerprint": (dict(mutate_meta=drop_meta("teacher.fingerprint")), "teacher.fingerprint"),
    "metadata-not-json": (dict(raw_meta=b"{truncated"), "not valid JSON"),
    "foreign-tokenizer": (dict(mutate_meta=lambda m: m.update(tokenizer_fingerprint="feedfacefeedface")),
                          "token ids come from tokenizer feedfacefeedface"),
    "over-long": (dict(mutate_rows=lengthen), "longer than the context"),
}


@pytest.mark.parametrize("fault", CACHE_FAULTS)
def test_lightning_opd_refuses_a_bad_cache(world, tmp_path, fault):
    damage, message = CACHE_FAULTS[fault]
    cache, out = tmp_path / "cache.parquet", tmp_path / "models" / "lopd"
    rewrite(world["cache_A"], cache, **damage)
    argv = ["--init", world["sft_A"], "--cache", cache, "--opd", json.dumps(TWO_STEPS), "--out", out,
            "--checkpoint-root", tmp_path / "ckpt", "--drift-n", 0]
    outcome = call(lightning_opd.main, argv)
    assert_refused(outcome, str(cache), message)
    assert_nothing_at(out)

    shutil.copy(world["cache_A"], cache)  # the input put right
    assert call(lightning_opd.main, argv).returncode == 0
    assert (out / "model.safetensors").is_file()


def set_top_logprob(value):
    def mutate(rows):
        rows[2]["teacher_topk_logprobs"][3] = value
    return mutate


TOPK_LOSS = {**TWO_STEPS, "loss": "topk_reverse_kl"}
# (cache to damage, its damage, the --opd of the run, what the error says); the put-right input is the top-8 cache
TOPK_FAULTS = {
    "nan-top-k-logprob": ("cache_A_top8", dict(mutate_rows=set_top_logprob(float("nan"))), TOPK_LOSS,
                          "teacher top-k log-prob nan"),
    "fewer-top-k-than-tokens": ("cache_A_top8", dict(mutate_rows=lambda rows: rows[4].update(
        teacher_topk_ids=rows[4]["teacher_topk_ids"][:-8])), TOPK_LOSS, "values in teacher_topk_ids"),
    "foreign-tokenizer": ("cache_A_top8", dict(mutate_meta=lambda m: m.update(tokenizer_fingerprint="feedface")),
                          TOPK_LOSS, "token ids come from tokenizer feedface"),
    "no-top-k-in-cache": ("cache_A", {}, TOPK_LOSS, "teacher_cache.top_k"),
    "loss-k-above-cache-k": ("cache_A_top8", {}, {**TOPK_LOSS, "top_k": 9}, "lightning_opd.top_k 9"),
}


@pytest.mark.parametrize("fault", TOPK_FAULTS)
def test_top_k_loss_refuses_a_bad_or_too_small_cache(world, tmp_path, fault):
    source, damage, opd, message = TOPK_FAULTS[fault]
    cache, out = tmp_path / "cache.parquet", tmp_path / "models" / "lopd"
    rewrite(world[source], cache, **damage)
    argv = ["--init", world["sft_A"], "--cache", cache, "--opd", json.dumps(opd), "--out", out,
            "--checkpoint-root", tmp_path / "ckpt", "--drift-n", 0]
    assert_refused(call(lightning_opd.main, argv), str(cache), message)
    assert_nothing_at(out)

    shutil.copy(world["cache_A_top8"], cache)  # the input put right
    argv[5] = json.dumps(TOPK_LOSS)
    assert call(lightning_opd.main, argv).returncode == 0
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "no-provenance"])
def test_unreadable_cache_is_named(world, tmp_path, damage):
    cache, out = tmp_path / "cache.parquet", tmp_path / "lopd"
    data = world["cache_A"].read_bytes()
    if damage == "truncated":
        cache.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        cache.write_bytes(b"\0" * 4096)
    else:
        import pyarrow.parquet as pq
        pq.write_table(pq.read_table(world["cache_A"]).replace_schema_metadata({}), cache)
    argv = ["--init", world["sft_A"], "--cache", cache, "--opd", json.dumps(TWO_STEPS), "--out", out,
            "--checkpoint-root", tmp_path / "ckpt", "--drift-n", 0]
    assert_refused(call(lightning_opd.main, argv), str(cache))
    assert_nothing_at(out)
    shutil.copy(world["cache_A"], cache)
    assert call(lightning_opd.main, argv).returncode == 0


def all_unfinished(rows):
    for row in rows:
        row["finished"] = False


KEEP_UNFINISHED = ["--keep-unfinished"]
# (damage, what the error says (one or more parts), the SFT flags of the refused run); the run put right
# keeps unfinished answers (the world's random teacher rarely finishes one)
SFT_FAULTS = {
    "empty": (dict(mutate_rows=lambda rows: []), "has no rows", KEEP_UNFINISHED),
    "metadata-lacks-model": (dict(mutate_meta=drop_meta("model")), "lacks ['model.path', 'model.fingerprint']",
                             KEEP_UNFINISHED),
    "foreign-tokenizer": (dict(mutate_meta=lambda m: m.update(tokenizer_fingerprint="0123456789abcdef")),
                          "token ids come from tokenizer 0123456789abcdef", KEEP_UNFINISHED),
    "over-long": (dict(mutate_rows=lambda rows: rows[3].update(response_ids=rows[3]["response_ids"] * 40)),
                  "longer than the context", KEEP_UNFINISHED),
    "no-finished-answer": (dict(mutate_rows=all_unfinished),
                           ("none of its 16 responses finished", "set sft.keep_unfinished: true",
                            "raise sft_data.sampling.max_new_tokens"), []),
}


@pytest.mark.parametrize("fault", SFT_FAULTS)
def test_sft_refuses_bad_sft_data(world, tmp_path, fault):
    damage, message, flags = SFT_FAULTS[fault]
    messages = (message,) if isinstance(message, str) else message
    data, out = tmp_path / "sft_data.parquet", tmp_path / "sft"
    rewrite(world["root"] / "sft_data-A.parquet", data, **damage)
    argv = ["--base", world["student_base"], "--sft-data", data, "--out", out,
            "--checkpoint-root", tmp_path / "ckpt", "--train", json.dumps(TWO_STEPS)]
    assert_refused(call(sft.main, [*argv, *flags]), str(data), *messages)
    assert_nothing_at(out)
    shutil.copy(world["root"] / "sft_data-A.parquet", data)
    assert call(sft.main, [*argv, *KEEP_UNFINISHED]).returncode == 0


@pytest.mark.parametrize("given", ["rows", "table"])
def test_writing_an_empty_artifact_is_refused_and_leaves_nothing(tmp_path, given):
    out = tmp_path / "samples.parquet"
    rows = [] if given == "rows" else SAMPLES_SCHEMA.empty_table()
    metadata = {"model": {"path": "m", "fingerprint": "f"}, "tokenizer_fingerprint": "t", "sampling": {}}
    outcome = call(lambda argv: write_table(out, rows, SAMPLES_SCHEMA, metadata), [])
    assert_refused(outcome, "ArtifactError", str(out), "no rows")
    assert_nothing_at(out)
    row = {"id": "p-0", "problem": "1 + 1", "answer": "2", "prompt_ids": [1, 2], "response_ids": [3],
           "response_text": "2", "finished": True}
    write_table(out, [row], SAMPLES_SCHEMA, metadata)
    table, meta = read_table(out, SAMPLES_SCHEMA)
    assert table.to_pylist() == [row] and meta == metadata


ROLLOUT_FAULTS = {
    "empty": (dict(mutate_rows=lambda rows: []), "has no rows"),
    "metadata-lacks-sampling": (dict(mutate_meta=drop_meta("sampling")), "lacks ['sampling']"),
    "foreign-tokenizer": (dict(mutate_meta=lambda m: m.update(tokenizer_fingerprint="0123456789abcdef")),
                          "token ids come from tokenizer 0123456789abcdef"),
    "over-long": (dict(mutate_rows=lambda rows: rows[0].update(response_ids=rows[0]["response_ids"] * 40)),
                  "longer than the context"),
}


@pytest.mark.parametrize("fault", ROLLOUT_FAULTS)
def test_teacher_cache_refuses_bad_rollouts(world, tmp_path, fault):
    damage, message = ROLLOUT_FAULTS[fault]
    rollouts, out = tmp_path / "rollouts.parquet", tmp_path / "cache.parquet"
    rewrite(world["rollouts"], rollouts, **damage)
    argv = ["--teacher", world["teacher_A"], "--rollouts", rollouts, "--out", out, "--label", "A"]
    assert_refused(call(teacher_cache.main, argv), str(rollouts), message)
    assert_nothing_at(out)
    shutil.copy(world["rollouts"], rollouts)
    assert call(teacher_cache.main, argv).returncode == 0 and out.is_file()


def sample_argv(world, prompts, out, **sampling):
    return ["--model", world["teacher_A"], "--prompts", prompts, "--out", out, "--label", "A",
            "--sampling", json.dumps({"max_new_tokens": 8, "batch_size": 16, **sampling})]


def test_generation_refuses_empty_prompts(world, tmp_path):
    prompts, out = tmp_path / "prompts.parquet", tmp_path / "samples.parquet"
    rewrite(world["data"] / "opd.parquet", prompts, mutate_rows=lambda rows: [])
    assert_refused(call(generate.main, sample_argv(world, prompts, out)), str(prompts), "has no rows")
    assert_nothing_at(out)
    shutil.copy(world["data"] / "opd.parquet", prompts)
    assert call(generate.main, sample_argv(world, prompts, out)).returncode == 0


def test_generation_refuses_prompts_longer_than_the_context(world, tmp_path):
    prompts, out = tmp_path / "prompts.parquet", tmp_path / "samples.parquet"
    rewrite(world["data"] / "opd.parquet", prompts,
            mutate_rows=lambda rows: rows[5].update(problem=" + ".join(["7"] * 300)))
    assert_refused(call(generate.main, sample_argv(world, prompts, out)), str(prompts), "opd-000005",
                   "max_position_embeddings")
    assert_nothing_at(out)
    shutil.copy(world["data"] / "opd.parquet", prompts)
    assert call(generate.main, sample_argv(world, prompts, out)).returncode == 0


def test_generation_refuses_max_new_tokens_past_the_context(world, tmp_path):
    prompts, out = world["data"] / "opd.parquet", tmp_path / "samples.parquet"
    outcome = call(generate.main, sample_argv(world, prompts, out, max_new_tokens=400))
    assert_refused(outcome, str(prompts), "256 tokens", "max_new_tokens")
    assert_nothing_at(out)
    assert call(generate.main, sample_argv(world, prompts, out, max_new_tokens=8)).returncode == 0


def test_prompt_template_without_placeholder_is_refused(world, tmp_path):
    out = tmp_path / "samples.parquet"
    argv = sample_argv(world, world["data"] / "opd.parquet", out)
    assert_refused(call(generate.main, [*argv, "--prompt-template", "Solve it: \\boxed{}"]), "prompt_template",
                   "{problem}")
    assert_nothing_at(out)
    template = "Solve {problem} and put the answer in \\boxed{}."
    assert call(generate.main, [*argv, "--prompt-template", template]).returncode == 0
    import pyarrow.parquet as pq
    meta = json.loads(pq.read_schema(out).metadata[b"lightning_opd"])
    assert meta["prompt_template"] == template
