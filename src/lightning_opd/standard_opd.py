"""The standard (online) OPD baseline: every step the current student samples
responses for a batch of OPD prompts and a live teacher, loaded for the
purpose, scores them; then the same OPD loss and optimiser as Lightning OPD
(they share `OPDTrainer` and `opd_loss`). Teacher consistency is checked the
same way: the live teacher must be the teacher that wrote the student's SFT
data unless the config allows a mismatch.

A step's global batch is ``batch_size`` prompts x ``n`` samples each, i.e.
``batch_size * n`` sequences; ``micro_batch_size`` counts sequences (as in
Lightning OPD, where a sequence is one cached rollout), so one forward pass
holds ``micro_batch_size / n`` prompts' samples.

The student samples with transformers ``generate`` (``--sampler hf``; under
FSDP every decoded token gathers the sharded weights) or with a vLLM engine
colocated in each training process whose weights follow the student after
every optimiser step (``--sampler vllm``, `vllm_sampler`), as the online
systems the paper compares against do."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from datasets import Dataset

from lightning_opd.artifacts import TASK_SCHEMA, read_table
from lightning_opd.hparams import OPDParams, SamplingParams, from_dict, in_prompts, parse_hparams
from lightning_opd.logprobs import response_logprobs
from lightning_opd.modeling import (
    DEFAULT_PROMPT_TEMPLATE,
    add_chat_template_argument,
    check_context,
    load_tokenizer,
    prompt_ids,
    stop_token_ids,
)
from lightning_opd.opd_trainer import OPDTrainer, add_output_arguments, drift_reference, opd_example
from lightning_opd.provenance import (
    check_teacher_consistency,
    describe_model,
    file_sha256,
    sft_teacher_of,
    tokenizer_fingerprint,
)
from lightning_opd.sampling import sample_with
from lightning_opd.training import (
    PadCollator,
    accumulation,
    check_outputs_writable,
    checkpoint_dir,
    collator,
    end_process_group,
    frozen_dtype,
    load_for_fsdp,
    params_record,
    save_final,
    tracking_params,
    train_with_resume,
    training_arguments,
    world_size,
)


class OnlineOPDTrainer(OPDTrainer):
    """Turns a batch of prompts into an OPD batch: the live student samples,
    the live teacher scores, then `OPDTrainer.compute_loss` takes over.

    The student samples once per optimiser step, all the prompts of this
    process's micro-batches together (as TRL's GRPO trainer samples its
    generation batch): the vLLM engine is synced once and asked once, not
    once per micro-batch. The Trainer fetches a step's micro-batches before
    it runs them (`get_batch_samples`); the samples ride in each micro-batch
    to `compute_loss`, which scores and trains on them micro-batch by
    micro-batch."""

    def __init__(self, *args, teacher, sampling: SamplingParams, pad_id: int, stop_ids: set[int],
                 batcher=None, vllm_sampler: dict | None = None, teacher_temperature: float = 1.0, **kwargs):
        """``vllm_sampler``: sample with a colocated vLLM engine, built at the
        first step from these arguments of `ColocatedVLLMSampler` (None: hf).
        ``teacher_temperature``: the teacher scores at it, as the teacher cache does."""
        super().__init__(*args, **kwargs)
        self.teacher = self.frozen(teacher)
        self.teacher_temperature = teacher_temperature
        self.sampling = sampling
        self.batcher = batcher or PadCollator(pad_id)  # padding (or packing) of the sampled sequences
        self.pad_id, self.stop_ids = pad_id, stop_ids
        self.vllm_sampler_args, self.vllm_sampler = vllm_sampler, None
        self.sampling_calls = 0  # this process's, since it started: one per optimiser step

    def sample(self, prompts: list[list[int]]) -> tuple[list, list | None]:
        """The live student's samples of ``prompts`` (all of this process's
        prompts of the current optimiser step) and, from vLLM, its log-prob
        of each sampled token."""
        step = self.state.global_step
        # a fresh seed per optimiser step and process: reproducible and resumable, different every step
        seed = self.sampling.seed * 100_003 + step + 7919 * self.args.process_index
        params = dataclasses.replace(self.sampling, seed=seed)
        self.sampling_calls += 1
        model = self.accelerator.unwrap_model(self.model)
        if self.vllm_sampler_args is not None:
            if self.vllm_sampler is None:
                from lightning_opd.vllm_sampler import ColocatedVLLMSampler

                self.vllm_sampler = ColocatedVLLMSampler(model, self.accelerator, self.processing_class,
                                                         stop_ids=self.stop_ids, **self.vllm_sampler_args)
            self.vllm_sampler.sync(step)
            return self.vllm_sampler.sample(prompts, params)
        was_training = model.training
        model.eval()
        samples = sample_with(model, prompts, params, self.stop_ids, self.pad_id, progress=False,
                              synced=self.is_fsdp_enabled)
        model.train(was_training)
        return samples, None

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The Trainer's micro-batches of one optimiser step, each with the
        live student's samples of its prompts (``samples``, and from vLLM
        ``sampler_logprobs``), all sampled in one call."""
        batches, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        prompts = [p for batch in batches for p in batch["prompt_ids"]]
        if not prompts:
            return batches, num_items_in_batch
        samples, logprobs = self.sample(prompts)
        start = 0
        for batch in batches:
            end = start + len(batch["prompt_ids"])
            batch["samples"] = samples[start:end]
            batch["sampler_logprobs"] = logprobs[start:end] if logprobs is not None else None
            start = end
        return batches, self.response_tokens(samples, device)

    def response_tokens(self, samples, device) -> torch.Tensor | None:
        """The response tokens of the optimiser step, over all processes: the
        count the Trainer makes from the labels of a dataset with responses
        (Lightning OPD's), so that both methods' loss is the token mean of the
        whole step, however it is split into micro-batches. None where the
        Trainer counts none (a model without loss kwargs): it then divides
        each micro-batch's mean by the accumulation steps, for both methods."""
        if not self.model_accepts_loss_kwargs:
            return None
        tokens = torch.tensor(sum(len(s.response_ids) for outs in samples for s in outs), device=device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            tokens = self.accelerator.gather(tokens).sum()
        return tokens.clamp(min=1)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "samples" not in inputs:
            raise ValueError("OnlineOPDTrainer.compute_loss: the micro-batch has no samples; "
                             "they are drawn per optimiser step in get_batch_samples")
        prompts, samples, logprobs = inputs["prompt_ids"], inputs["samples"], inputs["sampler_logprobs"]
        student = self.accelerator.unwrap_model(model)
        # the batcher aligns per-token values with the tokens: the sampler's log-probs ride in teacher_logprobs
        examples = [opd_example(p, s.response_ids, lp if logprobs else [0.0] * len(s.response_ids))
                    for i, (p, outs) in enumerate(zip(prompts, samples))
                    for s, lp in zip(outs, logprobs[i] if logprobs else [None] * len(outs))]
        batch = {k: v.to(student.device) if torch.is_tensor(v) else v for k, v in self.batcher(examples).items()}
        if logprobs:
            batch["sampler_logprobs"] = batch["teacher_logprobs"]
        with torch.no_grad():
            teacher_logprobs, _ = response_logprobs(self.teacher, batch, temperature=self.teacher_temperature)
        batch["teacher_logprobs"] = torch.nn.functional.pad(teacher_logprobs, (1, 0))  # align with token positions
        return super().compute_loss(model, batch, return_outputs, num_items_in_batch)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:  # how often this process sampled, and from vLLM pushed weights, since it started
            logs["sampling_calls"] = self.sampling_calls
            if self.vllm_sampler is not None:
                logs["sampler_weight_syncs"] = self.vllm_sampler.weight_syncs
                logs["sampler_generate_calls"] = self.vllm_sampler.generate_calls
        super().log(logs, *args, **kwargs)


def live_prompts(tokenizer, prompts_path: Path, template: str, chat_template_kwargs: dict) -> list[list[int]]:
    """The OPD prompts as the live student is asked them."""
    table, _ = read_table(prompts_path, TASK_SCHEMA)
    return [prompt_ids(tokenizer, p, template, chat_template_kwargs) for p in table.column("problem").to_pylist()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init", required=True, help="pi_ref: the SFT model to start from")
    parser.add_argument("--teacher", required=True, help="hub id or local directory of the live teacher")
    parser.add_argument("--teacher-label", default="")
    parser.add_argument("--teacher-temperature", type=float, default=1.0,
                        help="the live teacher scores at it (teacher_cache.temperature, as the cache)")
    parser.add_argument("--prompts", type=Path, required=True, help="OPD prompts (task parquet)")
    parser.add_argument("--opd", default="{}", help="JSON of OPDParams fields (as Lightning OPD)")
    parser.add_argument("--sampling", default="{}", help="JSON of SamplingParams for the live rollouts")
    parser.add_argument("--sampler", choices=["hf", "vllm"], default="hf",
                        help="who samples the live student: transformers generate, or a colocated vLLM engine")
    parser.add_argument("--sampler-options", type=json.loads, default={},
                        help="JSON of the vLLM engine's options (gpu_memory_utilization, enable_sleep_mode, ...)")
    parser.add_argument("--prompt-template", default=DEFAULT_PROMPT_TEMPLATE)
    add_chat_template_argument(parser)
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    params = parse_hparams(OPDParams, args.opd, "--opd")
    if params.loss != "sampled":  # a top-k loss reads the teacher's top k from a cache (Lightning OPD)
        raise ValueError(f"--opd loss {params.loss!r}: standard OPD trains with the sampled loss; use loss: sampled")
    sampling = from_dict(SamplingParams, json.loads(args.sampling), "--sampling")
    train_params = in_prompts(params, sampling.n)
    tracking = tracking_params(args.tracking)
    check_outputs_writable(args.out, args.checkpoint_root)

    init = describe_model(args.init)
    teacher = {**describe_model(args.teacher), "label": args.teacher_label}
    tokenizer = load_tokenizer(args.init)
    if tokenizer_fingerprint(load_tokenizer(args.teacher)) != tokenizer_fingerprint(tokenizer):
        raise ValueError(f"{args.teacher}: the teacher's tokenizer differs from the student's ({args.init}); "
                         "OPD scores the student's token ids with the teacher")
    consistent = check_teacher_consistency(sft_teacher_of(init), teacher, params.allow_teacher_mismatch, args.teacher)
    prompts = [{"prompt_ids": ids}
               for ids in live_prompts(tokenizer, args.prompts, args.prompt_template, args.chat_template_kwargs)]
    lengths = {i: len(p["prompt_ids"]) + sampling.max_new_tokens for i, p in enumerate(prompts)}
    for model in (args.init, args.teacher):
        check_context(model, lengths, args.prompts,
                      "prompt + max_new_tokens must fit: lower standard_opd.sampling.max_new_tokens")
    print(
        f"standard OPD on {len(prompts)} prompts x {sampling.n} live samples, teacher {args.teacher_label} "
        f"({'consistent' if consistent else 'INCONSISTENT'} with the SFT teacher)"
    )

    key = {
        "stage": "standard_opd",
        "init": init["fingerprint"],
        "teacher": teacher["fingerprint"],
        "prompts": file_sha256(args.prompts),
        "opd": params_record(params),
        "sampling": params_record(sampling),
        "teacher_temperature": args.teacher_temperature,
        "sampler": args.sampler,
        "sampler_options": args.sampler_options,
        "prompt_template": args.prompt_template,
        "chat_template_kwargs": args.chat_template_kwargs,
    }
    model = load_for_fsdp(args.init, params)
    reference, drift_batches = drift_reference(
        args.init,
        tokenizer,
        args.drift_prompts,
        args.drift_n,
        args.prompt_template,
        args.drift_max_new_tokens,
        accumulation(train_params, world_size())[0] * sampling.n,
        frozen_dtype(params),
        args.chat_template_kwargs,
    )
    trainer = OnlineOPDTrainer(
        model=model,
        tau=params.tau,
        reference=reference,
        drift_batches=drift_batches,
        drift_every=args.drift_every,
        teacher=load_for_fsdp(args.teacher, params, dtype=frozen_dtype(params)),
        teacher_temperature=args.teacher_temperature,
        sampling=sampling,
        pad_id=tokenizer.pad_token_id,
        stop_ids=stop_token_ids(model, tokenizer),
        batcher=collator(params, tokenizer.pad_token_id),
        vllm_sampler=None if args.sampler == "hf" else {
            "model_path": args.init, "dtype": frozen_dtype(params), **args.sampler_options},
        processing_class=tokenizer,
        args=training_arguments(train_params, checkpoint_dir(args.checkpoint_root, key), tracking),
        train_dataset=Dataset.from_list(prompts),
        data_collator=lambda rows: {"prompt_ids": [r["prompt_ids"] for r in rows]},
    )
    train_with_resume(trainer)
    save_final(
        trainer,
        tokenizer,
        args.out,
        {
            **key,
            "method": "standard_opd",
            "init_model": init,
            "teacher": teacher,
            "sft_teacher": sft_teacher_of(init),
            "teacher_consistent": consistent,
        },
    )
    print(f"-> {args.out}")
    end_process_group()


if __name__ == "__main__":
    main()
