"""Standard OPD's vLLM sampler: a vLLM engine colocated with training, one per
training process (data parallel, as the trainer), that samples the live
student's responses and holds the student's current weights.

The weights are pushed into the engine after every optimiser step: TRL's
colocate machinery (`trl.generation.vllm_generation.VLLMGeneration`) gathers
the FSDP1 / FSDP2 / DeepSpeed ZeRO-3 parameters one at a time under the names
vLLM expects, and vLLM's in-place reload (the worker's ``reload_weights``)
loads them. TRL itself calls the engine model's ``load_weights``, which fails
once the engine has repacked its weights into a kernel layout (vLLM's CPU
kernels do, in float32); the reload restores the checkpoint layout, loads and
repacks. With ``enable_sleep_mode`` (GPU only) the engine gives its memory
back while the trainer works: level 2 drops the weights too, which the next
sync pushes again.

The engine is built here rather than by TRL because TRL gives vLLM no dtype
(vLLM then serves a float32 checkpoint in bfloat16, unlike the trainer) and
one seed per process (every request would draw the same numbers); the
requests carry one seed each, from the step, so a resumed run samples what
an uninterrupted one would."""
from __future__ import annotations

import os
from typing import Any

from trl.generation.vllm_generation import VLLMGeneration, empty_cache
from trl.trainer.utils import ensure_master_addr_port

from lightning_opd.backends.base import request_seed
from lightning_opd.hparams import SAMPLER_ENGINE_DEFAULTS, SamplingParams
from lightning_opd.sampling import GenerationResult

# what the sampler's engine options may set; the rest is fixed by colocation
ENGINE_OPTIONS = {"gpu_memory_utilization", "enable_sleep_mode", "dtype", "max_model_len", "max_num_seqs",
                  "max_num_batched_tokens", "enforce_eager", "enable_prefix_caching"}


def check_engine_options(options: dict[str, Any]) -> dict[str, Any]:
    if unknown := sorted(set(options) - ENGINE_OPTIONS):
        raise ValueError(f"standard_opd.sampler_options: unknown {unknown}; known: {sorted(ENGINE_OPTIONS)}")
    return options


def retie_output_embeddings(worker) -> None:
    """With tied embeddings the checkpoint has no output layer: the reload
    skips it and puts its kernel tensors back, stale (vLLM 0.32's CPU
    kernels keep a packed copy of the output weights). Tie it to the
    reloaded input embeddings again and let it repack."""
    model = worker.model_runner.model
    if not worker.model_runner.model_config.hf_config.tie_word_embeddings:
        return
    lm_head = model.lm_head.tie_weights(model.model.embed_tokens)
    lm_head.quant_method.process_weights_after_loading(lm_head)


class ColocatedVLLMSampler(VLLMGeneration):
    """``model``: the trained student (wrapped or not); ``model_path``: the
    checkpoint the engine starts from (pi_ref, or the resumed weights: the
    first sample of a run syncs them anyway)."""

    def __init__(self, model, accelerator, tokenizer, model_path: str, stop_ids: set[int], **engine_options):
        engine_options = check_engine_options(dict(engine_options))
        self.model_path = model_path
        self.stop_ids = sorted(stop_ids)
        self.engine_options = {**SAMPLER_ENGINE_DEFAULTS, **engine_options}
        self.synced_step: int | None = None
        self.weight_syncs = self.generate_calls = 0  # since the engine started: the trainer logs them
        super().__init__(
            model,
            accelerator,
            tokenizer,
            mode="colocate",
            tensor_parallel_size=1,
            gpu_memory_utilization=self.engine_options["gpu_memory_utilization"],
            enable_sleep_mode=self.engine_options["enable_sleep_mode"],
        )

    def _init_vllm(self) -> None:
        from vllm import LLM

        accelerator = self.accelerator
        # vLLM's external launcher joins the training processes as they are
        os.environ.update(RANK=str(accelerator.process_index), LOCAL_RANK=str(accelerator.local_process_index),
                          WORLD_SIZE=str(accelerator.num_processes))
        ensure_master_addr_port()
        self.llm = LLM(
            model=self.model_path,
            tensor_parallel_size=1,
            distributed_executor_backend="external_launcher",
            seed=accelerator.process_index,
            # the student's own log-probs (before temperature and top-p), which the trainer's are: the gap
            # then shows a missed sync whatever the sampling temperature
            logprobs_mode="raw_logprobs",
            **self.engine_options,
        )
        self._llm_weights_sleeping = self.enable_sleep_mode
        if self.enable_sleep_mode:
            self.llm.sleep(level=2)
        accelerator.wait_for_everyone()

    def sync_weights(self) -> None:
        if self.enable_sleep_mode:
            empty_cache()  # as TRL's sync_weights: the trainer's cached blocks would crowd the woken weights out
            self.llm.wake_up(tags=["weights"])
            self._llm_weights_sleeping = False
        self.weight_syncs += 1
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": self._iter_named_params(),
                                                          "is_checkpoint_format": True})
        self.llm.collective_rpc(retie_output_embeddings)
        self.llm.reset_prefix_cache()

    def sync(self, step: int) -> bool:
        """Pushes the student's weights into the engine unless it holds those
        of optimiser step ``step`` already; a collective under FSDP (every
        process calls it at the same step). True if it pushed."""
        if self.synced_step == step and not self._llm_weights_sleeping:
            return False
        self.sync_weights()
        self.synced_step = step
        return True

    def sample(self, prompts: list[list[int]], params: SamplingParams
               ) -> tuple[list[list[GenerationResult]], list[list[list[float]]]]:
        """``params.n`` samples per prompt and the engine's log-prob of each
        sampled token, in one generate call; prompt ``i`` draws with
        ``request_seed(params.seed, i)``."""
        from vllm import SamplingParams as VLLMSampling
        from vllm.inputs import TokensPrompt

        if self.enable_sleep_mode:
            self.llm.wake_up(tags=["kv_cache"])
        requests = [
            VLLMSampling(n=params.n, temperature=params.temperature, top_p=params.top_p,
                         max_tokens=params.max_new_tokens, seed=request_seed(params.seed, i),
                         stop_token_ids=self.stop_ids, logprobs=0)
            for i in range(len(prompts))
        ]
        self.generate_calls += 1
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], requests, use_tqdm=False)
        if self.enable_sleep_mode:
            self.llm.sleep(level=2)
            self._llm_weights_sleeping = True
        samples = [[GenerationResult(list(c.token_ids), c.finish_reason == "stop") for c in out.outputs]
                   for out in outputs]
        logprobs = [[[position[token].logprob for position, token in zip(c.logprobs, c.token_ids)]
                     for c in out.outputs] for out in outputs]
        return samples, logprobs
