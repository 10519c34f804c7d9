"""The transformers backend: batched ``generate`` and one forward pass per
batch for scoring; CPU or GPU."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from tqdm import tqdm

from lightning_opd.backends.base import Backend, GenerationResult, request_seed
from lightning_opd.hparams import SamplingParams
from lightning_opd.modeling import load_model, load_tokenizer, stop_token_ids
from lightning_opd.sampling import length_sorted_batches, sample_with


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log-softmax of ``logits`` at ``targets`` without materialising the full
    log-softmax (vocabularies are 150K wide at paper scale)."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


class HFBackend(Backend):
    def __init__(self, model: str, dtype: str = "float32", device: str | None = None, batch_size: int = 64):
        self.model = load_model(model, dtype=dtype, device=device).eval()
        self.tokenizer = load_tokenizer(model)
        self.device = self.model.device
        self.batch_size = batch_size
        self.pad_id = self.tokenizer.pad_token_id
        self.stop_ids = stop_token_ids(self.model, self.tokenizer)

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 first_index: int = 0) -> list[list[GenerationResult]]:
        # transformers samples a batch from one global generator: seed the call
        # from the global index of its first prompt (a shard is one call)
        seed = request_seed(params.seed, first_index)
        return sample_with(self.model, prompts, dataclasses.replace(params, seed=seed), self.stop_ids, self.pad_id)

    @torch.no_grad()
    def score(self, prompts: list[list[int]], responses: list[list[int]],
              temperature: float = 1.0) -> list[np.ndarray]:
        scores: list[np.ndarray] = [np.zeros(0, np.float32)] * len(prompts)
        lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
        for batch in tqdm(length_sorted_batches(lengths, self.batch_size), desc="score", unit="batch"):
            width = max(lengths[i] for i in batch)
            input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):  # right padding keeps positions identical to training
                input_ids[row, :lengths[i]] = torch.tensor(prompts[i] + responses[i])
                attention[row, :lengths[i]] = 1
            input_ids, attention = input_ids.to(self.device), attention.to(self.device)
            logits = self.model(input_ids=input_ids, attention_mask=attention).logits
            logprobs = token_logprobs(logits[:, :-1], input_ids[:, 1:], temperature).cpu()
            for row, i in enumerate(batch):
                start = len(prompts[i]) - 1  # logits at position t predict token t + 1
                scores[i] = logprobs[row, start:start + len(responses[i])].numpy().astype(np.float32)
        return scores
