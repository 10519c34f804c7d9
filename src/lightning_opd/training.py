"""Training machinery shared by every trainer of the pipeline (pretraining of
the tiny models, SFT, Lightning OPD, standard OPD): transformers' Trainer with
checkpoints under a directory keyed by the run's config and inputs, resume
from the last one, and an atomic save of the final model."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers import PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer import OPTIMIZER_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from lightning_opd.artifacts import atomic_path, check_writable, write_failure
from lightning_opd.hparams import TrackingParams, TrainParams, accumulation, parse_hparams
from lightning_opd.provenance import PROVENANCE_FILE, TRAIN_LOG_FILE, code_digest, key_digest

IGNORE_INDEX = -100
OPTIMIZER_STATE_DIR = "optimizer_state"  # in a model directory: the state a continuing training starts from


def supervised_example(prompt: list[int], response: list[int]) -> dict[str, list[int]]:
    """A sequence whose loss covers the response tokens only."""
    return {"input_ids": list(prompt) + list(response), "labels": [IGNORE_INDEX] * len(prompt) + list(response)}


def _field_dtype(values: list | np.ndarray) -> torch.dtype:
    """float32 for (lists or arrays of) floats, else long."""
    if isinstance(values, np.ndarray):
        return torch.float32 if values.dtype.kind == "f" else torch.long
    while values and isinstance(values[0], list):
        values = values[0]
    return torch.float32 if values and isinstance(values[0], float) else torch.long


class PadCollator:
    """Right-pads every field of a batch (a list, or an array with one row per
    token): ``input_ids`` with the pad id, ``labels`` with -100, float fields
    with 0; adds ``attention_mask``. A field with a vector per token (the
    teacher's top k) becomes (batch, tokens, k)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        batch: dict[str, torch.Tensor] = {}
        for key in features[0]:
            first = features[0][key]
            fill = {"input_ids": self.pad_id, "labels": IGNORE_INDEX}.get(key, 0)
            dtype = _field_dtype(first)
            if isinstance(first, np.ndarray):
                inner = list(first.shape[1:])
            else:
                inner = [len(first[0])] if first and isinstance(first[0], list) and first[0] else []
            padded = torch.full((len(features), width, *inner), fill, dtype=dtype)
            for row, f in enumerate(features):
                if len(f[key]):
                    padded[row, :len(f[key])] = torch.as_tensor(f[key], dtype=dtype)
            batch[key] = padded
        batch["attention_mask"] = torch.zeros((len(features), width), dtype=torch.long)
        for row, f in enumerate(features):
            batch["attention_mask"][row, :len(f["input_ids"])] = 1
        return batch


class PackCollator:
    """Concatenates a micro-batch into a single row with position ids that
    restart at every sequence: no padding, and transformers keeps attention
    within each sequence (a block-diagonal mask from the position ids; the
    varlen kernel with flash attention). The first label of every sequence is
    ignored: the shifted loss would otherwise train the previous sequence's
    last token to predict it (a prompt-less pretraining example labels its
    first token)."""

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {}
        for key in features[0]:
            if isinstance(features[0][key], np.ndarray):
                values = np.concatenate([f[key] for f in features])
            else:
                values = [x for f in features for x in f[key]]
            batch[key] = torch.as_tensor(values, dtype=_field_dtype(values))[None]
        lengths = [len(f["input_ids"]) for f in features]
        batch["position_ids"] = torch.cat([torch.arange(n) for n in lengths])[None]
        if "labels" in batch:
            starts = np.cumsum([0, *lengths[:-1]])
            batch["labels"][0, torch.as_tensor(starts)] = IGNORE_INDEX
        batch["use_cache"] = False  # with a KV cache transformers ignores the packing in the position ids
        return batch


def collator(params: TrainParams, pad_id: int) -> PadCollator | PackCollator:
    return PackCollator() if params.packing else PadCollator(pad_id)


def world_size() -> int:
    """Processes of this run (torchrun sets WORLD_SIZE; 1 without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def process_rank() -> int:
    """This process's rank among them (torchrun sets RANK; 0 without it)."""
    return int(os.environ.get("RANK", "0"))


def uses_fsdp(params: TrainParams) -> bool:
    """FSDP is configured and there is more than one process to shard over."""
    return params.fsdp is not None and world_size() > 1


def load_device(params: TrainParams) -> str | None:
    """Where a trainer loads its models: the CPU under FSDP (each process then
    keeps its shards on its own GPU), else this process's device."""
    return "cpu" if uses_fsdp(params) else None


def rank() -> int:
    """This process's rank (torchrun sets RANK; 0 without it)."""
    return int(os.environ.get("RANK", "0"))


def empty_model(name_or_path: str | Path, dtype: str = "float32"):
    """The model's architecture with its parameters on the meta device (no
    memory) and its buffers (rotary frequencies) real: what a rank other than
    0 holds until the sharded weights arrive from rank 0."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from lightning_opd.modeling import model_config

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(model_config(name_or_path), dtype=getattr(torch, dtype))
    model.tie_weights()  # as from_pretrained does: the same parameters, hence the same shards, as on rank 0
    return model


def load_for_fsdp(name_or_path: str | Path, params: TrainParams, dtype: str = "float32", sharded: bool | None = None):
    """A model a trainer trains or holds frozen. Under FSDP only rank 0 reads
    the weights (to the CPU); every other rank builds it on the meta device,
    and the weights reach it shard by shard from rank 0 when the model is
    sharded (the trained one by accelerate, whose cpu_ram_efficient_loading
    training_arguments turns on; frozen ones by `opd_trainer.shard_frozen`):
    no rank but 0 ever holds a full copy. Without FSDP: whole, on this
    process's device. ``sharded`` defaults to FSDP on GPUs: without CUDA
    accelerate trains multi-process runs as DDP, which needs whole models."""
    from lightning_opd.modeling import load_model

    if not (uses_fsdp(params) and torch.cuda.is_available() if sharded is None else sharded):
        return load_model(name_or_path, dtype=dtype)
    return load_model(name_or_path, dtype=dtype, device="cpu") if rank() == 0 else empty_model(name_or_path, dtype)


def frozen_dtype(params: TrainParams) -> str:
    """dtype of the models a trainer only runs forward (pi_ref, the live teacher)."""
    return "bfloat16" if params.bf16 else "float32"


def checkpoint_dir(root: Path | str, key: dict[str, Any]) -> Path:
    """A checkpoint directory that belongs to exactly one (config, inputs, code)
    combination, so a rerun with other settings or code never resumes a stale run."""
    return Path(root) / key_digest({**key, "code": code_digest()})


# transformers renamed gradient_checkpointing to activation_checkpointing in 5.2x
_CHECKPOINTING = next(name for name in ("activation_checkpointing", "gradient_checkpointing")
                      if name in {f.name for f in dataclasses.fields(TrainingArguments)})


def add_tracking_argument(parser) -> None:
    """The ``--tracking`` argument every trainer takes; read it with `tracking_params`."""
    parser.add_argument("--tracking", default="{}",
                        help="JSON of TrackingParams: report_to (transformers' integrations), project, run_name, "
                             "log_dir")


def tracking_params(text: str) -> TrackingParams:
    return parse_hparams(TrackingParams, text, "--tracking")


def tracking_arguments(tracking: TrackingParams) -> dict[str, Any]:
    """TrainingArguments fields of the tracking. The trackers take their
    project and TensorBoard directory from the environment (transformers'
    callbacks read WANDB_PROJECT, MLFLOW_EXPERIMENT_NAME and
    TENSORBOARD_LOGGING_DIR), so this sets those of this process."""
    if tracking.project:
        os.environ.update(WANDB_PROJECT=tracking.project, MLFLOW_EXPERIMENT_NAME=tracking.project)
    if tracking.log_dir:
        os.environ["TENSORBOARD_LOGGING_DIR"] = tracking.log_dir
        os.environ.setdefault("WANDB_DIR", tracking.log_dir)  # W&B's local files beside, not in the working dir
        if "wandb" in tracking.report_to:
            Path(tracking.log_dir).mkdir(parents=True, exist_ok=True)  # W&B does not create its directory
    return {"report_to": list(tracking.report_to) or "none", "run_name": tracking.run_name,
            **({"project": tracking.project} if tracking.project else {})}


def training_arguments(params: TrainParams, output_dir: Path, tracking: TrackingParams | None = None,
                       **overrides) -> TrainingArguments:
    processes = world_size()
    micro, steps = accumulation(params, processes)
    # rank 0 alone loads the weights (load_for_fsdp); accelerate broadcasts them as it shards
    fsdp = ({"fsdp": True, "fsdp_config": {**params.fsdp, "cpu_ram_efficient_loading": True}}
            if uses_fsdp(params) else {})
    # without CUDA, accelerate sets up multi-process (gloo) training only when told to use the CPU
    cpu = {"use_cpu": True} if processes > 1 and not torch.cuda.is_available() else {}
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=steps,
        learning_rate=params.learning_rate,
        optim=params.optim,
        lr_scheduler_type=params.lr_scheduler_type,
        warmup_steps=params.warmup_ratio,  # a float below 1 is a ratio of all steps
        weight_decay=params.weight_decay,
        adam_beta1=params.adam_beta1,
        adam_beta2=params.adam_beta2,
        max_grad_norm=params.max_grad_norm,
        num_train_epochs=params.epochs,
        max_steps=params.max_steps,
        seed=params.seed,
        data_seed=params.seed,
        bf16=params.bf16,
        **{_CHECKPOINTING: params.gradient_checkpointing},
        save_strategy="steps",
        save_steps=params.save_steps,
        save_total_limit=2,
        logging_steps=params.logging_steps,
        **tracking_arguments(tracking or TrackingParams()),
        remove_unused_columns=False,
        dataloader_pin_memory=torch.cuda.is_available(),
        ddp_find_unused_parameters=False,  # every parameter takes part in every step
        **fsdp,
        **cpu,
        **overrides,
    )


# What a checkpoint needs to resume exactly: any one name of each group
# (FSDP writes the weights and the optimiser state as directories).
_CHECKPOINT_PARTS = {
    "weights": ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json", "pytorch_model_fsdp_0"),
    "optimizer state": ("optimizer.pt", "optimizer_0", "optimizer.bin"),
    "scheduler state": ("scheduler.pt",),
}


# written into a checkpoint once every process has saved its part: {"processes": N, "fsdp": bool}
CHECKPOINT_COMPLETE = "complete.json"


class CheckpointLayoutError(RuntimeError):
    """A checkpoint saved under FSDP (sharded weights and optimiser) resumed without it, or the other way."""


class MarkCheckpointComplete(TrainerCallback):
    """After every process has written its part of a checkpoint, the main process records in it how many
    processes wrote it, and whether under FSDP. A rerun on another number of processes (a preempted job
    given fewer GPUs) then knows which RNG files the checkpoint must hold, instead of taking it for
    incomplete, and whether transformers can load it at all."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        self.trainer.accelerator.wait_for_everyone()
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            with atomic_path(checkpoint / CHECKPOINT_COMPLETE) as tmp:
                tmp.write_text(json.dumps({"processes": args.world_size, "fsdp": self.trainer.is_fsdp_enabled}) + "\n")


def checkpoint_record(checkpoint: Path) -> dict[str, Any] | None:
    """The completion record of ``checkpoint`` (None: a checkpoint without one, or with an unreadable one)."""
    try:
        record = json.loads((checkpoint / CHECKPOINT_COMPLETE).read_text())
        processes, fsdp = int(record["processes"]), record.get("fsdp", False)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {"processes": processes, "fsdp": fsdp} if processes >= 1 and isinstance(fsdp, bool) else None


def checkpoint_missing(checkpoint: Path, processes: int) -> list[str]:
    """What ``checkpoint``, written by ``processes`` processes, lacks to resume
    from (each process saves its own RNG state when there are several)."""
    missing = [part for part, names in _CHECKPOINT_PARTS.items()
               if not any((checkpoint / name).exists() for name in names)]
    rng = ["rng_state.pth"] if processes == 1 else [f"rng_state_{rank}.pth" for rank in range(processes)]
    missing += [name for name in rng if not (checkpoint / name).is_file()]
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        missing.append("trainer_state.json")
    return missing


def _layout(processes: int, fsdp: bool) -> str:
    return f"{processes} process{'es' if processes > 1 else ''} {'with' if fsdp else 'without'} FSDP"


def last_complete_checkpoint(output_dir: Path, processes: int | None = None, fsdp: bool | None = None) -> str | None:
    """The newest checkpoint that holds weights, optimiser, scheduler, RNG
    state and trainer state. A kill while a checkpoint was being written (or a
    file lost since) leaves an incomplete one: it is removed, and the one
    before it is used, so that a resume never starts from fresh optimiser
    moments or blocks on a checkpoint without weights. ``fsdp``: whether this
    run shards under FSDP; a complete checkpoint saved the other way is refused
    (transformers loads neither layout into the other), not removed."""
    processes = processes or world_size()
    while output_dir.is_dir() and (last := get_last_checkpoint(str(output_dir))):
        # a checkpoint without a record (a kill before it was written) is taken as this run's layout
        record = checkpoint_record(Path(last)) or {"processes": processes, "fsdp": fsdp}
        missing = checkpoint_missing(Path(last), record["processes"])
        if not missing and fsdp is not None and record["fsdp"] != fsdp:
            raise CheckpointLayoutError(
                f"{last}: saved by {_layout(record['processes'], record['fsdp'])}, and this run has "
                f"{_layout(processes, fsdp)}: transformers cannot resume one layout from the other. Rerun on "
                f"{record['processes']} process(es), or delete {output_dir} to start this training over")
        if not missing:
            if record["processes"] != processes:
                print(f"{last} was written by {record['processes']} processes, this run has {processes}: it resumes "
                      f"with the same optimiser steps; the RNG state of a process the checkpoint has none for "
                      f"starts afresh", flush=True)
            return last
        print(f"removing incomplete checkpoint {last} (missing {', '.join(missing)})", flush=True)
        shutil.rmtree(last)
    return None


class NonFiniteTrainingError(FloatingPointError):
    """The loss or the gradient norm of a training step is NaN or infinite."""


# what a non-finite step calls for
NON_FINITE_ADVICE = ("Check the training data for NaN/inf (e.g. teacher log-probs of the cache) or lower the "
                     "learning rate")


class FiniteGuard(TrainerCallback):
    """Stops training at the first optimiser step whose gradient (checked
    before the optimiser applies it) or logged loss is not finite, naming the
    step: a NaN step would otherwise silently turn every weight into NaN."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # FSDP shards: each checks its own
        if local and not torch.stack([torch.isfinite(g).all() for g in local]).all():
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in local]))
            raise NonFiniteTrainingError(
                f"training step {state.global_step + 1}: non-finite gradient norm {norm.item()}; stopped before "
                f"applying it, no model was written. {NON_FINITE_ADVICE}; a rerun resumes from the last "
                "checkpoint before this step")

    def on_log(self, args, state, control, logs=None, **kwargs):
        for name in ("loss", "grad_norm"):
            value = (logs or {}).get(name)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                raise NonFiniteTrainingError(
                    f"training step {state.global_step}: non-finite {name} {value} logged for the steps since the "
                    f"previous log; those steps were applied and the run stopped at this log, no model was written. "
                    f"{NON_FINITE_ADVICE}; a rerun resumes from the last checkpoint, which may hold those steps: "
                    f"delete {args.output_dir} to start the training over")


def check_outputs_writable(out: Path, checkpoint_root: Path) -> None:
    """A trainer's model directory and checkpoint root must be writable: refused before any training,
    not found at the first checkpoint or the final save."""
    check_writable(out)
    check_writable(checkpoint_root, holds_files=True)


def train_with_resume(trainer: Trainer) -> None:
    output_dir = Path(trainer.args.output_dir)
    if trainer.is_world_process_zero():
        last_complete_checkpoint(output_dir, fsdp=trainer.is_fsdp_enabled)  # removes a partial one, before any reads
    trainer.accelerator.wait_for_everyone()
    last = last_complete_checkpoint(output_dir, fsdp=trainer.is_fsdp_enabled)
    if trainer.is_world_process_zero():
        args = trainer.args
        mode = "FSDP" if trainer.is_fsdp_enabled else "DDP" if args.world_size > 1 else "one process"
        print(f"{mode}: {args.world_size} x micro-batch {args.per_device_train_batch_size} x "
              f"{args.gradient_accumulation_steps} accumulation steps per optimiser step"
              + (f"; resuming from {last}" if last else ""), flush=True)
    trainer.add_callback(FiniteGuard())
    trainer.add_callback(MarkCheckpointComplete(trainer))
    nothing_left = bool(last) and finished(Path(last))
    if nothing_left:
        take_no_steps(trainer)
        if trainer.is_world_process_zero():
            print(f"{last} holds the run's last step: nothing left to train", flush=True)
    try:
        trainer.train(resume_from_checkpoint=last)
        if nothing_left:  # the Trainer reports the mean loss of no steps as 0
            trainer.state.log_history[-1].pop("train_loss", None)
    except Exception as error:
        if failure := write_failure(output_dir, error):  # e.g. a full disk while writing a checkpoint
            raise failure from error
        raise


def finished(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` is the run's last optimiser step (its inputs and hyperparameters, hence its
    step count, are those of the run: the checkpoint root is keyed by them)."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return state.get("max_steps", 0) > 0 and state["global_step"] >= state["max_steps"]


def take_no_steps(trainer: Trainer) -> None:
    """Makes ``trainer.train(resume_from_checkpoint=...)`` load the checkpoint (weights, optimiser, state,
    log) and end without a step. The Trainer resumes in epoch ``global_step // steps per epoch`` and,
    when the run ends inside an epoch (3.75 epochs: 120 steps of 32 per epoch), trains one more step
    there before it checks ``max_steps``: a rerun after a kill between the last checkpoint and the final
    save would end with step 121. The step's batches are never fetched (standard OPD samples there)."""
    def no_batches(epoch_iterator, num_batches, device):
        trainer.control.should_training_stop = True
        return [], None

    trainer.get_batch_samples = no_batches


# environment variables that hold the CPU kernels of torch (ATen), MKL and oneDNN to an instruction set
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")
# CPU features whose presence changes which kernels run
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_tile")


def _cpu() -> dict[str, Any]:
    """The CPU's name, family/model and the features of CPU_FEATURES it has (Linux's /proc/cpuinfo; elsewhere
    the name alone)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if not key.strip() and fields:
                break  # the first processor's block is enough
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())
    return {"name": fields.get("model name") or platform.processor() or platform.machine(),
            "model": f"family {fields['cpu family']} model {fields['model']}" if "cpu family" in fields else "",
            "features": [f for f in CPU_FEATURES if f in flags]}


def trained_on(args: TrainingArguments) -> dict[str, Any]:
    """The hardware and kernels of a training's final part (a run resumed after a kill may have begun
    elsewhere). The same code, data and seeds give other weights on another CPU or GPU, or with the CPU's
    kernels held to another instruction set: their floating-point paths round differently."""
    device, cpu = args.device, _cpu()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = cpu["name"] if device.type == "cpu" else device.type
    return {
        "device": device.type,
        "device_name": name,
        "processes": args.world_size,  # over all nodes; the name is the first process's device
        "cpu": cpu,
        "cpu_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the vector ISA of torch's CPU kernels
        "kernel_env": {name: os.environ[name] for name in KERNEL_ENV if name in os.environ},
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
    }


def save_final(trainer: Trainer, tokenizer: PreTrainedTokenizerBase, out: Path | str,
               provenance: dict[str, Any], earlier_log: list[dict[str, Any]] = (),
               optimizer_state: bool = False) -> None:
    """Write model, tokenizer, provenance and training log to ``out`` at once,
    then drop the run's checkpoints (the final model supersedes them). Every
    process of a distributed run calls it (FSDP gathers the full weights);
    the main process writes. ``earlier_log``: the log of the training this one
    continues (an earlier round), written first, this run's steps after its last.
    ``optimizer_state``: also write the optimiser state (under
    OPTIMIZER_STATE_DIR), for a training that continues this one."""
    out = Path(out)
    staging = out.with_name(f".{out.name}.partial")
    if trainer.is_world_process_zero():
        shutil.rmtree(staging, ignore_errors=True)
        if optimizer_state:
            (staging / OPTIMIZER_STATE_DIR).mkdir(parents=True)
    trainer.accelerator.wait_for_everyone()
    try:
        trainer.save_model(str(staging))
        if optimizer_state:  # the Trainer's own writer: one file, or FSDP's sharded state
            trainer._save_optimizer_and_scheduler(str(staging / OPTIMIZER_STATE_DIR))
            trainer.accelerator.wait_for_everyone()
        if trainer.is_world_process_zero():
            with atomic_path(out, is_dir=True) as tmp:
                tmp.rmdir()
                os.replace(staging, tmp)
                tokenizer.save_pretrained(tmp)
                record = {**provenance, "trained_on": trained_on(trainer.args)}
                (tmp / PROVENANCE_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
                offset = max((e.get("step", 0) for e in earlier_log), default=0)
                with open(tmp / TRAIN_LOG_FILE, "w") as log:
                    for entry in earlier_log:
                        log.write(json.dumps(entry) + "\n")
                    for entry in trainer.state.log_history:
                        log.write(json.dumps({**entry, "step": entry.get("step", 0) + offset}) + "\n")
            shutil.rmtree(trainer.args.output_dir, ignore_errors=True)
    except Exception as error:
        if failure := write_failure(out, error):
            raise failure from error
        raise
    finally:
        if trainer.is_world_process_zero():
            shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()


def end_process_group() -> None:
    """Destroy the process group of a distributed run, the last thing a training
    module does: a gloo group left to the interpreter's exit can abort the
    process there ("terminate called without an active exception") after
    the model was saved, and torchrun then fails the job."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def require_optimizer_state(directory: Path) -> None:
    if not any((Path(directory) / name).exists() for name in _CHECKPOINT_PARTS["optimizer state"]):
        raise FileNotFoundError(f"{directory}: no optimiser state to continue from (the earlier round wrote "
                                f"none); rerun the earlier round's training")


def load_optimizer_state(trainer: Trainer, directory: Path) -> None:
    """Load the optimiser state `save_final` wrote into ``directory`` (not the
    lr scheduler's: the continuing run's schedule starts anew), as the Trainer
    loads a checkpoint's: a file, or FSDP's sharded state."""
    require_optimizer_state(directory)
    # a state dict carries each group's lr where the earlier run's schedule ended; the scheduler sets
    # it again only after the first step, which must take this run's lr(0)
    schedule = [{key: group[key] for key in ("lr", "initial_lr") if key in group}
                for group in trainer.optimizer.param_groups]
    if trainer.is_fsdp_enabled:
        from accelerate.utils import load_fsdp_optimizer

        load_fsdp_optimizer(trainer.accelerator.state.fsdp_plugin, trainer.accelerator, trainer.optimizer,
                            trainer.model, str(directory))
    else:
        trainer.optimizer.load_state_dict(torch.load(directory / OPTIMIZER_NAME, map_location="cpu",
                                                     weights_only=True))
    for group, keys in zip(trainer.optimizer.param_groups, schedule):
        group.update(keys)


def params_record(params: Any) -> dict[str, Any]:
    return dataclasses.asdict(params) if dataclasses.is_dataclass(params) else dict(params)
