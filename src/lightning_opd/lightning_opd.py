"""Stage 7: Lightning OPD. The student starts from pi_ref and trains on the
fixed rollouts with the teacher's cached log-probs; no teacher is loaded.

Before training it checks the cache: one log-prob per token, the student's
tokenizer, rollouts sampled by the init model, and a cache teacher equal to
the teacher that wrote the init model's SFT data (unless the config allows a
mismatch on purpose, which the output then records)."""
from __future__ import annotations

import argparse
from pathlib import Path

from datasets import Dataset

from lightning_opd.artifacts import ArtifactError, read_cache
from lightning_opd.hparams import OPDParams, parse_hparams
from lightning_opd.modeling import DEFAULT_PROMPT_TEMPLATE, check_context, load_tokenizer
from lightning_opd.opd_trainer import OPDTrainer, add_output_arguments, drift_reference, opd_example
from lightning_opd.provenance import (
    check_same_tokenizer,
    check_teacher_consistency,
    describe_model,
    file_sha256,
    sft_teacher_of,
)
from lightning_opd.training import (
    accumulation,
    checkpoint_dir,
    collator,
    frozen_dtype,
    load_for_fsdp,
    params_record,
    save_final,
    tracking_params,
    train_with_resume,
    training_arguments,
    world_size,
)


def load_checked_cache(cache_path: Path, init: dict, tokenizer, allow_mismatch: bool) -> tuple[list[dict], dict]:
    table, meta = read_cache(cache_path)
    check_same_tokenizer(cache_path, meta, tokenizer, f"the student {init['path']}")
    if meta["rollout_policy"]["fingerprint"] != init["fingerprint"]:
        raise ArtifactError(f"{cache_path}: the rollouts were sampled by {meta['rollout_policy']['path']} "
                            f"({meta['rollout_policy']['fingerprint']}), not by the OPD init model "
                            f"{init['path']} ({init['fingerprint']})")
    consistent = check_teacher_consistency(sft_teacher_of(init), meta["teacher"], allow_mismatch, str(cache_path))
    rows = table.to_pylist()
    check_context(init["path"], {r["id"]: len(r["prompt_ids"]) + len(r["response_ids"]) for r in rows}, cache_path,
                  "lower teacher_cache.max_response_tokens or rollouts.sampling.max_new_tokens")
    return [opd_example(r["prompt_ids"], r["response_ids"], r["teacher_logprobs"]) for r in rows], \
        {**meta, "teacher_consistent": consistent}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init", required=True, help="pi_ref: the SFT model that sampled the rollouts")
    parser.add_argument("--cache", type=Path, required=True, help="teacher cache parquet")
    parser.add_argument("--opd", default="{}", help="JSON of OPDParams fields")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    params = parse_hparams(OPDParams, args.opd, "--opd")
    tracking = tracking_params(args.tracking)

    init = describe_model(args.init)
    tokenizer = load_tokenizer(args.init)
    examples, meta = load_checked_cache(args.cache, init, tokenizer, params.allow_teacher_mismatch)
    print(f"Lightning OPD on {len(examples)} cached rollouts, teacher {meta['teacher'].get('label')} "
          f"({'consistent' if meta['teacher_consistent'] else 'INCONSISTENT'} with the SFT teacher)")
    key = {"stage": "lightning_opd", "init": init["fingerprint"], "cache": file_sha256(args.cache),
           "opd": params_record(params)}
    model = load_for_fsdp(args.init, params)
    reference, drift_batches = drift_reference(
        args.init, tokenizer, args.drift_prompts, args.drift_n,
        meta["rollouts"].get("prompt_template") or DEFAULT_PROMPT_TEMPLATE, args.drift_max_new_tokens,
        accumulation(params, world_size())[0], frozen_dtype(params), meta["rollouts"].get("chat_template_kwargs"))
    trainer = OPDTrainer(model=model, tau=params.tau, reference=reference, drift_batches=drift_batches,
                         drift_every=args.drift_every,
                         args=training_arguments(params, checkpoint_dir(args.checkpoint_root, key), tracking),
                         train_dataset=Dataset.from_list(examples),
                         data_collator=collator(params, tokenizer.pad_token_id))
    train_with_resume(trainer)
    save_final(trainer, tokenizer, args.out, {
        **key, "method": "lightning_opd", "init_model": init, "teacher": meta["teacher"],
        "sft_teacher": sft_teacher_of(init), "teacher_consistent": meta["teacher_consistent"],
        "chat_template_kwargs": meta["rollouts"].get("chat_template_kwargs", {}),
    })
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
