"""Shutting a vLLM engine down while the process is whole, not at its exit.

Left to itself, vLLM stops its engine process from a finalizer at interpreter
exit and kills it after 5 s. Once (CI, two engines on two cores) the engine
needed longer, and the process then died with SIGABRT after the stage's
output was written (a forced kill alone did not reproduce it). Every engine
the pipeline starts in a process of its own (the backend's, lm-eval's) is shut
down explicitly instead; the backend's also runs in a worker
(`ShardTask.engine_in_worker`). No imports: the evaluation's env has none of
the backends' dependencies."""
from __future__ import annotations

ENGINE_SHUTDOWN_TIMEOUT_S = 120


def shutdown_engine(llm) -> None:
    """Stop an ``LLM``'s engine process and its workers, waiting for them."""
    llm.llm_engine.engine_core.shutdown(timeout=ENGINE_SHUTDOWN_TIMEOUT_S)
