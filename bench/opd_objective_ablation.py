"""Is it the offline data or the sampled-token estimator? Trains pi_ref of a
finished experiment for the same steps on the same cached rollouts with
(a) the Lightning OPD loss (one sampled token, cached teacher log-prob) and
(b) the exact per-token reverse KL over the whole vocabulary at the same
positions (needs the live teacher), then prints avg@k of both next to pi_ref.

    python bench/opd_objective_ablation.py results/default --lr 1e-5 --epochs 2
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch
from math_verify import parse, verify

from lightning_opd.artifacts import TASK_SCHEMA, read_cache, read_table
from lightning_opd.hparams import SamplingParams
from lightning_opd.logprobs import response_logprobs
from lightning_opd.modeling import load_model, load_tokenizer, prompt_ids, stop_token_ids
from lightning_opd.opd_loss import opd_loss
from lightning_opd.opd_trainer import opd_example
from lightning_opd.sampling import sample_with
from lightning_opd.training import PadCollator


def avg_at_k(model, tokenizer, problems, answers, k: int) -> float:
    prompts = [prompt_ids(tokenizer, p) for p in problems]
    params = SamplingParams(temperature=0.6, top_p=0.95, max_new_tokens=128, n=k, seed=0, batch_size=512)
    outs = sample_with(model.eval(), prompts, params, stop_token_ids(model, tokenizer), tokenizer.pad_token_id,
                       progress=False)
    right = [bool(verify(parse(f"${a}$"), parse(tokenizer.decode(s.response_ids, skip_special_tokens=True))))
             for a, samples in zip(answers, outs) for s in samples]
    return sum(right) / len(right)


def train(objective: str, args, rows, teacher) -> torch.nn.Module:
    student = load_model(args.experiment / "models/sft-A")
    pad = PadCollator(load_tokenizer(args.experiment / "models/sft-A").pad_token_id)
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.1)
    rng = random.Random(0)
    for _ in range(args.epochs):
        order = rows[:]
        rng.shuffle(order)
        for start in range(0, len(order), args.batch_size):
            batch = pad([opd_example(r["prompt_ids"], r["response_ids"], r["teacher_logprobs"])
                         for r in order[start:start + args.batch_size]])
            if objective == "sampled":
                lp, mask = response_logprobs(student, batch)
                loss = opd_loss(lp, batch["teacher_logprobs"][:, 1:], mask, args.tau)[0]
            else:
                inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
                mask = (batch["labels"][:, 1:] != -100).float()
                with torch.no_grad():
                    t = torch.log_softmax(teacher(**inputs).logits[:, :-1].float(), -1)
                s = torch.log_softmax(student(**inputs).logits[:, :-1].float(), -1)
                loss = ((s.exp() * (s - t)).sum(-1) * mask).sum() / mask.sum()
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
    return student


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", type=Path)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--tau", type=float, default=1.0)
    parser.add_argument("--k", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = read_cache(args.experiment / "cache/sft-A_teacher-A.parquet")[0].to_pylist()
    tasks = read_table(args.experiment / "data/eval.parquet", TASK_SCHEMA)[0]
    problems, answers = tasks.column("problem").to_pylist(), tasks.column("answer").to_pylist()
    tokenizer = load_tokenizer(args.experiment / "models/sft-A")
    teacher = load_model(args.experiment / "models/teacher-A").eval()
    print(f"{len(rows)} cached rollouts, lr {args.lr}, {args.epochs} epochs of batch {args.batch_size}, tau {args.tau}")
    print(f"{'pi_ref':<33}avg@{args.k} = "
          f"{avg_at_k(load_model(args.experiment / 'models/sft-A'), tokenizer, problems, answers, args.k):.4f}")
    for objective in ("sampled", "exact"):
        model = train(objective, args, rows, teacher)
        name = "Lightning OPD loss (sampled)" if objective == "sampled" else "exact reverse KL (live teacher)"
        print(f"{name:<33}avg@{args.k} = {avg_at_k(model, tokenizer, problems, answers, args.k):.4f}")


if __name__ == "__main__":
    main()
