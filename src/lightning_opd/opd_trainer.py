"""The OPD trainer: transformers' Trainer with the OPD loss on batches that
hold token ids, a response mask and the teacher's per-token log-probs.
Lightning OPD feeds it the cache; standard OPD builds such batches live."""
from __future__ import annotations

from collections import defaultdict

import torch
from transformers import Trainer

from lightning_opd.backends.hf import token_logprobs
from lightning_opd.opd_loss import opd_loss
from lightning_opd.training import IGNORE_INDEX, supervised_example


def opd_example(prompt: list[int], response: list[int], teacher_logprobs: list[float]) -> dict[str, list]:
    """A training sequence whose teacher log-probs sit at the positions of the response tokens."""
    example = supervised_example(prompt, response)
    example["teacher_logprobs"] = [0.0] * len(prompt) + [float(x) for x in teacher_logprobs]
    return example


def response_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi_theta of every next token, mask of response tokens), both (batch, tokens - 1)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    return token_logprobs(logits, batch["input_ids"][:, 1:]), mask


class OPDTrainer(Trainer):
    def __init__(self, *args, tau: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.tau = tau
        self._metrics: dict[str, list[float]] = defaultdict(list)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        student, mask = response_logprobs(model, inputs)
        loss, metrics = opd_loss(student, inputs["teacher_logprobs"][:, 1:], mask, self.tau)
        for name, value in metrics.items():
            self._metrics[name].append(value)
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:  # a training log: add the OPD metrics averaged since the last one
            logs.update({name: sum(v) / len(v) for name, v in self._metrics.items() if v})
            self._metrics.clear()
        super().log(logs, *args, **kwargs)
