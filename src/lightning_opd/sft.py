"""Stage 4: supervised fine-tuning of the student base on the teacher's
answers (loss on answer tokens only) -> pi_ref. The model records which
teacher wrote its SFT data; OPD checks that record. The loss goes through
the chunked log-probs of `lightning_opd.logprobs`: the model's own loss
would hold the [tokens x vocab] logits in fp32 several times (~15 GB per
micro-batch of 8K tokens at Qwen3's vocabulary)."""
from __future__ import annotations

import argparse
from pathlib import Path

from datasets import Dataset
from transformers import Trainer

from lightning_opd.artifacts import SAMPLES_SCHEMA, ArtifactError, read_table
from lightning_opd.hparams import TrainParams, parse_hparams
from lightning_opd.logprobs import response_logprobs
from lightning_opd.modeling import DEFAULT_PROMPT_TEMPLATE, check_context, load_tokenizer, prompt_ids
from lightning_opd.provenance import check_same_tokenizer, describe_model, file_sha256
from lightning_opd.training import (
    add_tracking_argument,
    check_outputs_writable,
    checkpoint_dir,
    collator,
    end_process_group,
    load_for_fsdp,
    params_record,
    save_final,
    supervised_example,
    tracking_params,
    train_with_resume,
    training_arguments,
)

PROBE_ROWS = 64


class SFTTrainer(Trainer):
    """The model's loss, the mean negative log-likelihood of the response
    tokens, computed chunk by chunk. ``num_items_in_batch``: the response tokens
    of the whole optimiser step, as in `opd_trainer.OPDTrainer.compute_loss`."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logprobs, mask = response_logprobs(model, inputs)
        loss = -(logprobs * mask).sum() / (mask.sum() if num_items_in_batch is None else num_items_in_batch)
        if num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        return (loss, None) if return_outputs else loss


def check_same_prompts(sft_data: Path, meta: dict, rows: list[dict], tokenizer, student: str) -> None:
    """The SFT prompts were rendered by the teacher's tokenizer (chat template),
    the rollouts will be by the student's: the student must render the same
    problems to the same ids, or pi_ref learns one prompt format and samples
    in another. Checked on up to PROBE_ROWS rows spread over the data."""
    template = meta.get("prompt_template") or DEFAULT_PROMPT_TEMPLATE
    step = max(1, len(rows) // PROBE_ROWS)
    for row in rows[::step][:PROBE_ROWS]:
        stored = list(row["prompt_ids"])
        mine = prompt_ids(tokenizer, row["problem"], template, meta.get("chat_template_kwargs"))
        if stored != mine:
            at = next((i for i, (a, b) in enumerate(zip(stored, mine)) if a != b), min(len(stored), len(mine)))

            def show(ids, at=at):
                return repr(tokenizer.decode(ids[max(0, at - 8):at + 24]))

            raise ArtifactError(
                f"{sft_data}: the teacher {meta['model']['path']} and the student {student} render the prompt of "
                f"row {row['id']!r} differently (their chat templates differ): first difference at token {at}: "
                f"teacher {stored[at:at + 1]} in {show(stored)}, student {mine[at:at + 1]} in {show(mine)}. "
                "Give both models the same chat template (copy the teacher's chat_template.jinja, or the "
                "chat_template of its tokenizer_config.json, into the student's directory).")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="student base model: hub id or local directory")
    parser.add_argument("--sft-data", type=Path, required=True, help="samples parquet written by the teacher")
    parser.add_argument("--train", default="{}", help="JSON of TrainParams fields")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--checkpoint-root", type=Path, required=True)
    parser.add_argument("--keep-unfinished", action="store_true",
                        help="also train on answers cut at the length limit (dropped by default)")
    add_tracking_argument(parser)
    args = parser.parse_args(argv)
    train = parse_hparams(TrainParams, args.train, "--train")
    tracking = tracking_params(args.tracking)
    check_outputs_writable(args.out, args.checkpoint_root)

    table, meta = read_table(args.sft_data, SAMPLES_SCHEMA)
    tokenizer = load_tokenizer(args.base)
    check_same_tokenizer(args.sft_data, meta, tokenizer, f"the student {args.base}")
    rows = [r for r in table.to_pylist() if r["finished"] or args.keep_unfinished]
    if not rows:
        raise ArtifactError(
            f"{args.sft_data}: none of its {table.num_rows} responses finished (all were cut at the length limit), "
            "so there is nothing to train on: set sft.keep_unfinished: true (--keep-unfinished) to train on them, "
            "or raise sft_data.sampling.max_new_tokens and rerun the sft_data stage")
    check_same_prompts(args.sft_data, meta, rows, tokenizer, args.base)
    examples = [supervised_example(r["prompt_ids"], r["response_ids"]) for r in rows]
    check_context(args.base, {r["id"]: len(e["input_ids"]) for r, e in zip(rows, examples)}, args.sft_data,
                  "write the SFT data with a lower max_new_tokens (sft_data.sampling)")
    print(f"SFT on {len(examples)} of {table.num_rows} teacher answers")

    base = describe_model(args.base)
    sft_teacher = {"label": meta.get("label", ""), "fingerprint": meta["model"]["fingerprint"]}
    key = {"stage": "sft", "base": base["fingerprint"], "sft_data": file_sha256(args.sft_data),
           "train": params_record(train)}
    arguments = training_arguments(train, checkpoint_dir(args.checkpoint_root, key), tracking)
    trainer = SFTTrainer(model=load_for_fsdp(args.base, train), args=arguments,
                      train_dataset=Dataset.from_list(examples), data_collator=collator(train, tokenizer.pad_token_id))
    train_with_resume(trainer)
    save_final(trainer, tokenizer, args.out, {**key, "base_model": base, "sft_teacher": sft_teacher,
                                              "sft_sampling": meta.get("sampling"),
                                              "chat_template_kwargs": meta.get("chat_template_kwargs", {})})
    print(f"-> {args.out}")
    end_process_group()


if __name__ == "__main__":
    main()
