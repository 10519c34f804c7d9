"""Stage 6: the teacher scores every rollout token once,
``log pi_T(y_t | x, y_<t)``, stored as float32 next to the token ids. The
metadata records the teacher, the rollout policy, and the teacher that wrote
the rollout policy's SFT data, so OPD can check teacher consistency."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from lightning_opd.artifacts import CACHE_SCHEMA, SAMPLES_SCHEMA, read_table, write_table
from lightning_opd.backends import BACKENDS, get_backend
from lightning_opd.modeling import check_context, load_tokenizer
from lightning_opd.provenance import check_same_tokenizer, describe_model, file_sha256, sft_teacher_of


def build_cache(teacher: str, rollouts_path: Path, out: Path, backend: str = "hf", label: str = "",
                max_response_tokens: int | None = None, temperature: float = 1.0,
                backend_options: dict | None = None) -> None:
    table, meta = read_table(rollouts_path, SAMPLES_SCHEMA)
    tokenizer = load_tokenizer(teacher)
    check_same_tokenizer(rollouts_path, meta, tokenizer, f"the teacher {teacher}")
    prompts = table.column("prompt_ids").to_pylist()
    responses = table.column("response_ids").to_pylist()
    if max_response_tokens:
        responses = [r[:max_response_tokens] for r in responses]
        table = table.set_column(table.schema.get_field_index("response_ids"), "response_ids", [responses])
    check_context(teacher, {i: len(p) + len(r) for i, p, r in zip(table.column("id").to_pylist(), prompts, responses)},
                  rollouts_path, "lower teacher_cache.max_response_tokens (or sample shorter rollouts)")
    scores = get_backend(backend, teacher, **(backend_options or {})).score(prompts, responses, temperature)
    for row_id, response, score in zip(table.column("id").to_pylist(), responses, scores):
        if len(score) != len(response) or not np.all(np.isfinite(score)):
            raise RuntimeError(f"teacher scores for {row_id!r} do not line up with its {len(response)} tokens")
    cache = table.append_column("teacher_logprobs", [[s.tolist() for s in scores]])
    policy = meta["model"]
    write_table(out, cache, CACHE_SCHEMA, {
        "stage": "teacher_cache",
        "teacher": {**describe_model(teacher), "label": label},
        "tokenizer_fingerprint": meta["tokenizer_fingerprint"],
        "score_temperature": temperature,
        "max_response_tokens": max_response_tokens,
        "rollouts": {"path": str(rollouts_path), "sha256": file_sha256(rollouts_path),
                     "sampling": meta["sampling"], "prompt_template": meta.get("prompt_template"),
                     "chat_template_kwargs": meta.get("chat_template_kwargs", {})},
        "rollout_policy": {"path": policy["path"], "fingerprint": policy["fingerprint"]},
        "sft_teacher": sft_teacher_of(policy),
        "backend": backend,
    })
    mean = float(np.mean(np.concatenate(scores))) if scores else float("nan")
    print(f"scored {sum(map(len, responses))} tokens of {len(responses)} rollouts "
          f"(mean teacher log-prob {mean:.3f}) -> {out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="hub id or local model directory")
    parser.add_argument("--rollouts", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--label", default="", help="a human name for the teacher")
    parser.add_argument("--backend", choices=BACKENDS, default="hf")
    parser.add_argument("--max-response-tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the scores")
    parser.add_argument("--backend-options", default="{}", help="JSON passed to the backend")
    args = parser.parse_args(argv)
    build_cache(args.teacher, args.rollouts, args.out, args.backend, args.label, args.max_response_tokens,
                args.temperature, json.loads(args.backend_options))


if __name__ == "__main__":
    main()
