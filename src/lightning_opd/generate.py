"""Stages 3 and 5: a model samples answers to a prompt set. The teacher writes
the SFT data; pi_ref writes the OPD rollouts. Token ids are stored as sampled,
with the model's fingerprint, its provenance and the sampling params."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from lightning_opd.artifacts import SAMPLES_SCHEMA, TASK_SCHEMA, read_table, write_table
from lightning_opd.backends import BACKENDS, get_backend
from lightning_opd.hparams import SamplingParams, parse_hparams
from lightning_opd.modeling import (DEFAULT_PROMPT_TEMPLATE, add_chat_template_argument, check_context, load_tokenizer,
                                    prompt_ids)
from lightning_opd.provenance import describe_model, file_sha256, tokenizer_fingerprint


def sample(model: str, prompts_path: Path, out: Path, params: SamplingParams, backend: str = "hf",
           label: str = "", prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
           backend_options: dict | None = None, chat_template_kwargs: dict | None = None) -> None:
    tasks, _ = read_table(prompts_path, TASK_SCHEMA)
    rows = tasks.to_pylist()
    tokenizer = load_tokenizer(model)
    prompts = [prompt_ids(tokenizer, row["problem"], prompt_template, chat_template_kwargs) for row in rows]
    check_context(model, {row["id"]: len(p) + params.max_new_tokens for row, p in zip(rows, prompts)}, prompts_path,
                  "prompt + max_new_tokens must fit: lower max_new_tokens of the sampling params or drop long prompts")
    engine = get_backend(backend, model, **(backend_options or {}))
    samples = engine.generate(prompts, params)
    records = []
    for row, prompt, outs in zip(rows, prompts, samples):
        for k, result in enumerate(outs):
            records.append({
                "id": row["id"] if params.n == 1 else f"{row['id']}#{k}",
                "problem": row["problem"],
                "answer": row["answer"],
                "prompt_ids": prompt,
                "response_ids": result.response_ids,
                "response_text": tokenizer.decode(result.response_ids, skip_special_tokens=True),
                "finished": result.finished,
            })
    finished = sum(r["finished"] for r in records)
    write_table(out, records, SAMPLES_SCHEMA, {
        "stage": "generate",
        "label": label,
        "model": describe_model(model),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "prompts": {"path": str(prompts_path), "sha256": file_sha256(prompts_path)},
        "prompt_template": prompt_template,
        "chat_template_kwargs": chat_template_kwargs or {},
        "sampling": dataclasses.asdict(params),
        "backend": backend,
    })
    print(f"{len(records)} samples ({finished} finished) -> {out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="hub id or local model directory")
    parser.add_argument("--prompts", type=Path, required=True, help="task parquet (id, problem, answer)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--label", default="", help="a human name for the model (e.g. the teacher's name)")
    parser.add_argument("--backend", choices=BACKENDS, default="hf")
    parser.add_argument("--sampling", default="{}", help="JSON of SamplingParams fields")
    parser.add_argument("--backend-options", default="{}", help="JSON passed to the backend (dtype, device, ...)")
    parser.add_argument("--prompt-template", default=DEFAULT_PROMPT_TEMPLATE)
    add_chat_template_argument(parser)
    args = parser.parse_args(argv)

    sample(args.model, args.prompts, args.out, parse_hparams(SamplingParams, args.sampling, "--sampling"),
           args.backend, args.label, args.prompt_template, json.loads(args.backend_options), args.chat_template_kwargs)


if __name__ == "__main__":
    main()
