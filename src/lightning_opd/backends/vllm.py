"""The vLLM backend: offline ``LLM`` for sampling and ``prompt_logprobs`` for
teacher scoring (no server). Tensor parallel size and GPU memory share come
from the config's backend options."""
from __future__ import annotations

import numpy as np
from tqdm import tqdm

from lightning_opd.backends.base import Backend, GenerationResult, TopKScores, canonical_top_k, request_seed
from lightning_opd.hparams import SamplingParams
from lightning_opd.vllm_shutdown import shutdown_engine

# vLLM has reported wrong (stale) prompt log-probs with prefix caching on:
# the engine that scores runs without it.
SCORING_ENGINE_OPTIONS = {"enable_prefix_caching": False}


class VLLMBackend(Backend):
    def __init__(self, model: str, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
                 dtype: str = "auto", max_model_len: int | None = None, seed: int = 0, scoring: bool = False,
                 **engine_options):
        """``scoring``: this engine scores (``prompt_logprobs``); prefix caching is turned off."""
        from vllm import LLM

        from lightning_opd.hub import split_revision

        if scoring:
            if engine_options.get("enable_prefix_caching"):
                raise ValueError("backend_options: enable_prefix_caching must be off for teacher scoring "
                                 "(vLLM has reported wrong prompt log-probs with it on)")
            engine_options.update(SCORING_ENGINE_OPTIONS)
        model, revision = split_revision(model)
        self.llm = LLM(
            model=model,
            revision=revision,
            tokenizer_revision=revision,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype,
            max_model_len=max_model_len,
            seed=seed,
            **engine_options,
        )

    def close(self) -> None:
        shutdown_engine(self.llm)

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, first_index: int = 0
    ) -> list[list[GenerationResult]]:
        from vllm import SamplingParams as VLLMSampling
        from vllm.inputs import TokensPrompt

        # one seed per request, from the prompt's global index: the same samples in any shard
        sampling = [
            VLLMSampling(
                n=params.n,
                temperature=params.temperature,
                top_p=params.top_p,
                max_tokens=params.max_new_tokens,
                seed=request_seed(params.seed, first_index + i),
            )
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sampling, use_tqdm=True)
        return [
            [GenerationResult(list(c.token_ids), c.finish_reason == "stop") for c in out.outputs] for out in outputs
        ]

    def _prompt_logprobs(self, prompts: list[list[int]], responses: list[list[int]], k: int, temperature: float):
        """Per response, vLLM's prompt log-probs at its positions: dicts of the
        top ``k`` tokens plus the actual one (``prompt_logprobs=k``)."""
        from vllm import SamplingParams as VLLMSampling
        from vllm.inputs import TokensPrompt

        if temperature != 1.0:
            raise ValueError("the vllm backend scores at temperature 1.0 only (prompt_logprobs are raw)")
        sampling = VLLMSampling(max_tokens=1, prompt_logprobs=k, temperature=1.0)
        requests = [TokensPrompt(prompt_token_ids=p + r) for p, r in zip(prompts, responses)]
        outputs = self.llm.generate(requests, sampling, use_tqdm=True)
        for prompt, response, out in tqdm(zip(prompts, responses, outputs), total=len(prompts), desc="collect"):
            # prompt_logprobs[t] holds the log-probs of token t given tokens < t (None at t = 0)
            yield response, out.prompt_logprobs[len(prompt) : len(prompt) + len(response)]

    def score(self, prompts: list[list[int]], responses: list[list[int]], temperature: float = 1.0) -> list[np.ndarray]:
        return [np.array([pos[token].logprob for pos, token in zip(positions, response)], np.float32)
                for response, positions in self._prompt_logprobs(prompts, responses, 0, temperature)]

    def score_top_k(self, prompts: list[list[int]], responses: list[list[int]], k: int,
                    temperature: float = 1.0) -> list[TopKScores]:
        scores = []
        for response, positions in self._prompt_logprobs(prompts, responses, k, temperature):
            own = np.array([pos[token].logprob for pos, token in zip(positions, response)], np.float32)
            # each position holds the top k and, when it is not among them, the actual token:
            # the k best of them in canonical order
            ids = np.array([sorted(pos, key=lambda i, pos=pos: (-pos[i].logprob, i))[:k] for pos in positions],
                           np.int64).reshape(len(response), k)
            top = np.array([[pos[i].logprob for i in row] for pos, row in zip(positions, ids)],
                           np.float32).reshape(len(response), k)
            scores.append(TopKScores(own, *canonical_top_k(ids, top)))
        return scores
