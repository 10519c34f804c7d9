"""Generation and teacher-scoring backends behind one interface.

``hf`` runs transformers (CPU or GPU); ``vllm`` runs an offline vLLM ``LLM``.
Both take and return token ids, so artifacts are identical whichever ran.
"""
from __future__ import annotations

from lightning_opd.backends.base import Backend, GenerationResult

BACKENDS = ("hf", "vllm")


def get_backend(name: str, model: str, **options) -> Backend:
    if name == "hf":
        from lightning_opd.backends.hf import HFBackend

        return HFBackend(model, **options)
    if name == "vllm":
        from lightning_opd.backends.vllm import VLLMBackend

        return VLLMBackend(model, **options)
    raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")


__all__ = ["Backend", "GenerationResult", "get_backend", "BACKENDS"]
