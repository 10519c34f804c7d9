"""Stage 6: the teacher scores every rollout token once,
``log pi_T(y_t | x, y_<t)``, stored as float32 next to the token ids; with
``--top-k k`` also the teacher's k most likely tokens at every response
position (int32 ids, float16 log-probs; `artifacts.TOPK_FIELDS`). The
metadata records the teacher, the rollout policy, and the teacher that wrote
the rollout policy's SFT data, so OPD can check teacher consistency.

The rollouts are scored in shards (``lightning_opd.shards``): a rerun after a
kill scores only the missing ones, ``--data-parallel N`` runs N engines."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lightning_opd.artifacts import SAMPLES_SCHEMA, TOPK_DTYPES, cache_schema, read_table
from lightning_opd.backends import BACKENDS, get_backend, gpus_per_engine
from lightning_opd.modeling import check_context, load_tokenizer, vocab_size
from lightning_opd.provenance import check_same_tokenizer, describe_model, file_sha256, sft_teacher_of
from lightning_opd.shards import Part, ShardTask, add_shard_arguments, positive_int, run_sharded

DEFAULT_SHARD_SIZE = 1024


@dataclasses.dataclass
class ScoreTask(ShardTask):
    teacher: str
    rollouts_path: Path
    max_response_tokens: int | None
    temperature: float
    backend: str
    backend_options: dict
    top_k: int = 0
    unit = "tokens scored"

    def open(self) -> None:
        self.table, _ = read_table(self.rollouts_path, SAMPLES_SCHEMA)
        self.tokenizer = load_tokenizer(self.teacher) if self.max_response_tokens else None
        self.engine = get_backend(self.backend, self.teacher, scoring=True, **self.backend_options)

    def run(self, shard: range) -> tuple[pa.Table, int]:
        table = self.table.slice(shard.start, len(shard))
        if self.max_response_tokens:
            table = cut_responses(table, self.max_response_tokens, self.tokenizer)
        prompts = table.column("prompt_ids").to_pylist()
        responses = table.column("response_ids").to_pylist()
        schema = cache_schema(self.top_k)
        if self.top_k:
            scored = self.engine.score_top_k(prompts, responses, self.top_k, self.temperature)
            scores = [s.logprobs for s in scored]
        else:
            scores = self.engine.score(prompts, responses, self.temperature)
        for row_id, response, score in zip(table.column("id").to_pylist(), responses, scores):
            if len(score) != len(response) or not np.all(np.isfinite(score)):
                raise RuntimeError(f"teacher scores for {row_id!r} do not line up with its {len(response)} tokens")
        cache = table.append_column("teacher_logprobs", pa.array([s.tolist() for s in scores],
                                                                 schema.field("teacher_logprobs").type))
        if self.top_k:
            for row_id, response, s in zip(table.column("id").to_pylist(), responses, scored):
                if s.ids.shape != (len(response), self.top_k) or not np.all(np.isfinite(s.top_logprobs)):
                    raise RuntimeError(f"teacher top-{self.top_k} scores for {row_id!r} do not line up with its "
                                       f"{len(response)} tokens")
            ids_field, logprobs_field = schema.field("teacher_topk_ids"), schema.field("teacher_topk_logprobs")
            cache = cache.append_column(ids_field, pa.array([s.ids.ravel() for s in scored], ids_field.type))
            half = logprobs_field.type.value_type.to_pandas_dtype()
            # a log-prob below float16's range (-65504; a probability of 0 either way) would be stored as -inf,
            # which passes here and fails the finished cache's checks
            floor = np.finfo(half).min
            cache = cache.append_column(logprobs_field, pa.array([np.maximum(s.top_logprobs, floor).astype(half).ravel()
                                                                  for s in scored], logprobs_field.type))
        return cache, sum(map(len, prompts)) + sum(map(len, responses))


def cut_responses(table: pa.Table, limit: int, tokenizer) -> pa.Table:
    """The rollouts with every response cut to `limit` tokens; a cut row's text is that of its kept
    tokens and it counts as unfinished, as a generation stopped at `limit` would."""
    cut = pc.greater(pc.list_value_length(table.column("response_ids")), limit).to_pylist()
    if not any(cut):  # the usual case: no token list leaves arrow
        return table
    responses = table.column("response_ids").to_pylist()
    texts = table.column("response_text").to_pylist()
    finished = table.column("finished").to_pylist()
    for i in (i for i, c in enumerate(cut) if c):
        responses[i] = responses[i][:limit]
        texts[i] = tokenizer.decode(responses[i], skip_special_tokens=True)
        finished[i] = False
    for name, values in (("response_ids", responses), ("response_text", texts), ("finished", finished)):
        table = table.set_column(table.schema.get_field_index(name), name,
                                 pa.array(values, SAMPLES_SCHEMA.field(name).type))
    return table


def build_cache(teacher: str, rollouts_path: Path, out: Path, backend: str = "hf", label: str = "",
                max_response_tokens: int | None = None, temperature: float = 1.0,
                backend_options: dict | None = None, top_k: int = 0, *, shard_size: int = DEFAULT_SHARD_SIZE,
                work_dir: Path | None = None, data_parallel: int = 1, part: Part | None = None) -> None:
    backend_options = backend_options or {}
    if top_k < 0:
        raise ValueError(f"--top-k (teacher_cache.top_k) must be 0 (no top-k) or positive, got {top_k}")
    if backend == "vllm" and top_k > backend_options.get("max_logprobs", 20):
        # vLLM refuses prompt_logprobs above its max_logprobs (20 by default)
        backend_options = {**backend_options, "max_logprobs": top_k}
    table, meta = read_table(rollouts_path, SAMPLES_SCHEMA)
    tokenizer = load_tokenizer(teacher)
    check_same_tokenizer(rollouts_path, meta, tokenizer, f"the teacher {teacher}")
    # lengths from the list offsets: the token lists as Python objects would take ~40 bytes a token
    # (~3 GB for 17.9K rollouts of 4,096 tokens)
    responses = pc.list_value_length(table.column("response_ids")).to_numpy(zero_copy_only=False)
    if max_response_tokens:
        responses = np.minimum(responses, max_response_tokens)
    totals = pc.list_value_length(table.column("prompt_ids")).to_numpy(zero_copy_only=False) + responses
    lengths = dict(zip(table.column("id").to_pylist(), totals.tolist()))
    check_context(
        teacher, lengths, rollouts_path, "lower teacher_cache.max_response_tokens (or sample shorter rollouts)"
    )
    if backend == "vllm":
        from lightning_opd.backends.vllm import SCORING_ENGINE_OPTIONS

        engine_options = {**backend_options, **SCORING_ENGINE_OPTIONS}
    else:
        engine_options = backend_options
    if top_k > (width := vocab_size(teacher)):
        raise ValueError(f"--top-k (teacher_cache.top_k) {top_k} is more than the {width} tokens of the teacher "
                         f"{teacher}'s vocabulary; lower it")
    teacher_record = describe_model(teacher)
    policy = meta["model"]
    rollouts = {
        "path": str(rollouts_path),
        "sha256": file_sha256(rollouts_path),
        "sampling": meta["sampling"],
        "prompt_template": meta.get("prompt_template"),
        "chat_template_kwargs": meta.get("chat_template_kwargs", {}),
    }
    metadata = {
        "stage": "teacher_cache",
        "teacher": {**teacher_record, "label": label},
        "tokenizer_fingerprint": meta["tokenizer_fingerprint"],
        "score_temperature": temperature,
        "max_response_tokens": max_response_tokens,
        "rollouts": rollouts,
        "rollout_policy": {"path": policy["path"], "fingerprint": policy["fingerprint"]},
        "sft_teacher": sft_teacher_of(policy),
        "backend": backend,
        "backend_options": engine_options,
        "top_k": top_k,
        **({"top_k_dtypes": TOPK_DTYPES} if top_k else {}),
    }
    key = {
        "stage": "teacher_cache",
        "teacher": teacher_record["fingerprint"],
        "rollouts": rollouts["sha256"],
        "temperature": temperature,
        "max_response_tokens": max_response_tokens,
        "backend": backend,
        "backend_options": engine_options,
        **({"top_k": top_k} if top_k else {}),
    }
    task = ScoreTask(teacher, rollouts_path, max_response_tokens, temperature, backend, backend_options, top_k)
    run_sharded(
        task,
        name=f"teacher_cache {label}".strip(),
        n_rows=table.num_rows,
        shard_size=shard_size,
        key=key,
        work_root=work_dir,
        out=out,
        schema=cache_schema(top_k),
        metadata=metadata,
        data_parallel=data_parallel,
        gpus_per_engine=gpus_per_engine(backend, backend_options),
        part=part,
    )
    scores = pq.read_table(out, columns=["teacher_logprobs"]).column("teacher_logprobs").combine_chunks()
    flat = scores.flatten().to_numpy(zero_copy_only=False)
    mean = float(np.mean(flat)) if len(flat) else float("nan")
    print(f"scored {len(flat)} tokens of {len(scores)} rollouts (mean teacher log-prob {mean:.3f}) -> {out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="hub id or local model directory")
    parser.add_argument("--rollouts", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--label", default="", help="a human name for the teacher")
    parser.add_argument("--backend", choices=BACKENDS, default="hf")
    parser.add_argument("--max-response-tokens", type=positive_int, default=4096,
                        help="rollouts are cut to this many response tokens before scoring")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the scores")
    parser.add_argument("--backend-options", default="{}", help="JSON passed to the backend")
    parser.add_argument("--top-k", type=int, default=16,
                        help="also store the teacher's k most likely tokens at every response position (0: no)")
    add_shard_arguments(parser, DEFAULT_SHARD_SIZE)
    args = parser.parse_args(argv)
    build_cache(
        args.teacher,
        args.rollouts,
        args.out,
        args.backend,
        args.label,
        args.max_response_tokens,
        args.temperature,
        json.loads(args.backend_options),
        args.top_k,
        shard_size=args.shard_size,
        work_dir=args.work_dir,
        data_parallel=args.data_parallel,
        part=args.part,
    )


if __name__ == "__main__":
    main()
