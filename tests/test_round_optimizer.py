"""A training that continues an earlier one (a round of multi-round Lightning
OPD) goes on with the earlier one's optimiser state: one step, saved with its
state, then one more step from it gives the weights of two steps in one run."""
from __future__ import annotations

from transformers import AutoModelForCausalLM

from lightning_opd.hparams import OPDParams
from lightning_opd.lightning_opd import load_checked_cache
from lightning_opd.modeling import load_tokenizer
from lightning_opd.opd_trainer import OPDTrainer
from lightning_opd.provenance import describe_model
from lightning_opd.training import (
    OPTIMIZER_STATE_DIR,
    collator,
    save_final,
    train_with_resume,
    training_arguments,
)

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
