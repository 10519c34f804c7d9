"""Generation and teacher-scoring backends behind one interface.

``hf`` runs transformers (CPU or GPU); ``vllm`` runs an offline vLLM ``LLM``.
Both take and return token ids, so artifacts are identical whichever ran.
"""
from __future__ import annotations

import inspect

from lightning_opd.backends.base import Backend, GenerationResult, request_seed

BACKENDS = ("hf", "vllm")


def get_backend(name: str, model: str, scoring: bool = False, **options) -> Backend:
    """``scoring``: the engine will score (teacher cache), which vLLM runs without prefix caching."""
    if name == "hf":
        from lightning_opd.backends.hf import HFBackend as backend
    elif name == "vllm":
        from lightning_opd.backends.vllm import VLLMBackend as backend
    else:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    parameters = inspect.signature(backend.__init__).parameters
    known = set(parameters) - {"self", "model", "engine_options"}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())  # vLLM engine args
    if not takes_any and (unknown := sorted(set(options) - known)):
        # e.g. vLLM's options left in backend_options after switching a config to hf
        raise ValueError(f"backend {name!r} does not take the option(s) {unknown} of backend_options; "
                         f"it takes {sorted(known)}")
    if name == "vllm":
        options["scoring"] = scoring
    return backend(model, **options)


def gpus_per_engine(name: str, options: dict) -> int:
    """GPUs one engine spans: vLLM's tensor x pipeline parallel size; transformers uses one."""
    if name == "vllm":
        return int(options.get("tensor_parallel_size", 1)) * int(options.get("pipeline_parallel_size", 1))
    return 1


__all__ = ["Backend", "GenerationResult", "get_backend", "gpus_per_engine", "request_seed", "BACKENDS"]
