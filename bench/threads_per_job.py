"""Cores per job for the embedded default: is one job on 2 threads faster than
two jobs on 1 thread each?

Times the work the default's jobs do, on the default's model shapes (read
from config/config.yaml) with random weights: a pretraining step of the
teacher (batch 32 x 48 tokens), sampling 256 prompts to 48 new tokens with the
student (transformers `generate`, as the hf backend), and scoring 512
sequences of 64 tokens with the teacher. Each setting runs in fresh processes:
one process on 2 threads, one on 1 thread, and two processes on 1 thread at
once (what `--cores 2` does with jobs of 1 core). Throughput is work units
per second over the processes. The last column says whether 1 and 2 threads
give the same result bit for bit (the weights after the training steps, the
sampled tokens, the log-probs): where they do, a job's thread count changes
its speed and nothing else.

    python bench/threads_per_job.py
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

CONFIG = Path(__file__).resolve().parents[1] / "config" / "config.yaml"


def arch(role: str) -> dict:
    config = yaml.safe_load(CONFIG.read_text())
    build = config["teachers"]["A"]["build"] if role == "teacher" else config["student_base"]["build"]
    return {**build["arch"], "vocab_size": config["tokenizer"]["build"]["vocab_size"]}


def digest(tensors) -> str:
    return hashlib.sha256(b"".join(t.detach().contiguous().numpy().tobytes() for t in tensors)).hexdigest()


def work(kind: str, threads: int, repeats: int) -> tuple[float, str]:
    """Seconds per unit of ``kind`` on ``threads`` threads (after one warm-up
    unit), and a digest of the result: the weights after the training steps,
    or the last unit's sampled tokens or log-probs."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen3Config(**arch("student" if kind == "sample" else "teacher")))
    vocab = model.config.vocab_size
    if kind == "train":
        optimiser = torch.optim.AdamW(model.parameters(), 1e-3)
        ids = torch.randint(0, vocab, (32, 48))

        def unit():
            model(input_ids=ids, labels=ids).loss.backward()
            optimiser.step()
            optimiser.zero_grad()
            return list(model.parameters())
    elif kind == "sample":
        model.eval()
        ids = torch.randint(0, vocab, (256, 12))

        def unit():
            with torch.no_grad():
                return [model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=48,
                                       min_new_tokens=48, pad_token_id=0)]
    else:
        model.eval()
        ids = torch.randint(0, vocab, (512, 64))

        def unit():
            with torch.inference_mode():
                return [model(input_ids=chunk).logits.log_softmax(-1) for chunk in ids.split(64)]
    unit()
    start = time.perf_counter()
    for _ in range(repeats):
        result = unit()
    return (time.perf_counter() - start) / repeats, digest(result)


def run(kind: str, threads: int, processes: int, repeats: int) -> tuple[float, set[str]]:
    """Units per second of ``processes`` concurrent fresh processes on
    ``threads`` threads each, and the digests of their results."""
    command = [sys.executable, __file__, "--worker", kind, str(threads), str(repeats)]
    children = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    results = [json.loads(child.communicate()[0]) for child in children]
    return sum(1 / r["seconds"] for r in results), {r["digest"] for r in results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, threads, repeats = args.worker
        seconds, result = work(kind, int(threads), int(repeats))
        print(json.dumps({"seconds": seconds, "digest": result}))
        return
    print("| work (unit) | 1 job x 2 threads (units/s) | 1 job x 1 thread | 2 jobs x 1 thread at once "
          "| 2 jobs x 1 / 1 job x 2 | same result on 1 and 2 threads |")
    print("|---|--:|--:|--:|--:|:--|")
    units = {"train": "teacher step, 32 x 48 tokens", "sample": "student, 256 x 48 new tokens",
             "score": "teacher, 512 x 64 tokens"}
    for kind, unit in units.items():
        two_threads, on_two = run(kind, 2, 1, args.repeats)
        one_thread, on_one = run(kind, 1, 1, args.repeats)
        two_jobs, _ = run(kind, 1, 2, args.repeats)
        same = "yes, bit for bit" if on_one == on_two else "no"
        print(f"| {kind} ({unit}) | {two_threads:.2f} | {one_thread:.2f} | {two_jobs:.2f} "
              f"| {two_jobs / two_threads:.2f} | {same} |", flush=True)


if __name__ == "__main__":
    main()
