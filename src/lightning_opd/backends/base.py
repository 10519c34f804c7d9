"""The backend interface shared by generation and teacher scoring."""
from __future__ import annotations

import abc

import numpy as np

from lightning_opd.hparams import SamplingParams
from lightning_opd.sampling import GenerationResult


class Backend(abc.ABC):
    """Samples continuations of token-id prompts and scores given continuations."""

    @abc.abstractmethod
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[GenerationResult]]:
        """``params.n`` samples for each prompt, in prompt order."""

    @abc.abstractmethod
    def score(self, prompts: list[list[int]], responses: list[list[int]],
              temperature: float = 1.0) -> list[np.ndarray]:
        """float32 ``log p(response_t | prompt, response_<t)`` for every response token."""
