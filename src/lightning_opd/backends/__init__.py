"""Generation and teacher-scoring backends behind one interface.

``hf`` runs transformers (CPU or GPU); ``vllm`` runs an offline vLLM ``LLM``.
Both take and return token ids, so artifacts are identical whichever ran.
"""
from __future__ import annotations

import inspect

from lightning_opd.backends.base import Backend, GenerationResult

BACKENDS = ("hf", "vllm")


def get_backend(name: str, model: str, **options) -> Backend:
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
    return backend(model, **options)


__all__ = ["Backend", "GenerationResult", "get_backend", "BACKENDS"]
