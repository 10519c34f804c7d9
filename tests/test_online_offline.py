"""Standard (online) and Lightning (offline) OPD share the loss: when the
policy is the rollout policy, both give the same gradient on the same batch.
Standard OPD samples once per optimiser step, for all its micro-batches."""
import dataclasses

import pytest
import torch
from datasets import Dataset
from transformers import TrainingArguments

from lightning_opd import generate, teacher_cache
from lightning_opd.artifacts import TASK_SCHEMA, read_cache, read_table, write_table
from lightning_opd.hparams import OPDParams, SamplingParams
from lightning_opd.modeling import load_model, load_tokenizer, prompt_ids, stop_token_ids
from lightning_opd.opd_trainer import OPDTrainer, opd_example
from lightning_opd.sampling import sample_with
from lightning_opd.standard_opd import OnlineOPDTrainer
from lightning_opd.training import PadCollator, training_arguments


def gradient(trainer, model, inputs):
    model.zero_grad()
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("teacher_temperature", [1.0, 0.5])
def test_same_gradient_when_policy_equals_rollout_policy(world, tmp_path, teacher_temperature):
    """Both teachers score at teacher_cache.temperature: the cache's and the live one."""
    table, meta = read_table(world["data"] / "opd.parquet", TASK_SCHEMA)
    prompts_file = tmp_path / "prompts.parquet"
    write_table(prompts_file, table.slice(0, 8), TASK_SCHEMA, meta)
    sampling = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=10, n=1, seed=0, batch_size=8)
    tau = 2.0

    # offline: rollouts of pi_ref, scored once by the teacher into a cache
    generate.sample(str(world["sft_A"]), prompts_file, tmp_path / "rollouts.parquet", sampling)
    teacher_cache.build_cache(str(world["teacher_A"]), tmp_path / "rollouts.parquet", tmp_path / "cache.parquet",
                              temperature=teacher_temperature)
    rows = read_cache(tmp_path / "cache.parquet")[0].to_pylist()
    tokenizer = load_tokenizer(world["sft_A"])
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True)
    offline_model = load_model(world["sft_A"])
    offline = OPDTrainer(model=offline_model, args=args, tau=tau)
    batch = PadCollator(tokenizer.pad_token_id)(
        [opd_example(r["prompt_ids"], r["response_ids"], r["teacher_logprobs"]) for r in rows])
    offline_loss, offline_grad = gradient(offline, offline_model, batch)

    # online: the same policy samples live with the same seed, a live teacher scores
    online_model = load_model(world["sft_A"])
    online = OnlineOPDTrainer(model=online_model, args=args, tau=tau, teacher=load_model(world["teacher_A"]),
                              sampling=sampling, pad_id=tokenizer.pad_token_id,
                              stop_ids=stop_token_ids(online_model, tokenizer), teacher_temperature=teacher_temperature)
    prompts = [prompt_ids(tokenizer, p) for p in table.slice(0, 8).column("problem").to_pylist()]
    assert prompts == [r["prompt_ids"] for r in rows]
    # one micro-batch makes the step: its samples are those of one call over its prompts, as before
    [inputs], _ = online.get_batch_samples(iter([{"prompt_ids": prompts}]), 1, online.args.device)
    online_loss, online_grad = gradient(online, online_model, inputs)

    assert abs(online_loss - offline_loss) < 1e-6
    assert offline_grad.abs().sum() > 0
    torch.testing.assert_close(online_grad, offline_grad, rtol=1e-5, atol=1e-6)

    # the same step in two micro-batches: the step's response tokens are counted once sampled (the Trainer
    # counts them from the labels of Lightning OPD's cached batches), and the two losses over that count
    # add up to the gradient of the whole step's token mean, however the responses' lengths fall
    halves, tokens = online.get_batch_samples(iter([{"prompt_ids": prompts[:3]}, {"prompt_ids": prompts[3:]}]), 2,
                                              online.args.device)
    assert int(tokens) == sum(len(r["response_ids"]) for r in rows)
    online_model.zero_grad()
    online.current_gradient_accumulation_steps = 2  # what the Trainer's loop sets: 2 micro-batches a step
    for inputs in halves:  # the Trainer's own step: it divides by the accumulation steps unless given a count
        online.training_step(online_model, inputs, num_items_in_batch=tokens)
    split_grad = torch.cat([p.grad.flatten() for p in online_model.parameters() if p.grad is not None])
    torch.testing.assert_close(split_grad, offline_grad, rtol=1e-5, atol=1e-6)


class RecordingTrainer(OnlineOPDTrainer):
    """Notes what each micro-batch trains on."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        self.seen.append((self.state.global_step, inputs["prompt_ids"], inputs["samples"]))
        return super().compute_loss(model, inputs, *args, **kwargs)


def test_hf_sampler_samples_a_whole_step_in_one_call(world, tmp_path):
    """Four micro-batches per optimiser step (one prompt x n = 2 samples each): the student
    samples once per step, and the micro-batches train on that one call's samples."""
    tokenizer = load_tokenizer(world["sft_A"])
    problems = read_table(world["data"] / "opd.parquet", TASK_SCHEMA)[0].column("problem").to_pylist()[:8]
    prompts = [prompt_ids(tokenizer, p) for p in problems]
    sampling = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=8, n=2, seed=5, batch_size=8)
    params = OPDParams(batch_size=4, micro_batch_size=1, max_steps=2, learning_rate=0.05, logging_steps=1,
                       save_steps=100)  # in prompts (standard_opd.in_prompts): 4 micro-batches per step
    model = load_model(world["sft_A"])
    trainer = RecordingTrainer(model=model, args=training_arguments(params, tmp_path / "out"), tau=1.0,
                               teacher=load_model(world["teacher_A"]), sampling=sampling,
                               pad_id=tokenizer.pad_token_id, stop_ids=stop_token_ids(model, tokenizer),
                               train_dataset=Dataset.from_list([{"prompt_ids": p} for p in prompts]),
                               data_collator=lambda rows: {"prompt_ids": [r["prompt_ids"] for r in rows]})
    trainer.seen = []
    trainer.train()

    assert [step for step, _, _ in trainer.seen] == [0] * 4 + [1] * 4  # the loss still runs per micro-batch
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["sampling_calls"] for entry in logs] == [1, 2]
    # step 0 trained on what pi_ref samples for the step's four prompts in one call, with the step's seed
    step_prompts = [p for step, batch, _ in trainer.seen if step == 0 for p in batch]
    trained = [s.response_ids for step, _, samples in trainer.seen if step == 0 for outs in samples for s in outs]
    one_call = sample_with(load_model(world["sft_A"]).eval(), step_prompts,
                           dataclasses.replace(sampling, seed=sampling.seed * 100_003), trainer.stop_ids,
                           tokenizer.pad_token_id, progress=False)
    assert trained == [s.response_ids for outs in one_call for s in outs]
    assert len(trained) == 8 and len({tuple(t) for t in trained}) > 4
