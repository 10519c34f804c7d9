"""The OPD trainer: transformers' Trainer with the OPD loss on batches that
hold token ids, a response mask and the teacher's per-token log-probs.
Lightning OPD feeds it the cache; standard OPD builds such batches live.

Both log the OPD metrics of `opd_loss` (per-token reverse KL to the teacher
on the training batch among them; each a mean over the response tokens of
every micro-batch of every process since the last log), the tokens of an
optimiser step and, given
a frozen copy of pi_ref and held-out sequences, the drift KL(pi_theta || pi_ref)
on them (each process takes its share of the sequences)."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from transformers import Trainer, TrainerCallback

from lightning_opd.logprobs import drift_kl_sum, response_logprobs, response_support_logprobs
from lightning_opd.opd_loss import LOSSES, opd_loss, topk_kl_loss
from lightning_opd.training import (
    IGNORE_INDEX,
    add_tracking_argument,
    load_optimizer_state,
    require_optimizer_state,
    supervised_example,
)


def opd_example(prompt: list[int], response: list[int], teacher_logprobs: list[float],
                top_ids: np.ndarray | list[list[int]] | None = None,
                top_logprobs: np.ndarray | list[list[float]] | None = None) -> dict[str, list | np.ndarray]:
    """A training sequence whose teacher log-probs sit at the positions of the
    response tokens; and, given, the teacher's top k at those positions (k ids
    and log-probs per response token), as (tokens, k) arrays with zeros at the
    prompt's positions."""
    example = supervised_example(prompt, response)
    example["teacher_logprobs"] = [0.0] * len(prompt) + [float(x) for x in teacher_logprobs]
    if top_ids is not None:
        for key, values, dtype in (("teacher_topk_ids", top_ids, np.int64),
                                   ("teacher_topk_logprobs", top_logprobs, np.float32)):
            per_token = np.asarray(values, dtype)
            if per_token.ndim != 2 or len(per_token) != len(response):
                if len(response) or per_token.size:
                    raise ValueError(f"{key}: expected {len(response)} rows of k values (one per response token), "
                                     f"got shape {per_token.shape}")
                per_token = per_token.reshape(0, 0)  # an empty response's []
            example[key] = np.concatenate([np.zeros((len(prompt), per_token.shape[1]), dtype), per_token])
    return example


def shard_frozen(model):
    """Shards a frozen model (pi_ref, the live teacher) over the processes with
    FSDP2 like the trained one, so that each process holds 1/N of its weights:
    at paper scale a replicated 32B teacher does not fit beside the student.
    Rank 0 holds the weights (`training.load_for_fsdp`), the other ranks may
    hold the model on the meta device: each receives its shards from rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    full = model.state_dict() if torch.distributed.get_rank() == 0 else {}
    mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (torch.distributed.get_world_size(),))
    for module in model.modules():
        if type(module).__name__ in (model._no_split_modules or []):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


class LogAlsoAt(TrainerCallback):
    """Makes the Trainer log at its last step and, with ``every``, at every multiple of it, besides
    ``logging_steps`` (drift is computed in a log). The report reads the drift at the end of training
    and weights each log by the steps it covers: a round of 30 or 60 steps at ``logging_steps`` 8
    would otherwise end 6 or 4 steps after its last log."""

    def __init__(self, every: int | None = None):
        self.every = every

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps or (self.every and state.global_step % self.every == 0):
            control.should_log = True
        return control


class ContinueOptimizer(TrainerCallback):
    """Starts a run that does not resume from a checkpoint of its own from an
    earlier run's optimiser state (the optimiser exists, prepared, by now)."""

    def __init__(self, trainer: Trainer, directory: Path):
        require_optimizer_state(directory)  # before any work
        self.trainer, self.directory = trainer, directory

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            load_optimizer_state(self.trainer, self.directory)


class CountStepsFromStart(TrainerCallback):
    """A resumed run's first log covers the steps since its checkpoint, not since step 0."""

    def __init__(self, trainer: OPDTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._last_log_step = state.global_step


class OPDTrainer(Trainer):
    """``drift_batches``: this process's share of the held-out sequences, as
    batches (every process gets as many); ``drift_every``: optimiser steps
    between drift measurements (None: at every training log)."""

    def __init__(self, *args, tau: float | None = None, reference=None, drift_batches=None,
                 drift_every: int | None = None, loss: str = "sampled", optimizer_state: Path | None = None,
                 **kwargs):
        """``optimizer_state``: a directory `save_final` wrote the optimiser state
        into (an earlier round's); a run that does not resume from a checkpoint
        starts from it instead of fresh moments (its lr schedule starts anew)."""
        super().__init__(*args, **kwargs)
        # compute_loss takes num_items_in_batch itself, whatever the model's forward accepts: the Trainer then
        # counts the step's response tokens and leaves the loss unscaled, so that the loss is the token mean
        # of the optimiser step however it is split (the Trainer sets this from the model's signature)
        self.model_accepts_loss_kwargs = True
        if optimizer_state is not None:
            self.add_callback(ContinueOptimizer(self, optimizer_state))
        if loss not in LOSSES:
            raise ValueError(f"unknown OPD loss {loss!r} (lightning_opd.loss); use one of {list(LOSSES)}")
        self.tau = tau
        self.loss = loss
        self.reference = self.frozen(reference) if reference is not None else None
        self.drift_batches = drift_batches or []
        self.drift_every = drift_every
        self.add_callback(LogAlsoAt(drift_every if self.reference is not None else None))
        # each OPD metric is a mean over response tokens: its sum over the tokens since the last log, and
        # the tokens, reduced over the processes at the log (a rank's own would describe 1/N of the data)
        self._metric_sums: dict[str, float] = defaultdict(float)
        self._metric_tokens = 0.0
        self._tokens = torch.zeros(2, dtype=torch.float64)  # (tokens, response tokens) since the last log
        self._last_log_step = 0
        self.add_callback(CountStepsFromStart(self))

    def frozen(self, model):
        """A model this trainer only runs forward, sharded like the trained one under FSDP."""
        return (shard_frozen(model) if self.is_fsdp_enabled else model).eval()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # num_items_in_batch: response tokens of the whole optimiser step (all
        # micro-batches, all processes), so that the loss is the mean over the
        # global batch whatever the split; processes average their gradients,
        # hence the factor (without average_tokens_across_devices the count is
        # this process's own, as is the mean). The Trainer then skips its division by the
        # accumulation steps (it passes the count only to models that take it).
        teacher = inputs["teacher_logprobs"][:, 1:]
        if self.loss == "sampled":
            student, mask = response_logprobs(model, inputs)
            loss, metrics = opd_loss(student, teacher, mask, self.tau, num_items_in_batch)
        else:
            student, rest, support, mask = response_support_logprobs(model, inputs, inputs["teacher_topk_ids"][:, 1:])
            loss, metrics = topk_kl_loss(support, rest, inputs["teacher_topk_logprobs"][:, 1:], mask,
                                         self.loss.removeprefix("topk_").removesuffix("_kl"), num_items_in_batch)
            metrics.update(opd_loss(student.detach(), teacher, mask, self.tau)[1])  # the sampled-token metrics
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes
        if "sampler_logprobs" in inputs:  # the sampler's view of the sampled tokens vs the trainer's
            gap = (student.detach() - inputs["sampler_logprobs"][:, 1:]).abs() * mask
            metrics["sampler_logprob_gap"] = (gap.sum() / mask.sum().clamp(min=1)).item()
        response_tokens = float(mask.sum())
        for name, value in metrics.items():  # each a mean over this micro-batch's response tokens
            self._metric_sums[name] += value * response_tokens
        self._metric_tokens += response_tokens
        tokens = inputs["attention_mask"].sum() if "attention_mask" in inputs else inputs["input_ids"].numel()
        self._tokens += torch.tensor([float(tokens), float(inputs["labels"].ne(IGNORE_INDEX).sum())])
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:  # a training log (every process makes it): add the OPD metrics since the last one
            logs.update(self.reduced_metrics())
            steps = max(1, self.state.global_step - self._last_log_step)
            tokens = self.accelerator.reduce(self._tokens.to(self.accelerator.device), "sum").tolist()
            logs["tokens_per_step"], logs["response_tokens_per_step"] = tokens[0] / steps, tokens[1] / steps
            # the steps these means cover: after a resume, the steps since the checkpoint
            logs["logged_steps"] = steps
            self._tokens.zero_()
            self._last_log_step = self.state.global_step
            last = self.state.global_step >= self.state.max_steps
            if self.reference is not None and self.drift_batches and (
                    not self.drift_every or self.state.global_step % self.drift_every == 0 or last):
                logs["drift_kl_ref"] = self.drift()
        super().log(logs, *args, **kwargs)

    def reduced_metrics(self) -> dict[str, float]:
        """The OPD metrics since the last log, each the mean over the response tokens of every process."""
        names = sorted(self._metric_sums)  # the same on every process: the same loss and inputs
        local = torch.tensor([*(self._metric_sums[name] for name in names), self._metric_tokens],
                             dtype=torch.float64)
        *sums, tokens = self.accelerator.reduce(local.to(self.accelerator.device), "sum").tolist()
        self._metric_sums.clear()
        self._metric_tokens = 0.0
        return {name: total / tokens for name, total in zip(names, sums)} if tokens else {}

    def drift(self) -> float:
        """KL(pi_theta || pi_ref) per response token of the held-out sequences,
        each process measuring its share once, summed over the processes."""
        model = self.accelerator.unwrap_model(self.model)
        totals = torch.zeros(2, dtype=torch.float64)
        for batch in self.drift_batches:
            kl, count = drift_kl_sum(model, self.reference, {k: v.to(model.device) for k, v in batch.items()})
            totals += torch.tensor([kl, count], dtype=torch.float64)
        kl, count = self.accelerator.reduce(totals.to(self.accelerator.device), "sum").tolist()
        return kl / max(count, 1.0)


def add_output_arguments(parser) -> None:
    """Arguments both OPD trainers share: where the model and checkpoints go, drift logging, tracking."""
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--checkpoint-root", type=Path, required=True)
    parser.add_argument("--drift-prompts", type=Path, help="held-out prompts on which KL(pi_theta || pi_ref) is logged")
    parser.add_argument("--drift-n", type=int, default=64, help="how many of them (0: no drift logging)")
    parser.add_argument("--drift-max-new-tokens", type=int, default=128)
    parser.add_argument("--drift-every", type=int, default=0,
                        help="optimiser steps between drift measurements (0: at every training log)")
    add_tracking_argument(parser)


def drift_reference(init: str, tokenizer, prompts_path: Path | None, n_prompts: int, prompt_template: str,
                    max_new_tokens: int, rows_per_batch: int, dtype: str = "float32",
                    chat_template_kwargs: dict | None = None):
    """A frozen copy of pi_ref and this process's share of the held-out
    sequences (one pi_ref sample per prompt, temperature 1) on which
    `drift_kl_sum` is measured during training, as batches of at most
    ``rows_per_batch`` rows; (None, []) without prompts or when ``n_prompts`` is 0."""
    if not prompts_path or not n_prompts:
        return None, []
    from lightning_opd.artifacts import TASK_SCHEMA, read_table
    from lightning_opd.hparams import SamplingParams
    from lightning_opd.modeling import load_model, prompt_ids, stop_token_ids
    from lightning_opd.sampling import sample_with
    from lightning_opd.training import PadCollator, process_rank, world_size

    reference = load_model(init, dtype=dtype).eval()  # on this process's device to sample; sharded later under FSDP
    problems = read_table(prompts_path, TASK_SCHEMA)[0].column("problem").to_pylist()[:n_prompts]
    prompts = [prompt_ids(tokenizer, p, prompt_template, chat_template_kwargs)
               for p in problems[process_rank()::world_size()]]
    examples = []
    if prompts:
        params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=max_new_tokens, seed=0,
                                batch_size=len(prompts))
        samples = sample_with(reference, prompts, params, stop_token_ids(reference, tokenizer),
                              tokenizer.pad_token_id, progress=False)
        examples = [supervised_example(p, s[0].response_ids) for p, s in zip(prompts, samples)]
    batches = [examples[i:i + rows_per_batch] for i in range(0, len(examples), rows_per_batch)]
    # under FSDP every process must run as many forward passes: one short of
    # sequences runs a one-token sequence that counts for nothing
    per_process = -(-len(problems) // world_size())
    passes = -(-per_process // rows_per_batch)
    batches += [[supervised_example([tokenizer.pad_token_id], [])]] * (passes - len(batches))
    return reference, [PadCollator(tokenizer.pad_token_id)(rows) for rows in batches]
