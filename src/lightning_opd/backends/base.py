"""The backend interface shared by generation and teacher scoring."""
from __future__ import annotations

import abc
import dataclasses

import numpy as np

from lightning_opd.hparams import SamplingParams
from lightning_opd.sampling import GenerationResult


def request_seed(seed: int, index: int) -> int:
    """The sampling seed of prompt ``index`` (its global index in the stage's
    prompt set) under run seed ``seed``: reproducible, and distinct across
    prompts and nearby run seeds, wherever and in whatever shard it runs."""
    return seed * 1_000_003 + index


@dataclasses.dataclass
class TopKScores:
    """A response's scores in a top-k cache: ``logprobs`` (tokens,) of its own
    tokens, and the ``k`` most likely tokens at every position, ``ids`` int32
    and ``top_logprobs`` float32, both (tokens, k), in `canonical_top_k` order."""
    logprobs: np.ndarray
    ids: np.ndarray
    top_logprobs: np.ndarray


def canonical_top_k(ids: np.ndarray, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, k) ids and log-probs sorted by decreasing log-prob, equal
    log-probs by increasing id: one order whichever backend found them."""
    order = np.lexsort((ids, -logprobs), axis=-1)
    return (np.take_along_axis(ids, order, -1).astype(np.int32),
            np.take_along_axis(logprobs, order, -1).astype(np.float32))


class Backend(abc.ABC):
    """Samples continuations of token-id prompts and scores given continuations."""

    @abc.abstractmethod
    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 first_index: int = 0) -> list[list[GenerationResult]]:
        """``params.n`` samples for each prompt, in prompt order. ``first_index``:
        the global index of ``prompts[0]`` in the stage's prompt set; sampling
        depends only on the seed, the prompts and that index (``request_seed``)."""

    @abc.abstractmethod
    def score(self, prompts: list[list[int]], responses: list[list[int]],
              temperature: float = 1.0) -> list[np.ndarray]:
        """float32 ``log p(response_t | prompt, response_<t)`` for every response token."""

    @abc.abstractmethod
    def score_top_k(self, prompts: list[list[int]], responses: list[list[int]], k: int,
                    temperature: float = 1.0) -> list[TopKScores]:
        """`score`, and the ``k`` most likely tokens at every response position."""

    def close(self) -> None:  # noqa: B027 (a no-op unless the engine has processes of its own)
        """Release the engine's processes and memory; nothing to do for an in-process model."""
