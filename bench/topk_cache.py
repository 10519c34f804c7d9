"""The top-k teacher cache on a finished experiment's cached rollouts:
(1) its size (bytes per response token of the parquet file and of the
stored values) for k = 0 and the largest k; (2) the error that float16 or
bfloat16 storage of the teacher's top-k log-probs adds to the top-k losses
of pi_ref (against float32); (3) pi_ref trained on the same rollouts for the
same steps with the paper's sampled-token loss, the top-k reverse KL at each
k, the top-k forward KL at the largest k and the exact full-vocabulary
reverse KL (live teacher), avg@k of each next to pi_ref.

    nice -n 10 python bench/topk_cache.py results/default --ks 4 16 --lrs 3e-5 1e-4 --epochs 10
"""
from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from opd_objective_ablation import avg_at_k  # bench/ is on the path when this script runs

from lightning_opd.artifacts import TASK_SCHEMA, read_cache, read_table
from lightning_opd.backends.hf import HFBackend
from lightning_opd.logprobs import response_logprobs, response_support_logprobs
from lightning_opd.modeling import load_model, load_tokenizer
from lightning_opd.opd_loss import opd_loss, topk_kl_loss
from lightning_opd.opd_trainer import opd_example
from lightning_opd.teacher_cache import build_cache
from lightning_opd.training import PadCollator


def bytes_per_token(path: Path) -> tuple[float, float]:
    """(parquet file bytes, uncompressed bytes of the per-token columns) per response token."""
    table = pq.read_table(path)
    tokens = sum(map(len, table.column("response_ids").to_pylist()))
    per_token = [c for c in table.column_names if c in ("response_ids", "teacher_logprobs", "teacher_topk_ids",
                                                          "teacher_topk_logprobs")]
    values = sum(table.column(c).combine_chunks().flatten().nbytes for c in per_token)
    return path.stat().st_size / tokens, values / tokens


def rows_of(cache: Path, k: int) -> list[dict]:
    rows = read_cache(cache)[0].to_pylist()
    for r in rows:
        stored = len(r["teacher_topk_ids"]) // max(1, len(r["response_ids"]))
        r["top_ids"] = np.asarray(r["teacher_topk_ids"]).reshape(-1, stored)[:, :k].tolist()
        r["top_logprobs"] = np.asarray(r["teacher_topk_logprobs"], np.float32).reshape(-1, stored)[:, :k].tolist()
    return rows


def batch_of(rows: list[dict], pad: PadCollator) -> dict[str, torch.Tensor]:
    return pad([opd_example(r["prompt_ids"], r["response_ids"], r["teacher_logprobs"], r.get("top_ids"),
                            r.get("top_logprobs")) for r in rows])


def storage_error(experiment: Path, rollouts_rows: list[dict], k: int, pad: PadCollator) -> None:
    """Loss of pi_ref with the teacher's top-k log-probs in float32 (scored afresh) against the same rounded."""
    teacher = HFBackend(str(experiment / "models/teacher-A"))
    scored = teacher.score_top_k([r["prompt_ids"] for r in rollouts_rows], [r["response_ids"] for r in rollouts_rows],
                                 k)
    student = load_model(experiment / "models/sft-A").eval()
    rows = [{**r, "top_ids": s.ids.tolist(), "top_logprobs": s.top_logprobs.tolist()}
            for r, s in zip(rollouts_rows, scored)]
    batch = batch_of(rows, pad)
    with torch.no_grad():
        _, rest, support, mask = response_support_logprobs(student, batch, batch["teacher_topk_ids"][:, 1:])
    exact = batch["teacher_topk_logprobs"][:, 1:]
    for direction in ("reverse", "forward"):
        reference = topk_kl_loss(support, rest, exact, mask, direction)[0].item()
        for dtype in (torch.float16, torch.bfloat16):
            rounded = exact.to(dtype).float()
            value = topk_kl_loss(support, rest, rounded, mask, direction)[0].item()
            worst = (rounded - exact)[mask].abs().max().item()
            print(f"  top-{k} {direction} KL of pi_ref: float32 {reference:.6f}, {str(dtype)[6:]:>8} {value:.6f} "
                  f"(error {abs(value - reference):.2e}, {abs(value - reference) / reference:.1e} relative; "
                  f"largest log-prob error {worst:.1e})")


def train(objective: str, k: int, lr: float, args, rows, teacher, pad) -> torch.nn.Module:
    student = load_model(args.experiment / "models/sft-A")
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.1)
    rng = random.Random(0)
    for _ in range(args.epochs):
        order = rows[:]
        rng.shuffle(order)
        for start in range(0, len(order), args.batch_size):
            chunk = order[start:start + args.batch_size]
            if objective == "sampled":
                batch = batch_of([{**r, "top_ids": None} for r in chunk], pad)
                logprobs, mask = response_logprobs(student, batch)
                loss = opd_loss(logprobs, batch["teacher_logprobs"][:, 1:], mask, args.tau)[0]
            elif objective.startswith("topk"):
                batch = batch_of([{**r, "top_ids": [t[:k] for t in r["top_ids"]],
                                   "top_logprobs": [t[:k] for t in r["top_logprobs"]]} for r in chunk], pad)
                _, rest, support, mask = response_support_logprobs(student, batch, batch["teacher_topk_ids"][:, 1:])
                direction = "reverse" if objective == "topk_reverse_kl" else "forward"
                loss = topk_kl_loss(support, rest, batch["teacher_topk_logprobs"][:, 1:], mask, direction)[0]
            else:  # the exact per-token reverse KL over the vocabulary, live teacher
                batch = batch_of([{**r, "top_ids": None} for r in chunk], pad)
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
    parser.add_argument("experiment", type=Path, help="a finished experiment's results directory")
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-5, 1e-4])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--tau", type=float, default=1.0)
    parser.add_argument("--eval-k", type=int, default=4)
    parser.add_argument("--work", type=Path, default=Path("/tmp/topk_cache_bench"))
    parser.add_argument("--skip-training", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    k_max = max(args.ks)
    plain = args.experiment / "cache/sft-A_teacher-A.parquet"
    cache = args.work / f"cache-top{k_max}.parquet"
    if not cache.is_file():
        start = time.time()
        build_cache(str(args.experiment / "models/teacher-A"), args.experiment / "rollouts/sft-A.parquet", cache,
                    label="A", top_k=k_max, work_dir=args.work / "shards")
        print(f"top-{k_max} cache built in {time.time() - start:.0f} s")
    for name, path in (("k = 0", plain), (f"k = {k_max}", cache)):
        on_disk, values = bytes_per_token(path)
        print(f"cache {name}: {on_disk:.1f} bytes per response token on disk (parquet, with prompts and text), "
              f"{values:.1f} bytes per token of per-token values (ids, log-probs)")
    tokenizer = load_tokenizer(args.experiment / "models/sft-A")
    pad = PadCollator(tokenizer.pad_token_id)
    rows = rows_of(cache, k_max)
    print(f"storage precision on {len(rows[:128])} rollouts:")
    storage_error(args.experiment, rows[:128], k_max, pad)
    if args.skip_training:
        return
    tasks = read_table(args.experiment / "data/eval.parquet", TASK_SCHEMA)[0]
    problems, answers = tasks.column("problem").to_pylist(), tasks.column("answer").to_pylist()
    teacher = load_model(args.experiment / "models/teacher-A").eval()
    steps = args.epochs * -(-len(rows) // args.batch_size)
    print(f"{len(rows)} cached rollouts, {args.epochs} epochs of batch {args.batch_size} ({steps} steps), "
          f"tau {args.tau} (sampled loss), avg@{args.eval_k} on {len(problems)} problems")
    pi_ref = avg_at_k(load_model(args.experiment / "models/sft-A"), tokenizer, problems, answers, args.eval_k)
    print(f"{'pi_ref':<36}{pi_ref:.4f}")
    runs = [("sampled", 0), *(("topk_reverse_kl", k) for k in args.ks), ("topk_forward_kl", k_max), ("exact", 0)]
    for lr in args.lrs:
        for objective, k in runs:
            start = time.time()
            model = train(objective, k, lr, args, rows, teacher, pad)
            accuracy = avg_at_k(model, tokenizer, problems, answers, args.eval_k)
            name = {"sampled": "sampled (paper)", "exact": "exact reverse KL (live teacher)"}.get(
                objective, f"{objective} k={k}")
            print(f"lr {lr:g}  {name:<36}{accuracy:.4f}   ({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
