"""How well does the sampled-token OPD gradient point along the exact one?

On a finished experiment, compares the gradient of the Lightning OPD loss
(one cached rollout token per position, advantage = teacher - student
log-prob) with the gradient of the exact per-token reverse KL
KL(pi_theta || pi_T) summed over the whole vocabulary at the same positions
(which needs the live teacher, so Lightning OPD cannot use it). Prints the
cosine between the two for growing numbers of rollouts, with and without
clipping. Run after `snakemake`:

    python bench/opd_gradient_noise.py results/default
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lightning_opd.artifacts import read_cache
from lightning_opd.logprobs import response_logprobs
from lightning_opd.modeling import load_model, load_tokenizer
from lightning_opd.opd_loss import opd_loss
from lightning_opd.opd_trainer import opd_example
from lightning_opd.training import PadCollator


def flat_grad(model, loss) -> torch.Tensor:
    model.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", type=Path, help="results/<experiment>")
    parser.add_argument("--sft-teacher", default="A")
    parser.add_argument("--opd-teacher", default="A")
    args = parser.parse_args()
    cache, _ = read_cache(args.experiment / f"cache/sft-{args.sft_teacher}_teacher-{args.opd_teacher}.parquet")
    student_dir = args.experiment / f"models/sft-{args.sft_teacher}"
    student = load_model(student_dir)
    teacher = load_model(args.experiment / f"models/teacher-{args.opd_teacher}").eval()
    pad = PadCollator(load_tokenizer(student_dir).pad_token_id)
    rows = cache.to_pylist()
    print(
        f"{'rollouts':>9} {'tokens':>8} {'cos(tau=none)':>14} {'cos(tau=1)':>11} {'|g_sampled|':>12} {'|g_exact|':>10}"
    )
    for n in (64, 256, len(rows)):
        batch = pad([opd_example(r["prompt_ids"], r["response_ids"], r["teacher_logprobs"]) for r in rows[:n]])
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        mask = (batch["labels"][:, 1:] != -100).float()
        with torch.no_grad():
            teacher_lp = torch.log_softmax(teacher(**inputs).logits[:, :-1].float(), -1)
        student_lp = torch.log_softmax(student(**inputs).logits[:, :-1].float(), -1)
        exact = flat_grad(student, ((student_lp.exp() * (student_lp - teacher_lp)).sum(-1) * mask).sum() / mask.sum())
        cosines, norm = [], 0.0
        for tau in (None, 1.0):
            sampled_lp, response_mask = response_logprobs(student, batch)
            grad = flat_grad(student, opd_loss(sampled_lp, batch["teacher_logprobs"][:, 1:], response_mask, tau)[0])
            cosines.append(torch.nn.functional.cosine_similarity(grad, exact, dim=0).item())
            norm = norm or grad.norm().item()
        print(
            f"{n:>9} {int(mask.sum()):>8} {cosines[0]:>14.3f} {cosines[1]:>11.3f} {norm:>12.3f} "
            f"{exact.norm().item():>10.3f}"
        )


if __name__ == "__main__":
    main()
