"""Sampling with a loaded transformers model: the hf backend's generation,
the live student of standard OPD and the drift reference's held-out batch
all go through `sample_with`."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from lightning_opd.hparams import SamplingParams


@dataclass
class GenerationResult:
    response_ids: list[int]
    finished: bool  # ended with an end-of-sequence token rather than the length limit


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (less padding)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def sample_with(model, prompts: list[list[int]], params: SamplingParams, stop_ids: set[int], pad_id: int,
                progress: bool = True, synced: bool = False) -> list[list[GenerationResult]]:
    """``params.n`` samples per prompt from a loaded model, each cut after its
    first stop token. ``synced``: the model is sharded over processes (FSDP),
    which must then run the same number of forward passes until every one of
    them has finished."""
    torch.manual_seed(params.seed)
    results: list[list[GenerationResult]] = [[] for _ in prompts]
    batches = length_sorted_batches([len(p) for p in prompts], max(1, params.batch_size // params.n))
    for batch in tqdm(batches, desc="generate", unit="batch", disable=not progress):
        width = max(len(prompts[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):  # left padding: every prompt ends at the same column
            input_ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            attention[row, width - len(prompts[i]):] = 1
        output = model.generate(
            input_ids=input_ids.to(model.device), attention_mask=attention.to(model.device),
            do_sample=params.temperature > 0, temperature=params.temperature or None,
            top_p=params.top_p if params.temperature > 0 else None, top_k=None,
            max_new_tokens=params.max_new_tokens, num_return_sequences=params.n,
            eos_token_id=sorted(stop_ids), pad_token_id=pad_id, synced_gpus=synced,
        )[:, width:].tolist()
        for row, sequence in enumerate(output):
            results[batch[row // params.n]].append(cut_at_stop(sequence, stop_ids))
    return results


def cut_at_stop(sequence: list[int], stop_ids: set[int]) -> GenerationResult:
    for position, token in enumerate(sequence):
        if token in stop_ids:
            return GenerationResult(sequence[:position + 1], True)
    return GenerationResult(sequence, False)
