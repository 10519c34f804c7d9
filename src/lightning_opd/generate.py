"""Stages 3 and 5: a model samples answers to a prompt set. The teacher writes
the SFT data; pi_ref writes the OPD rollouts. Token ids are stored as sampled,
with the model's fingerprint, its provenance and the sampling params.

The prompt set is worked through in shards (``lightning_opd.shards``): a
rerun after a kill redoes only the missing ones, ``--data-parallel N`` runs N
engines, and the result is the same either way."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lightning_opd.artifacts import SAMPLES_SCHEMA, TASK_SCHEMA, read_table
from lightning_opd.backends import BACKENDS, get_backend, gpus_per_engine
from lightning_opd.hparams import SamplingParams, parse_hparams
from lightning_opd.modeling import (
    DEFAULT_PROMPT_TEMPLATE,
    add_chat_template_argument,
    check_context,
    load_tokenizer,
    prompt_ids,
)
from lightning_opd.provenance import describe_model, file_sha256, tokenizer_fingerprint
from lightning_opd.shards import Part, ShardTask, add_shard_arguments, run_sharded

DEFAULT_SHARD_SIZE = 256


@dataclasses.dataclass
class SampleTask(ShardTask):
    model: str
    prompts_path: Path
    params: SamplingParams
    backend: str
    backend_options: dict
    prompt_template: str
    chat_template_kwargs: dict
    unit = "tokens generated"

    def open(self) -> None:
        self.tasks, _ = read_table(self.prompts_path, TASK_SCHEMA)
        self.tokenizer = load_tokenizer(self.model)
        self.engine = get_backend(self.backend, self.model, **self.backend_options)

    def run(self, shard: range) -> tuple[pa.Table, int]:
        tokenizer, params, prompt_template = self.tokenizer, self.params, self.prompt_template
        rows = self.tasks.slice(shard.start, len(shard)).to_pylist()
        prompts = [prompt_ids(tokenizer, row["problem"], prompt_template, self.chat_template_kwargs) for row in rows]
        samples = self.engine.generate(prompts, params, first_index=shard.start)
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
        tokens = sum(len(r["response_ids"]) for r in records)
        return pa.Table.from_pylist(records, schema=SAMPLES_SCHEMA), tokens


def sample(model: str, prompts_path: Path, out: Path, params: SamplingParams, backend: str = "hf",
           label: str = "", prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
           backend_options: dict | None = None, chat_template_kwargs: dict | None = None, *,
           shard_size: int = DEFAULT_SHARD_SIZE,
           work_dir: Path | None = None, data_parallel: int = 1, part: Part | None = None) -> None:
    """Sample ``params.n`` answers per prompt into ``out``. Shards of
    ``shard_size`` prompts are kept under ``work_dir`` (default: next to
    ``out``) until the whole set is done; ``part`` does one group of shards
    of a stage split over jobs (``lightning_opd.shards --gather`` joins them)."""
    backend_options, chat_template_kwargs = backend_options or {}, chat_template_kwargs or {}
    tasks, _ = read_table(prompts_path, TASK_SCHEMA)
    tokenizer = load_tokenizer(model)
    lengths = {
        row_id: len(prompt_ids(tokenizer, problem, prompt_template, chat_template_kwargs)) + params.max_new_tokens
        for row_id, problem in zip(tasks.column("id").to_pylist(), tasks.column("problem").to_pylist())
    }
    check_context(
        model,
        lengths,
        prompts_path,
        "prompt + max_new_tokens must fit: lower max_new_tokens of the sampling params or drop long prompts",
    )
    model_record = describe_model(model)
    metadata = {
        "stage": "generate",
        "label": label,
        "model": model_record,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "prompts": {"path": str(prompts_path), "sha256": file_sha256(prompts_path)},
        "prompt_template": prompt_template,
        "chat_template_kwargs": chat_template_kwargs,
        "sampling": dataclasses.asdict(params),
        "backend": backend,
        "shard_size": shard_size,  # the transformers backend seeds per shard
    }
    # everything the samples depend on; not data_parallel, which does not change them
    key = {
        "stage": "generate",
        "model": model_record["fingerprint"],
        "prompts": metadata["prompts"]["sha256"],
        "prompt_template": prompt_template,
        "chat_template_kwargs": chat_template_kwargs,
        "sampling": metadata["sampling"],
        "backend": backend,
        "backend_options": backend_options,
    }
    task = SampleTask(model, prompts_path, params, backend, backend_options, prompt_template, chat_template_kwargs)
    run_sharded(
        task,
        name=f"generate {label}".strip(),
        n_rows=tasks.num_rows,
        shard_size=shard_size,
        key=key,
        work_root=work_dir,
        out=out,
        schema=SAMPLES_SCHEMA,
        metadata=metadata,
        data_parallel=data_parallel,
        gpus_per_engine=gpus_per_engine(backend, backend_options),
        part=part,
    )
    finished = pq.read_table(out, columns=["finished"]).column("finished").to_pylist()
    print(f"{len(finished)} samples ({sum(finished)} finished) -> {out}")


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
    add_shard_arguments(parser, DEFAULT_SHARD_SIZE)
    args = parser.parse_args(argv)

    sample(
        args.model,
        args.prompts,
        args.out,
        parse_hparams(SamplingParams, args.sampling, "--sampling"),
        args.backend,
        args.label,
        args.prompt_template,
        json.loads(args.backend_options),
        args.chat_template_kwargs,
        shard_size=args.shard_size,
        work_dir=args.work_dir,
        data_parallel=args.data_parallel,
        part=args.part,
    )


if __name__ == "__main__":
    main()
