"""Stage 2b: build a tiny Qwen3 model from scratch and train it, either on
gold solutions in chat form (a teacher, in one solution style), on the gold
solutions as plain text in every style (a student "base" that has read both
styles but not the chat task), or on bare arithmetic facts."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, Trainer

from lightning_opd.artifacts import TASK_SCHEMA, read_table
from lightning_opd.hparams import ArchParams, TrainParams, parse_hparams
from lightning_opd.modeling import load_tokenizer, prompt_ids, tiny_qwen3_config
from lightning_opd.provenance import file_sha256, tokenizer_fingerprint
from lightning_opd.task import SOLUTION_STYLES, arithmetic_facts
from lightning_opd.task_data import recorded_task
from lightning_opd.training import (
    add_tracking_argument,
    check_outputs_writable,
    checkpoint_dir,
    collator,
    end_process_group,
    params_record,
    save_final,
    supervised_example,
    tracking_params,
    train_with_resume,
    training_arguments,
)

CORPORA = ("solutions", "raw_solutions", "facts")


def corpus_examples(corpus: str, style: str, task_file: Path, tokenizer) -> list[dict]:
    table, meta = read_table(task_file, TASK_SCHEMA)
    eos = [tokenizer.eos_token_id]
    problems = table.column("problem").to_pylist()
    column = {"chain": "solution", "words": "solution_words"}
    pairs = zip(problems, table.column(column[style]).to_pylist())
    if corpus == "solutions":  # chat form, loss on the answer: how a teacher learns the task
        return [supervised_example(prompt_ids(tokenizer, problem), tokenizer(solution)["input_ids"] + eos)
                for problem, solution in pairs]
    if corpus == "raw_solutions":  # plain text, no chat turns: what a base model saw in pretraining
        # in every style, so that SFT on either teacher's style starts from the same footing
        return [supervised_example([], tokenizer(f"{problem} {solution}")["input_ids"] + eos)
                for name in SOLUTION_STYLES
                for problem, solution in zip(problems, table.column(column[name]).to_pylist())]
    facts = arithmetic_facts(recorded_task(task_file, meta))
    return [supervised_example([], tokenizer(fact)["input_ids"] + eos) for fact in facts]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument(
        "--task-file", type=Path, required=True, help="task parquet whose gold solutions are the corpus"
    )
    parser.add_argument("--corpus", choices=CORPORA, required=True)
    parser.add_argument("--style", choices=SOLUTION_STYLES, default="chain")
    parser.add_argument("--arch", default="{}", help="JSON of ArchParams fields")
    parser.add_argument("--train", default="{}", help="JSON of TrainParams fields")
    parser.add_argument("--label", default="")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--checkpoint-root", type=Path, required=True)
    add_tracking_argument(parser)
    args = parser.parse_args(argv)
    arch = parse_hparams(ArchParams, args.arch, "--arch")
    train = parse_hparams(TrainParams, args.train, "--train")
    tracking = tracking_params(args.tracking)
    check_outputs_writable(args.out, args.checkpoint_root)

    tokenizer = load_tokenizer(args.tokenizer)
    examples = corpus_examples(args.corpus, args.style, args.task_file, tokenizer)
    torch.manual_seed(train.seed)
    model = AutoModelForCausalLM.from_config(tiny_qwen3_config(arch, tokenizer))
    print(f"{args.label or 'model'}: {model.num_parameters() / 1e6:.2f}M parameters, {len(examples)} examples")
    key = {
        "stage": "pretrain",
        "corpus": args.corpus,
        "style": args.style,
        "arch": params_record(arch),
        "train": params_record(train),
        "task": file_sha256(args.task_file),
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    trainer = Trainer(
        model=model,
        args=training_arguments(train, checkpoint_dir(args.checkpoint_root, key), tracking),
        train_dataset=Dataset.from_list(examples),
        data_collator=collator(train, tokenizer.pad_token_id),
    )
    train_with_resume(trainer)
    save_final(trainer, tokenizer, args.out, {**key, "label": args.label})
    print(f"-> {args.out}")
    end_process_group()


if __name__ == "__main__":
    main()
