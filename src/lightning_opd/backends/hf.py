"""The transformers backend: batched ``generate`` and one forward pass per
batch for scoring; CPU or GPU."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from tqdm import tqdm

from lightning_opd.backends.base import Backend, GenerationResult, TopKScores, canonical_top_k, request_seed
from lightning_opd.hparams import SamplingParams
from lightning_opd.logprobs import next_token_logprobs, next_token_top_k
from lightning_opd.modeling import load_model, load_tokenizer, stop_token_ids
from lightning_opd.sampling import length_sorted_batches, sample_with


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

    def _batches(self, prompts: list[list[int]], responses: list[list[int]]):
        """(rows, inputs, response positions) per length-sorted batch, right-padded as in training."""
        lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
        for batch in tqdm(length_sorted_batches(lengths, self.batch_size), desc="score", unit="batch"):
            width = max(lengths[i] for i in batch)
            input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            response = torch.zeros((len(batch), width - 1), dtype=torch.bool)
            for row, i in enumerate(batch):  # right padding keeps positions identical to training
                input_ids[row, :lengths[i]] = torch.tensor(prompts[i] + responses[i])
                attention[row, :lengths[i]] = 1
                start = len(prompts[i]) - 1  # position t predicts token t + 1
                response[row, start:start + len(responses[i])] = True
            yield batch, {"input_ids": input_ids.to(self.device), "attention_mask": attention.to(self.device)}, response

    @torch.no_grad()
    def score(self, prompts: list[list[int]], responses: list[list[int]],
              temperature: float = 1.0) -> list[np.ndarray]:
        scores: list[np.ndarray] = [np.zeros(0, np.float32)] * len(prompts)
        for batch, inputs, response in self._batches(prompts, responses):
            logprobs = next_token_logprobs(self.model, inputs, response.to(self.device), temperature).cpu()
            for row, i in enumerate(batch):
                scores[i] = logprobs[row][response[row]].numpy().astype(np.float32)
        return scores

    def score_top_k(self, prompts: list[list[int]], responses: list[list[int]], k: int,
                    temperature: float = 1.0) -> list[TopKScores]:
        scores: list[TopKScores] = [None] * len(prompts)  # type: ignore[list-item]
        for batch, inputs, response in self._batches(prompts, responses):
            target, ids, top = (x.cpu() for x in next_token_top_k(self.model, inputs, response.to(self.device), k,
                                                                   temperature))
            for row, i in enumerate(batch):
                at = response[row]
                scores[i] = TopKScores(target[row][at].numpy().astype(np.float32),
                                       *canonical_top_k(ids[row][at].numpy(), top[row][at].numpy()))
        return scores
