"""Typed hyperparameters of every stage, parsed from the JSON the rules pass.

The Snakemake config schema already validates the config; these dataclasses
make each module usable on its own with the same checks and defaults. Their
defaults are those of the embedded config (config/config.yaml), one section
each: `task`, `teachers.A.build.arch`, `sft_data.sampling`, `sft.train`,
`lightning_opd` (a test holds them equal); other sections of the config
that use a dataclass (the student's arch, the rollouts' sampling, ...) are
overrides of these defaults.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, TypeVar

T = TypeVar("T")


@dataclasses.dataclass
class TaskParams:
    seed: int = 0
    n_teacher: int = 4000
    n_sft: int = 800
    n_opd: int = 8192
    n_eval: int = 200
    min_operands: int = 2
    max_operands: int = 4
    max_operand: int = 9


@dataclasses.dataclass
class ArchParams:
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    max_position_embeddings: int = 256


@dataclasses.dataclass
class TrainParams:
    learning_rate: float = 2e-3
    optim: str = "adamw_torch"  # any transformers optimizer name
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float = 1.0
    # sequences per optimiser step, over all processes and accumulation steps
    batch_size: int = 32
    # sequences per process per forward pass, at most batch_size / processes
    # (None: that); gradient accumulation makes up the rest, so one config
    # means the same optimisation on 1 device or 64
    micro_batch_size: int | None = None
    # concatenate each micro-batch into one row (no padding; attention stays within each sequence)
    packing: bool = False
    epochs: float = 5.0
    max_steps: int = -1
    seed: int = 0
    bf16: bool = False
    gradient_checkpointing: bool = False
    # FSDP for multi-process runs: transformers' fsdp_config (version, reshard_after_forward,
    # activation_checkpointing, cpu_offload, ...); None: DDP (each process holds the whole model)
    fsdp: dict[str, Any] | None = None
    save_steps: int = 100
    logging_steps: int = 25


@dataclasses.dataclass
class SamplingParams:
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 128
    n: int = 1
    seed: int = 0
    batch_size: int = 256


@dataclasses.dataclass
class OPDParams(TrainParams):
    # the paper's optimiser (Adam 0.9/0.98, weight decay 0.1, constant lr) with an lr for the tiny models
    learning_rate: float = 6e-4
    lr_scheduler_type: str = "constant"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.1
    adam_beta2: float = 0.98
    batch_size: int = 256
    # the gradient of one pass over the batch (the loss divides by the step's tokens) in passes each padded
    # to its own longest row: Lightning OPD's training ~17% faster on a CPU, about half the peak memory
    micro_batch_size: int | None = 32
    epochs: float = 3.75
    save_steps: int = 20
    logging_steps: int = 8
    # None turns the advantage clipping of Algorithm 1 off (as in the public code); `sampled` loss only.
    tau: float | None = 1.0
    allow_teacher_mismatch: bool = False
    # sampled (the paper's), topk_reverse_kl or topk_forward_kl (over a top-k cache's k + 1 bins)
    loss: str = "sampled"
    # k of a top-k loss: the teacher's first k tokens of the cache (None: all the cache holds)
    top_k: int | None = None


@dataclasses.dataclass
class TrackingParams:
    """Where a trainer reports its logs (transformers' ``report_to``)."""
    report_to: list[str] = dataclasses.field(default_factory=list)  # e.g. ["tensorboard", "wandb", "mlflow"]
    project: str | None = None  # the W&B project / MLflow experiment / Trackio project
    run_name: str | None = None
    log_dir: str | None = None  # TensorBoard's event files (and W&B's local run files) go here


# The colocated vLLM engine of standard OPD (`standard_opd.sampler_options`): the options it sets
# itself when the config does not (the others default to vLLM's)
SAMPLER_ENGINE_DEFAULTS: dict[str, Any] = {"gpu_memory_utilization": 0.3, "enable_sleep_mode": False,
                                           "max_num_batched_tokens": 4096}


def micro_batch(batch_size: int, micro_batch_size: int | None, processes: int) -> int:
    """Sequences per process per forward pass: ``micro_batch_size``, at most
    (and by default) a process's share of the global batch."""
    per_process = max(1, batch_size // processes)
    return min(micro_batch_size or per_process, per_process)


def accumulation(params: TrainParams, processes: int) -> tuple[int, int]:
    """(micro-batch per process, accumulation steps) that make up the global
    ``batch_size`` on ``processes`` processes."""
    micro = micro_batch(params.batch_size, params.micro_batch_size, processes)
    if params.batch_size % (micro * processes):
        raise ValueError(f"batch_size {params.batch_size} is not a multiple of micro_batch_size {micro} "
                         f"x {processes} processes")
    return micro, params.batch_size // (micro * processes)


def in_prompts(params: OPDParams, n: int) -> OPDParams:
    """``params`` with ``micro_batch_size`` turned from sequences into the
    prompts whose ``n`` samples make them up (standard OPD's dataset holds prompts)."""
    if params.micro_batch_size is None:
        return params
    if params.micro_batch_size % n:
        raise ValueError(f"--opd micro_batch_size (config lightning_opd.micro_batch_size) {params.micro_batch_size}: "
                         f"standard OPD's micro-batch counts sequences and every prompt gives n = {n} of them "
                         "(standard_opd.sampling.n); make it a multiple of n")
    return dataclasses.replace(params, micro_batch_size=params.micro_batch_size // n)


def from_dict(cls: type[T], data: dict[str, Any], where: str = "hparams") -> T:
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"{where}: unknown {cls.__name__} keys {unknown}; known: {sorted(fields)}")
    return cls(**data)


def parse_hparams(cls: type[T], text: str, where: str = "--hparams") -> T:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
    return from_dict(cls, data, where)
