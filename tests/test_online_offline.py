"""Standard (online) and Lightning (offline) OPD share the loss: when the
policy is the rollout policy, both give the same gradient on the same batch."""
import torch
from transformers import TrainingArguments

from lightning_opd import generate, teacher_cache
from lightning_opd.artifacts import TASK_SCHEMA, read_cache, read_table, write_table
from lightning_opd.hparams import SamplingParams
from lightning_opd.modeling import load_model, load_tokenizer, prompt_ids, stop_token_ids
from lightning_opd.opd_trainer import OPDTrainer, opd_example
from lightning_opd.standard_opd import OnlineOPDTrainer
from lightning_opd.training import PadCollator


def gradient(trainer, model, inputs):
    model.zero_grad()
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_same_gradient_when_policy_equals_rollout_policy(world, tmp_path):
    table, meta = read_table(world["data"] / "opd.parquet", TASK_SCHEMA)
    prompts_file = tmp_path / "prompts.parquet"
    write_table(prompts_file, table.slice(0, 8), TASK_SCHEMA, meta)
    sampling = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=10, n=1, seed=0, batch_size=8)
    tau = 2.0

    # offline: rollouts of pi_ref, scored once by the teacher into a cache
    generate.sample(str(world["sft_A"]), prompts_file, tmp_path / "rollouts.parquet", sampling)
    teacher_cache.build_cache(str(world["teacher_A"]), tmp_path / "rollouts.parquet", tmp_path / "cache.parquet")
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
                              stop_ids=stop_token_ids(online_model, tokenizer))
    prompts = [prompt_ids(tokenizer, p) for p in table.slice(0, 8).column("problem").to_pylist()]
    assert prompts == [r["prompt_ids"] for r in rows]
    online_loss, online_grad = gradient(online, online_model, {"prompt_ids": prompts})

    assert abs(online_loss - offline_loss) < 1e-6
    assert offline_grad.abs().sum() > 0
    torch.testing.assert_close(online_grad, offline_grad, rtol=1e-5, atol=1e-6)
