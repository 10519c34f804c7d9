"""Where each OPD method takes the student: the exact reverse KL to the teacher on the student's own
samples, against the same KL on pi_ref's cached rollouts (the only sequences Lightning OPD trains on).

The OPD objective is the per-token reverse KL(pi_theta || pi_T) on pi_theta's own samples. Lightning
OPD estimates it on pi_ref's fixed rollouts. For each trained model this prints the exact per-token
KL (summed over the whole vocabulary, teacher loaded) at the positions of

- ``own``: the model's own samples (temperature 1) of the held-out evaluation problems, the objective;
- ``cached``: pi_ref's cached rollouts of the first OPD prompts, what the cache lets Lightning OPD see.

Run after `snakemake` (models are names under results/<experiment>/models/):

    python bench/on_policy_kl.py results/default sft-A standard-sft-A_teacher-A_seed-0 \\
        lightning-sft-A_teacher-A_seed-0 lightning-topk16-sft-A_teacher-A_seed-0
"""
from __future__ import annotations

import argparse
from pathlib import Path

from lightning_opd.artifacts import TASK_SCHEMA, read_cache, read_table
from lightning_opd.hparams import SamplingParams
from lightning_opd.logprobs import drift_kl_sum
from lightning_opd.modeling import load_model, load_tokenizer, prompt_ids, stop_token_ids
from lightning_opd.sampling import sample_with
from lightning_opd.training import PadCollator, supervised_example


def reverse_kl_per_token(student, teacher, examples: list[dict], collate: PadCollator, rows: int = 64) -> float:
    """Mean over response tokens of KL(student || teacher), each summed over the vocabulary."""
    sums = [drift_kl_sum(student, teacher, collate(examples[i:i + rows])) for i in range(0, len(examples), rows)]
    return sum(kl for kl, _ in sums) / sum(count for _, count in sums)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", type=Path, help="results/<experiment>")
    parser.add_argument("models", nargs="+", help="model names under <experiment>/models/")
    parser.add_argument("--teacher", default="teacher-A")
    parser.add_argument("--cache", default="sft-A_teacher-A", help="cache name under <experiment>/cache/")
    parser.add_argument("--n", type=int, default=512, help="cached rollouts, and samples of the eval problems")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()
    if args.n < 1 or args.max_new_tokens < 1:
        parser.error("--n and --max-new-tokens must be at least 1")
    models = args.experiment / "models"
    tokenizer = load_tokenizer(models / args.teacher)
    collate = PadCollator(tokenizer.pad_token_id)
    teacher = load_model(models / args.teacher).eval()
    cache = read_cache(args.experiment / "cache" / f"{args.cache}.parquet")[0].slice(0, args.n)
    cached = [supervised_example(p, r) for p, r in zip(cache.column("prompt_ids").to_pylist(),
                                                        cache.column("response_ids").to_pylist())]
    problems = read_table(args.experiment / "data" / "eval.parquet", TASK_SCHEMA)[0].column("problem").to_pylist()
    prompts = [prompt_ids(tokenizer, problems[i % len(problems)]) for i in range(args.n)]
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens, seed=0, batch_size=256)
    print(f"{'model':<48} {'own samples':>12} {'cached':>8}  (KL(model || teacher), nats per response token)")
    for name in args.models:
        model = load_model(models / name).eval()
        samples = sample_with(model, prompts, params, stop_token_ids(model, tokenizer), tokenizer.pad_token_id,
                              progress=False)
        own = [supervised_example(p, s[0].response_ids) for p, s in zip(prompts, samples)]
        print(f"{name:<48} {reverse_kl_per_token(model, teacher, own, collate):>12.4f} "
              f"{reverse_kl_per_token(model, teacher, cached, collate):>8.4f}", flush=True)


if __name__ == "__main__":
    main()
