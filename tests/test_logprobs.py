"""Chunked log-probs (`lightning_opd.logprobs`) against the full-logits
computation they replace: the same values, loss and gradients (every
parameter, tied output layer included), padded and packed, whatever the chunk."""
import copy

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from lightning_opd.backends.hf import HFBackend
from lightning_opd.hparams import OPDParams
from lightning_opd.logprobs import (
    drift_kl_sum,
    next_token_logprobs,
    next_token_top_k,
    response_logprobs,
    response_support_logprobs,
)
from lightning_opd.opd_loss import opd_loss
from lightning_opd.standard_opd import in_prompts
from lightning_opd.training import IGNORE_INDEX, PackCollator, PadCollator, supervised_example

VOCAB = 97


def tiny_qwen3(seed: int):
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True,
                         pad_token_id=0, bos_token_id=None, eos_token_id=1)
    model = AutoModelForCausalLM.from_config(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def full_logits(model, batch, temperature=1.0):
    """What the project computed before: the whole (batch, tokens, vocab) logits at once."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    return model(**inputs, use_cache=False).logits[:, :-1].float() / temperature


def full_logprobs(model, batch, temperature=1.0):
    logits = full_logits(model, batch, temperature)
    return torch.log_softmax(logits, -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)


def examples(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for prompt_len, response_len in [(3, 9), (5, 2), (2, 13)]:  # 24 response tokens
        ids = torch.randint(2, VOCAB, (prompt_len + response_len,), generator=generator).tolist()
        rows.append(supervised_example(ids[:prompt_len], ids[prompt_len:]))
    return rows


def collate(packed: bool):
    rows = examples()
    batch = PackCollator()(rows) if packed else PadCollator(0)(rows)
    batch.pop("use_cache", None)
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    batch["teacher_logprobs"] = torch.nn.functional.pad(-torch.rand(mask.shape, generator=torch.Generator()
                                                                    .manual_seed(1)) * 4, (1, 0))
    return batch


def loss_and_gradients(model, logprobs, mask, batch):
    model.zero_grad()
    loss, _ = opd_loss(logprobs, batch["teacher_logprobs"][:, 1:], mask, tau=1.0)
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("chunk", [1, 5, 8, 24, 1000])  # 24 response tokens: 5 leaves a remainder, 8 divides
def test_chunked_loss_and_gradients_equal_full_logits(packed, chunk):
    model = tiny_qwen3(0)
    batch = collate(packed)
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    assert int(mask.sum()) == 24
    expected_loss, expected = loss_and_gradients(model, full_logprobs(model, batch), mask, batch)
    logprobs, got_mask = response_logprobs(model, batch, chunk_tokens=chunk)
    assert torch.equal(got_mask, mask)
    assert torch.all(logprobs[~mask] == 0)
    loss, got = loss_and_gradients(model, logprobs, mask, batch)
    assert loss == pytest.approx(expected_loss, abs=1e-6)
    assert expected.keys() == got.keys() and len(got) > 10
    assert max(g.abs().max().item() for g in expected.values()) > 1e-3  # gradients well above the tolerance
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-5, msg=name)


def test_chunked_gradients_under_gradient_checkpointing():
    model = tiny_qwen3(0)
    batch = collate(packed=True)
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    _, expected = loss_and_gradients(model, full_logprobs(model, batch), mask, batch)
    # transformers 5.2x renamed it
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model.train()
    _, got = loss_and_gradients(model, response_logprobs(model, batch, chunk_tokens=7)[0], mask, batch)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_scoring_with_temperature_equals_full_logits(temperature):
    model = tiny_qwen3(0)
    batch = collate(packed=False)
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    with torch.no_grad():
        expected = full_logprobs(model, batch, temperature)
        got = next_token_logprobs(model, batch, mask, temperature, chunk_tokens=5)
    torch.testing.assert_close(got[mask], expected[mask], rtol=0, atol=1e-5)
    assert not got.requires_grad


@pytest.mark.parametrize("packed", [False, True])
def test_chunked_top_k_equals_full_logits(packed):
    """The teacher's top k per chunk of tokens (scoring) and the student's log-probs at given ids plus the
    rest of the vocabulary (a top-k loss), padded and packed, equal those of the whole logits."""
    model = tiny_qwen3(0)
    batch = collate(packed)
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    with torch.no_grad():
        logprobs = torch.log_softmax(full_logits(model, batch, 0.8), -1)
        target, ids, top = next_token_top_k(model, batch, mask, 6, temperature=0.8, chunk_tokens=5)
    best, best_ids = logprobs.topk(6, dim=-1)
    torch.testing.assert_close(top[mask], best[mask], rtol=0, atol=1e-5)
    assert torch.equal(ids[mask], best_ids[mask])
    torch.testing.assert_close(target[mask], logprobs.gather(-1, batch["input_ids"][:, 1:, None])[..., 0][mask],
                               rtol=0, atol=1e-5)
    assert (top[~mask] == 0).all() and (ids[~mask] == 0).all()

    student = torch.log_softmax(full_logits(model, batch), -1)
    _, rest, support, _ = response_support_logprobs(model, batch, ids, chunk_tokens=5)
    torch.testing.assert_close(support[mask], student.gather(-1, ids)[mask], rtol=0, atol=1e-5)
    outside = student.masked_fill(torch.zeros_like(student, dtype=torch.bool).scatter(-1, ids, True), float("-inf"))
    torch.testing.assert_close(rest[mask], outside.logsumexp(-1)[mask], rtol=0, atol=1e-5)


def test_drift_kl_equals_full_vocabulary_kl():
    model, reference = tiny_qwen3(0), tiny_qwen3(1)
    batch = collate(packed=False)
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    with torch.no_grad():
        current = torch.log_softmax(full_logits(model, batch), -1)
        ref = torch.log_softmax(full_logits(reference, batch), -1)
        expected = (current.exp() * (current - ref)).sum(-1)[mask].sum().item()
    for chunk in (3, 1000):
        kl, count = drift_kl_sum(model, reference, batch, chunk_tokens=chunk)
        assert count == 24
        assert kl == pytest.approx(expected, rel=1e-5) and kl > 0.1
    assert drift_kl_sum(model, copy.deepcopy(model), batch)[0] == pytest.approx(0.0, abs=1e-5)


def test_hf_backend_score_equals_full_logits(world):
    backend = HFBackend(str(world["teacher_A"]))
    rows = pq.read_table(world["rollouts"]).to_pylist()
    prompts, responses = [r["prompt_ids"] for r in rows], [r["response_ids"] for r in rows]
    scores = backend.score(prompts, responses, temperature=0.7)
    for prompt, response, score in zip(prompts, responses, scores):
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logprobs = torch.log_softmax(backend.model(ids).logits[0].double() / 0.7, -1)
        expected = [logprobs[len(prompt) - 1 + t, token].item() for t, token in enumerate(response)]
        np.testing.assert_allclose(score, expected, atol=1e-5)


def test_standard_opd_micro_batch_counts_sequences():
    assert in_prompts(OPDParams(batch_size=256, micro_batch_size=8), 4).micro_batch_size == 2
    assert in_prompts(OPDParams(batch_size=256), 4).micro_batch_size == 8  # the default 32 sequences
    assert in_prompts(OPDParams(batch_size=256, micro_batch_size=None), 4).micro_batch_size is None
    with pytest.raises(ValueError, match=r"micro_batch_size\) 6: .* n = 4 .*standard_opd.sampling.n"):
        in_prompts(OPDParams(batch_size=256, micro_batch_size=6), 4)


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_sft_loss_through_chunks_trains_as_the_models_own_loss(tmp_path, packing):
    """SFT's chunked loss takes the optimiser step that transformers' Trainer takes with the model's
    own (full-logits) loss: same weights after two steps with gradient accumulation."""
    from datasets import Dataset
    from transformers import Trainer

    from lightning_opd.hparams import TrainParams
    from lightning_opd.sft import SFTTrainer
    from lightning_opd.training import collator, training_arguments

    torch.manual_seed(0)
    rows = [supervised_example(torch.randint(2, VOCAB, (3 + i,)).tolist(),
                               torch.randint(2, VOCAB, (9 - 2 * i,)).tolist()) for i in range(4)]
    params = TrainParams(max_steps=2, batch_size=2, micro_batch_size=1, packing=packing, optim="sgd",
                         learning_rate=0.5, warmup_ratio=0.0, save_steps=100, logging_steps=1)
    trained = []
    for trainer_class in (Trainer, SFTTrainer):
        model = tiny_qwen3(0)
        trainer_class(model=model, args=training_arguments(params, tmp_path / trainer_class.__name__),
                      train_dataset=Dataset.from_list(rows), data_collator=collator(params, 0)).train()
        trained.append(model)
    moved = max((p - q).abs().max().item() for p, q in zip(trained[0].parameters(), tiny_qwen3(0).parameters()))
    assert moved > 1e-3
    for p, q in zip(*(m.parameters() for m in trained)):
        assert torch.allclose(p, q, atol=1e-6)


def test_packing_prompt_less_examples_trains_no_token_across_sequences(tmp_path):
    """Pretraining examples label every token, the first too. Packed into one row, the model's shifted loss
    would train each sequence's last token to predict the next sequence's first: the packed loss must be
    the padded one."""
    from lightning_opd.training import PackCollator, PadCollator

    torch.manual_seed(0)
    rows = [supervised_example([], torch.randint(2, VOCAB, (4 + i,)).tolist()) for i in range(3)]
    model = tiny_qwen3(0).eval()
    losses = []
    for batch in (PadCollator(0)(rows), PackCollator()(rows)):
        with torch.no_grad():
            losses.append(model(**batch).loss.item())
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)
