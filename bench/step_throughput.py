"""Tokens per second and model FLOPs utilisation of one OPD training step and
one teacher scoring pass, on a Qwen3-shaped model with random weights.

The step is the pipeline's own code path: `response_logprobs` + `opd_loss`,
backward, AdamW; the scoring pass is the `hf` backend's `next_token_logprobs`
(chunked forward of the output layer) under inference mode. FLOPs per token follow the usual
count: 2 x (matmul parameters, lm_head included) + 2 x layers x context x
attention width for the causal attention, forward; 3x that for a training
step. MFU = achieved FLOP/s over the device's peak (--peak-tflops; H100 SXM
dense bf16 = 989 by default on an H100).

    python bench/step_throughput.py --shape qwen3-0.6b --batch 8 --seq-len 2048   # a GPU
    python bench/step_throughput.py --shape tiny --batch 4 --seq-len 256 --dtype float32   # a CPU
    # the default's OPD step: 256 rows of its cache in passes of 32, as lightning_opd.micro_batch_size
    python bench/step_throughput.py --shape default-student --batch 256 --dtype float32 --micro-batch 32 \
        --cache results/default/cache/sft-A_teacher-A.parquet

With --micro-batch the step runs the batch in passes of that many rows and
divides the loss by the whole step's response tokens, as the pipeline's
trainer does (the same gradient). With --cache the rows are a cache's, each
pass padded to its own longest row as the pipeline pads them.
On a CPU the peak resident memory of the process is printed too (run one
--micro-batch per process to compare them).
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
import pyarrow.parquet as pq
import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from lightning_opd.logprobs import next_token_logprobs, response_logprobs
from lightning_opd.opd_loss import opd_loss
from lightning_opd.opd_trainer import opd_example
from lightning_opd.training import PadCollator

SHAPES = {
    # the embedded default's student (config/config.yaml student_base.build.arch, its 512-token tokenizer)
    "default-student": dict(hidden_size=96, intermediate_size=288, num_hidden_layers=3, num_attention_heads=3,
                            num_key_value_heads=1, head_dim=32, vocab_size=512),
    "tiny": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, vocab_size=32000),
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
}
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}  # dense bf16


def forward_flops_per_token(config: Qwen3Config, context: int) -> float:
    d, layers = config.hidden_size, config.num_hidden_layers
    q_width = config.num_attention_heads * config.head_dim
    kv_width = config.num_key_value_heads * config.head_dim
    per_layer = d * (q_width + 2 * kv_width) + q_width * d + 3 * d * config.intermediate_size
    matmul_params = layers * per_layer + d * config.vocab_size
    # QK^T and AV over, on average, half the context (causal)
    return 2 * matmul_params + 2 * layers * context * q_width


def timed(fn, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def cached_passes(cache: str, batch: int, micro: int, device: torch.device):
    """A step of ``batch`` rows drawn from a teacher cache, in passes of
    ``micro`` rows each padded to its own longest row (the pipeline's
    collator): real lengths, so the padding is what a step pays. Returns the
    passes (batch, teacher log-probs) and the step's real tokens."""
    table = pq.read_table(cache, columns=["prompt_ids", "response_ids", "teacher_logprobs"])
    rows = np.random.default_rng(0).choice(table.num_rows, batch, replace=False)
    examples = [opd_example(r["prompt_ids"], r["response_ids"], r["teacher_logprobs"])
                for r in table.take(rows).to_pylist()]
    passes = []
    for start in range(0, batch, micro):
        part = {k: v.to(device) for k, v in PadCollator(0)(examples[start:start + micro]).items()}
        passes.append(({k: part[k] for k in ("input_ids", "attention_mask", "labels")},
                       part["teacher_logprobs"][:, 1:]))
    return passes, sum(len(e["input_ids"]) for e in examples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="qwen3-0.6b")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--cache", help="draw the rows from this teacher cache (real lengths) instead of random ones")
    parser.add_argument("--prompt-len", type=int, default=256, help="tokens without loss at the start of each row")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--micro-batch", type=int, default=None, help="rows per forward pass (default: --batch)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak; default: known GPUs only")
    parser.add_argument("--out", help="also write the figures as JSON here")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    config = Qwen3Config(**SHAPES[args.shape], max_position_embeddings=max(4096, args.seq_len))
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.98), weight_decay=0.1)

    micro = args.micro_batch or args.batch
    if args.batch % micro:
        parser.error(f"--batch {args.batch} is not a multiple of --micro-batch {micro}")
    if args.cache:
        passes, tokens = cached_passes(args.cache, args.batch, micro, device)
    else:
        ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), device=device)
        labels = ids.clone()
        labels[:, :args.prompt_len] = -100
        teacher = -torch.rand(args.batch, args.seq_len - 1, device=device) * 3
        passes = [({"input_ids": ids[rows:rows + micro], "attention_mask": torch.ones_like(ids[rows:rows + micro]),
                    "labels": labels[rows:rows + micro]}, teacher[rows:rows + micro])
                  for rows in range(0, args.batch, micro)]
        tokens = args.batch * args.seq_len
    step_tokens = sum(int((part["labels"][:, 1:] != -100).sum()) for part, _ in passes)
    slots = sum(part["input_ids"].numel() for part, _ in passes)

    def opd_step() -> None:
        model.train()
        for part, teacher in passes:
            student, mask = response_logprobs(model, part)
            loss, _ = opd_loss(student, teacher, mask, tau=None, n_loss_tokens=step_tokens)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @torch.inference_mode()
    def scoring_pass() -> None:
        model.eval()
        for part, _ in passes:
            next_token_logprobs(model, part, part["labels"][:, 1:] != -100)

    per_token = forward_flops_per_token(config, tokens // args.batch)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    results = {"device": name, "shape": args.shape, "parameters": model.num_parameters(), "dtype": args.dtype,
               "batch": args.batch, "micro_batch": micro, "tokens": tokens, "padded_slots": slots,
               "cache": args.cache, "seq_len": None if args.cache else args.seq_len,
               "gradient_checkpointing": args.gradient_checkpointing}
    for label, fn, flops in (("opd_train_step", opd_step, 3 * per_token), ("scoring_pass", scoring_pass, per_token)):
        seconds = timed(fn, args.steps, args.warmup, device)
        achieved = flops * tokens / seconds / 1e12
        results[label] = {"seconds": seconds, "tokens_per_s": tokens / seconds, "tflops": achieved,
                          "mfu": achieved / peak if peak else None}
    if device.type == "cuda":
        results["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        results["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux

    print(f"{name}: {args.shape} ({results['parameters'] / 1e6:.2f}M parameters, {args.dtype}), "
          f"batch {args.batch} rows, {tokens} tokens ({slots} padded), {micro} rows a pass"
          + (f", peak RSS {results['peak_rss_gib']:.2f} GiB" if "peak_rss_gib" in results else ""))
    for label in ("opd_train_step", "scoring_pass"):
        r = results[label]
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a (no --peak-tflops)"
        print(f"  {label:15s} {r['seconds'] * 1e3:9.1f} ms  {r['tokens_per_s']:10.0f} tokens/s  "
              f"{r['tflops']:8.3f} TFLOP/s  MFU {mfu}")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
