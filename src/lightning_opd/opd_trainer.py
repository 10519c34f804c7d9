"""The OPD trainer: transformers' Trainer with the OPD loss on batches that
hold token ids, a response mask and the teacher's per-token log-probs.
Lightning OPD feeds it the cache; standard OPD builds such batches live.

Both log the OPD metrics of `opd_loss` (per-token reverse KL to the teacher
on the training batch among them) and, given a frozen copy of pi_ref and a
held-out batch, the drift KL(pi_theta || pi_ref) on held-out sequences."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from transformers import Trainer

from lightning_opd.backends.hf import token_logprobs
from lightning_opd.opd_loss import opd_loss
from lightning_opd.training import IGNORE_INDEX, add_tracking_argument, supervised_example


def opd_example(prompt: list[int], response: list[int], teacher_logprobs: list[float]) -> dict[str, list]:
    """A training sequence whose teacher log-probs sit at the positions of the response tokens."""
    example = supervised_example(prompt, response)
    example["teacher_logprobs"] = [0.0] * len(prompt) + [float(x) for x in teacher_logprobs]
    return example


def response_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi_theta of every next token, mask of response tokens), both (batch, tokens - 1).
    Takes padded batches (attention_mask) and packed ones (position_ids)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    logits = model(**inputs, use_cache=False).logits[:, :-1]
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    return token_logprobs(logits, batch["input_ids"][:, 1:]), mask


@torch.no_grad()
def drift_kl(model, reference, batch: dict[str, torch.Tensor]) -> float:
    """Exact per-token KL(pi_theta || pi_ref) over the full vocabulary, averaged
    over the response positions of a fixed held-out batch."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    current = torch.log_softmax(model(**inputs).logits[:, :-1].float(), dim=-1)
    ref = torch.log_softmax(reference(**inputs).logits[:, :-1].float(), dim=-1)
    kl = (current.exp() * (current - ref)).sum(-1)
    mask = (batch["labels"][:, 1:] != IGNORE_INDEX).float()
    return float((kl * mask).sum() / mask.sum().clamp(min=1))


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


class OPDTrainer(Trainer):
    def __init__(self, *args, tau: float | None = None, reference=None, drift_batch=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.tau = tau
        self.reference = self.frozen(reference) if reference is not None else None
        self.drift_batch = drift_batch
        self._metrics: dict[str, list[float]] = defaultdict(list)

    def frozen(self, model):
        """A model this trainer only runs forward, sharded like the trained one under FSDP."""
        return (shard_frozen(model) if self.is_fsdp_enabled else model).eval()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        student, mask = response_logprobs(model, inputs)
        # num_items_in_batch: response tokens of the whole optimiser step (all
        # micro-batches, all processes), so that the loss is the mean over the
        # global batch whatever the split; processes average their gradients,
        # hence the factor. The Trainer then skips its division by the
        # accumulation steps (it passes the count only to models that take it).
        loss, metrics = opd_loss(student, inputs["teacher_logprobs"][:, 1:], mask, self.tau, num_items_in_batch)
        if num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        for name, value in metrics.items():
            self._metrics[name].append(value)
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:  # a training log: add the OPD metrics averaged since the last one
            logs.update({name: sum(v) / len(v) for name, v in self._metrics.items() if v})
            self._metrics.clear()
            if self.reference is not None and self.drift_batch is not None:
                model = self.accelerator.unwrap_model(self.model)
                batch = {k: v.to(model.device) for k, v in self.drift_batch.items()}
                logs["drift_kl_ref"] = drift_kl(model, self.reference, batch)
        super().log(logs, *args, **kwargs)


def add_output_arguments(parser) -> None:
    """Arguments both OPD trainers share: where the model and checkpoints go, drift logging, tracking."""
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--checkpoint-root", type=Path, required=True)
    parser.add_argument("--drift-prompts", type=Path, help="held-out prompts on which KL(pi_theta || pi_ref) is logged")
    parser.add_argument("--drift-n", type=int, default=64, help="how many of them (0: no drift logging)")
    parser.add_argument("--drift-max-new-tokens", type=int, default=128)
    add_tracking_argument(parser)


def drift_reference(init: str, tokenizer, prompts_path: Path | None, n_prompts: int, prompt_template: str,
                    max_new_tokens: int, dtype: str = "float32", chat_template_kwargs: dict | None = None):
    """A frozen copy of pi_ref and a held-out batch (one pi_ref sample per
    prompt, temperature 1) on which `drift_kl` is measured during training;
    (None, None) without prompts or when ``n_prompts`` is 0."""
    if not prompts_path or not n_prompts:
        return None, None
    from lightning_opd.artifacts import TASK_SCHEMA, read_table
    from lightning_opd.sampling import sample_with
    from lightning_opd.hparams import SamplingParams
    from lightning_opd.modeling import load_model, prompt_ids, stop_token_ids
    from lightning_opd.training import PadCollator

    reference = load_model(init, dtype=dtype).eval()  # on this process's device to sample; sharded later under FSDP
    problems = read_table(prompts_path, TASK_SCHEMA)[0].column("problem").to_pylist()[:n_prompts]
    prompts = [prompt_ids(tokenizer, p, prompt_template, chat_template_kwargs) for p in problems]
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=max_new_tokens, seed=0, batch_size=len(prompts))
    samples = sample_with(reference, prompts, params, stop_token_ids(reference, tokenizer), tokenizer.pad_token_id,
                          progress=False)
    batch = PadCollator(tokenizer.pad_token_id)([supervised_example(p, s[0].response_ids) for p, s in zip(prompts, samples)])
    return reference, batch
