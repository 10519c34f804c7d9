"""A training that continues an earlier one (a round of multi-round Lightning
OPD) goes on with the earlier one's optimiser state: one step, saved with its
state, then one more step from it gives the weights of two steps in one run;
its lr schedule starts anew. A run resumed from its own checkpoint logs its
tokens per step over the steps since the checkpoint. Every run logs its last step."""
from __future__ import annotations

import json
import shutil

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, TrainerCallback

from lightning_opd.hparams import OPDParams
from lightning_opd.lightning_opd import load_checked_cache
from lightning_opd.modeling import load_tokenizer
from lightning_opd.opd_trainer import OPDTrainer, opd_example
from lightning_opd.provenance import describe_model
from lightning_opd.training import (
    CHECKPOINT_COMPLETE,
    OPTIMIZER_STATE_DIR,
    PadCollator,
    collator,
    save_final,
    train_with_resume,
    training_arguments,
)
from test_logprobs import tiny_qwen3

# every step sees all 12 cached rollouts (one batch), so any split into runs sees the same data;
# a large lr makes a fresh Adam's sign-sized first step far from a continued one
PARAMS = OPDParams(batch_size=12, learning_rate=1e-2, save_steps=100, logging_steps=1, seed=0)


def train(world, init, steps: int, out, optimizer_state=None, save_state=False):
    params = OPDParams(**{**PARAMS.__dict__, "max_steps": steps})
    tokenizer = load_tokenizer(world["sft_A"])
    dataset, _ = load_checked_cache(world["cache_A"], describe_model(world["sft_A"]), tokenizer, False, params)
    trainer = OPDTrainer(model=AutoModelForCausalLM.from_pretrained(init), tau=params.tau,
                         optimizer_state=optimizer_state,
                         args=training_arguments(params, out.with_name(out.name + "-ckpt")),
                         train_dataset=dataset, data_collator=collator(params, tokenizer.pad_token_id))
    train_with_resume(trainer)
    save_final(trainer, tokenizer, out, {}, optimizer_state=save_state)
    return AutoModelForCausalLM.from_pretrained(out).state_dict()


def max_difference(a, b) -> float:
    return max((a[name] - b[name]).abs().max().item() for name in a)


def test_a_continued_training_goes_on_with_the_optimiser_state(world, tmp_path):
    whole = train(world, world["sft_A"], 2, tmp_path / "whole")
    train(world, world["sft_A"], 1, tmp_path / "first", save_state=True)
    assert (tmp_path / "first" / OPTIMIZER_STATE_DIR / "optimizer.pt").is_file()
    continued = train(world, tmp_path / "first", 1, tmp_path / "continued",
                      optimizer_state=tmp_path / "first" / OPTIMIZER_STATE_DIR)
    restarted = train(world, tmp_path / "first", 1, tmp_path / "restarted")
    assert not (tmp_path / "continued" / OPTIMIZER_STATE_DIR).exists()
    assert max_difference(continued, whole) < 1e-6
    assert max_difference(restarted, whole) > 1e-3  # a fresh Adam takes another second step


def test_a_missing_optimiser_state_is_refused_with_what_to_do(world, tmp_path):
    missing = tmp_path / "nowhere" / OPTIMIZER_STATE_DIR
    missing.mkdir(parents=True)
    try:
        train(world, world["sft_A"], 1, tmp_path / "out", optimizer_state=missing)
    except FileNotFoundError as error:
        assert str(missing) in str(error) and "rerun" in str(error)
    else:
        raise AssertionError("a missing optimiser state was not refused")
    assert not (tmp_path / "out").exists()


class StepLRs(TrainerCallback):
    """The lr each optimiser step takes."""

    def __init__(self):
        self.lrs = []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.lrs.append(optimizer.param_groups[0]["lr"])


def tiny_run(out, optimizer_state=None, resume=None, logging_steps=2) -> tuple[OPDTrainer, StepLRs]:
    """8 random OPD rows on a tiny Qwen3, batch 4, 4 steps of a linear schedule, a checkpoint every 2
    steps and a log every ``logging_steps``."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for i in range(8):
        ids = torch.randint(2, 97, (4 + i % 3,), generator=generator).tolist()
        rows.append(opd_example(ids[:2], ids[2:], (-3 * torch.rand(len(ids) - 2, generator=generator)).tolist()))
    params = OPDParams(batch_size=4, max_steps=4, lr_scheduler_type="linear", learning_rate=1e-3, save_steps=2,
                       logging_steps=logging_steps)
    lrs = StepLRs()
    trainer = OPDTrainer(model=tiny_qwen3(0), args=training_arguments(params, out), optimizer_state=optimizer_state,
                         train_dataset=Dataset.from_list(rows), data_collator=PadCollator(0), callbacks=[lrs])
    trainer.args.save_total_limit = None
    trainer.train(resume_from_checkpoint=resume)
    return trainer, lrs


def test_a_continued_training_starts_its_lr_schedule_anew(tmp_path):
    """The optimiser state carries the lr where the earlier run's schedule ended (0 for a linear decay):
    the continuing run's first step still takes its own lr(0)."""
    first, first_lrs = tiny_run(tmp_path / "first")
    state = tmp_path / "state"
    state.mkdir()
    first._save_optimizer_and_scheduler(str(state))  # what save_final keeps for the next round
    _, continued_lrs = tiny_run(tmp_path / "continued", optimizer_state=state)
    assert first_lrs.lrs == continued_lrs.lrs == [1e-3, 7.5e-4, 5e-4, 2.5e-4]


def test_a_resumed_run_counts_its_tokens_per_step_from_its_checkpoint(tmp_path):
    straight, _ = tiny_run(tmp_path / "straight")
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    resumed, _ = tiny_run(tmp_path / "resumed", resume=str(tmp_path / "resumed" / "checkpoint-2"))

    def per_step(trainer):
        return {e["step"]: e["tokens_per_step"] for e in trainer.state.log_history if "tokens_per_step" in e}

    assert per_step(resumed)[4] == per_step(straight)[4] > 0


def test_a_run_logs_its_last_step_and_the_steps_each_log_covers(tmp_path):
    """At logging_steps 3 of 4 steps the Trainer alone would log step 3 only: the last step's drift and
    tokens would be lost (a multi-round run's rounds of 30 steps at logging_steps 8). A run resumed from
    its checkpoint at step 2 logs step 3 as covering 1 step, the steps it ran."""
    straight, _ = tiny_run(tmp_path / "straight", logging_steps=3)

    def covered(trainer):
        return [(e["step"], e["logged_steps"]) for e in trainer.state.log_history if "tokens_per_step" in e]

    assert covered(straight) == [(3, 3), (4, 1)]
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    resumed, _ = tiny_run(tmp_path / "resumed", resume=str(tmp_path / "resumed" / "checkpoint-2"), logging_steps=3)
    assert covered(resumed) == [(3, 1), (4, 1)]


def fractional_epochs_run(out) -> OPDTrainer:
    """8 random OPD rows, batch 4 (2 steps an epoch), 1.5 epochs: 3 steps, a checkpoint at every step;
    resumed from the newest checkpoint in ``out`` if there is one; no final save."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for i in range(8):
        ids = torch.randint(2, 97, (4 + i % 3,), generator=generator).tolist()
        rows.append(opd_example(ids[:2], ids[2:], (-3 * torch.rand(len(ids) - 2, generator=generator)).tolist()))
    params = OPDParams(batch_size=4, epochs=1.5, learning_rate=1e-2, save_steps=1, logging_steps=1)
    trainer = OPDTrainer(model=tiny_qwen3(0), args=training_arguments(params, out),
                         train_dataset=Dataset.from_list(rows), data_collator=PadCollator(0))
    train_with_resume(trainer)
    return trainer


def test_a_run_resumed_from_its_last_checkpoint_takes_no_more_steps(tmp_path, capsys):
    """A kill after the last checkpoint but before the final save (a full disk, a time limit during an FSDP
    gather): the rerun resumes from the checkpoint of the last step. Ending inside an epoch (1.5 epochs), the
    Trainer alone would train one more step there; the rerun ends with the first run's weights and steps."""
    first = fractional_epochs_run(tmp_path / "ckpt")
    assert first.state.global_step == 3 and (tmp_path / "ckpt" / "checkpoint-3").is_dir()
    record = json.loads((tmp_path / "ckpt" / "checkpoint-3" / CHECKPOINT_COMPLETE).read_text())
    assert record == {"processes": 1, "fsdp": False}
    rerun = fractional_epochs_run(tmp_path / "ckpt")
    assert "checkpoint-3 holds the run's last step: nothing left to train" in capsys.readouterr().out
    assert rerun.state.global_step == 3
    assert max(e["step"] for e in rerun.state.log_history) == 3
    assert "train_loss" in first.state.log_history[-1] and "train_loss" not in rerun.state.log_history[-1]
    assert max_difference(rerun.model.state_dict(), first.model.state_dict()) == 0
    assert not (tmp_path / "ckpt" / "checkpoint-4").exists()


def uneven_opd_run(out, micro_batch_size: int, model_takes_loss_kwargs: bool) -> dict:
    """One SGD step on 4 OPD rows of 3 to 9 response tokens, in micro-batches of ``micro_batch_size``."""
    generator = torch.Generator().manual_seed(1)
    rows = []
    for i in range(4):
        ids = torch.randint(2, 97, (2 + 3 + 2 * i,), generator=generator).tolist()
        rows.append(opd_example(ids[:2], ids[2:], (-3 * torch.rand(len(ids) - 2, generator=generator)).tolist()))
    params = OPDParams(batch_size=4, micro_batch_size=micro_batch_size, max_steps=1, optim="sgd",
                       learning_rate=0.5, save_steps=100, logging_steps=1)
    model = tiny_qwen3(0)
    model.accepts_loss_kwargs = model_takes_loss_kwargs  # what the Trainer reads of the model's forward
    trainer = OPDTrainer(model=model, args=training_arguments(params, out), train_dataset=Dataset.from_list(rows),
                         data_collator=PadCollator(0))
    trainer.train()
    return trainer.model.state_dict()


def test_the_loss_is_the_token_mean_of_the_step_whatever_the_models_forward_takes(tmp_path):
    """With a model whose forward takes no loss kwargs, the Trainer alone would count no tokens and average
    the micro-batches' means: with responses of uneven length the step's gradient would depend on the split."""
    whole = uneven_opd_run(tmp_path / "whole", 4, True)
    for takes in (True, False):
        split = uneven_opd_run(tmp_path / f"split-{takes}", 1, takes)
        assert max_difference(split, whole) < 1e-6
    assert max_difference(whole, tiny_qwen3(0).state_dict()) > 1e-3
