"""Peak memory, tokens/s and MFU of Lightning OPD optimiser steps through the
pipeline's own trainer (OPDTrainer, training_arguments, the packed collator;
fp32 weights as `load_model` loads them, bf16 autocast, activation
checkpointing), on random Qwen3-shaped models, against the planner's
prediction for the same step (`lightning_opd.plan.training_memory`).

The training hyperparameters are a config's `lightning_opd` section (default:
config/paper/qwen3-4b-1gpu.yaml, the one-GPU config whose 4B student the
planner says fits an 80 GB GPU), with the batch cut to two accumulation passes
and three optimiser steps (Adam's moments exist from the first step; the peak
is reached in the later ones). Each row is a packed micro-batch of sequences
of --prompt-tokens + --response-tokens (the planner's 512 + the config's
max_response_tokens). Each setting runs in a fresh subprocess. On a GPU the
peak is torch's (allocated and reserved) plus the CUDA context; on the CPU,
the process's peak RSS. MFU counts model FLOPs (bench/step_throughput.py:
the output layer at every position, though the log-prob path runs it at
response positions only, ~1-3% high here) over the device's dense bf16 peak.

    python bench/train_peak_memory.py                                  # a GPU: 0.6B, 1.7B and 4B
    python bench/train_peak_memory.py --shapes tiny --response-tokens 448 --steps 2   # a CPU check

bench/measured/train_peak_memory_h100.jsonl holds an H100's figures, from
`--optims adamw_torch adamw_torch_fused` (torch's foreach default and the fused kernel).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from step_throughput import PEAK_TFLOPS, forward_flops_per_token  # bench/, the script's own folder

from lightning_opd.plan import GB, QWEN3_SHAPES, Shape, training_memory

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "tiny": Shape(vocab=151_936, hidden=256, layers=4, heads=4, kv_heads=2, head_dim=64, intermediate=768, tied=True),
    "qwen3-0.6b": QWEN3_SHAPES["Qwen/Qwen3-0.6B"],
    "qwen3-1.7b": QWEN3_SHAPES["Qwen/Qwen3-1.7B"],
    "qwen3-4b": QWEN3_SHAPES["Qwen/Qwen3-4B"],
}


def qwen3_config(shape: Shape, positions: int):
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                       num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
                       intermediate_size=shape.intermediate, tie_word_embeddings=shape.tied,
                       max_position_embeddings=positions)


def run_setting(shape_name: str, train: dict, prompt_tokens: int, response_tokens: int, out: str) -> dict:
    """In the subprocess: the steps (the trainer's output under ``out``, which the parent removes even if this
    process is killed), then the peak and the time of each optimiser step."""
    import torch
    import transformers
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback

    from lightning_opd.hparams import OPDParams
    from lightning_opd.opd_trainer import OPDTrainer, opd_example
    from lightning_opd.training import collator, training_arguments

    cuda = torch.cuda.is_available()
    shape = SHAPES[shape_name]
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):  # built where it trains: no fp32 copy of 4B weights on the host
        model = AutoModelForCausalLM.from_config(qwen3_config(shape, prompt_tokens + response_tokens),
                                                 dtype=torch.float32)
    context_gb = 0.0
    if cuda:
        free, total = torch.cuda.mem_get_info()
        context_gb = (total - free - torch.cuda.memory_reserved()) / GB  # the CUDA context and libraries
    generator = torch.Generator().manual_seed(0)
    rows = [opd_example(torch.randint(shape.vocab, (prompt_tokens,), generator=generator).tolist(),
                        torch.randint(shape.vocab, (response_tokens,), generator=generator).tolist(),
                        (-torch.rand(response_tokens, generator=generator) * 5).tolist())
            for _ in range(train["batch_size"])]

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.seconds, self.start = [], 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.seconds.append(time.perf_counter() - self.start)

    times = StepTimes()
    result = {"shape": shape_name, "device": torch.cuda.get_device_name() if cuda else "cpu",
              "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__}
    trainer = OPDTrainer(model=model, tau=None, args=training_arguments(OPDParams(**train), out),
                         train_dataset=Dataset.from_list(rows), data_collator=collator(OPDParams(**train), 0),
                         callbacks=[times])
    try:
        trainer.train()
    except torch.OutOfMemoryError as error:
        result["oom"] = str(error).splitlines()[0]
    result["step_seconds"] = times.seconds
    if cuda:
        free, total = torch.cuda.mem_get_info()
        context_gb = max(context_gb, (total - free - torch.cuda.memory_reserved()) / GB)  # kernels load lazily
        result.update(allocated_gb=torch.cuda.max_memory_allocated() / GB,
                      reserved_gb=torch.cuda.max_memory_reserved() / GB, context_gb=context_gb, device_gb=total / GB)
        result["measured_gb"] = result["reserved_gb"] + context_gb
    else:
        result["measured_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB
    return result


def read_config(configfile: Path) -> dict:
    try:
        config = yaml.safe_load(configfile.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        sys.exit(f"{configfile}: cannot read it as YAML: {error}")
    if not isinstance(config, dict) or not isinstance(config.get("lightning_opd"), dict):
        sys.exit(f"{configfile}: no lightning_opd section to take the training settings from")
    return config


def opd_train_params(config: dict, accumulation: int, steps: int) -> dict:
    train = config["lightning_opd"]
    from lightning_opd.hparams import OPDParams

    fields = set(OPDParams.__dataclass_fields__)
    train = {k: v for k, v in train.items() if k in fields and k not in ("tau", "loss", "top_k")}
    micro = train.get("micro_batch_size") or 1
    return {**train, "batch_size": micro * accumulation, "max_steps": steps, "save_steps": 10**6,
            "logging_steps": 1, "epochs": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=SHAPES, default=["qwen3-0.6b", "qwen3-1.7b", "qwen3-4b"])
    parser.add_argument("--configfile", type=Path, default=ROOT / "config/paper/qwen3-4b-1gpu.yaml")
    parser.add_argument("--prompt-tokens", type=int, default=512, help="the planner's prompt length")
    parser.add_argument("--response-tokens", type=int, default=None,
                        help="default: the config's teacher_cache.max_response_tokens")
    parser.add_argument("--accumulation", type=int, default=2, help="micro-batches per optimiser step")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--optims", nargs="+", default=None,
                        help="transformers optimizer names to run each shape with (default: the config's)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak; default: known GPUs only")
    parser.add_argument("--out", type=Path, help="also write each setting's figures here (JSON lines)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_setting(**json.loads(args.child))))
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # an exception, so that subprocess.run kills the setting
    if args.steps < 2 or args.accumulation < 1:
        parser.error("--steps must be at least 2 (the first allocates the optimiser state) and --accumulation >= 1")
    for flag in ("prompt_tokens", "response_tokens", "peak_tflops"):
        value = getattr(args, flag)
        if value is not None and not (math.isfinite(value) and value > 0):
            parser.error(f"--{flag.replace('_', '-')} must be a positive finite number, not {value}")
    from transformers.training_args import OptimizerNames

    unknown = sorted(set(args.optims or []) - {name.value for name in OptimizerNames})
    if unknown:
        parser.error(f"--optims: not transformers optimizer names: {unknown}")

    if not args.configfile.is_file():
        parser.error(f"--configfile {args.configfile}: no such file")
    config = read_config(args.configfile)
    train = opd_train_params(config, args.accumulation, args.steps)
    response = args.response_tokens or (config.get("teacher_cache") or {}).get("max_response_tokens") or 4096
    import torch

    if not torch.cuda.is_available():
        train["bf16"] = False  # transformers refuses bf16 training without a GPU
    seq = args.prompt_tokens + response
    print(f"{args.configfile.name} lightning_opd: micro-batch {train.get('micro_batch_size') or 1} x {seq} tokens "
          f"(packed: {train.get('packing', False)}), bf16 {train.get('bf16', False)}, checkpointing "
          f"{train.get('gradient_checkpointing', False)}, {args.accumulation} passes/step, {args.steps} steps")
    print(f"{'shape':11s} {'optim':17s} {'params':>7s} {'predicted':>9s} {'measured':>8s} {'alloc':>6s} "
          f"{'reserved':>8s} {'ratio':>5s} {'tokens/s':>9s} {'MFU':>6s} {'wall':>6s}  device")
    failed = 0
    for name, optim in ((n, o) for n in args.shapes for o in args.optims or [train.get("optim", "adamw_torch")]):
        train = {**train, "optim": optim}
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            child = json.dumps({"shape_name": name, "train": train, "prompt_tokens": args.prompt_tokens,
                                "response_tokens": response, "out": out})
            done = subprocess.run([sys.executable, __file__, "--child", child], capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{name} ({optim}): the setting failed (exit {done.returncode}):\n{done.stderr[-3000:]}",
                  file=sys.stderr)
            failed += 1
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        parts, _ = training_memory(SHAPES[name], train, seq, world=1, on_gpu=result["device"] != "cpu")
        result.update(predicted_gb=sum(parts.values()), parts=parts, params=SHAPES[name].params, optim=optim,
                      wall_s=time.perf_counter() - start, train=train, seq_tokens=seq,
                      shape_fields=dataclasses.asdict(SHAPES[name]))
        tokens = train["batch_size"] * seq
        if result["step_seconds"] and not result.get("oom"):
            seconds = min(result["step_seconds"][1:])  # the first step includes warm-up
            peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in result["device"]), None)
            tflops = 3 * forward_flops_per_token(qwen3_config(SHAPES[name], seq), seq) * tokens / seconds / 1e12
            result.update(tokens_per_s=tokens / seconds, tflops=tflops, mfu=tflops / peak if peak else None)
        print(table_row(result), flush=True)
        if args.out:
            with args.out.open("a") as handle:
                handle.write(json.dumps(result) + "\n")
    if failed:
        sys.exit(f"{failed} setting(s) failed")


def table_row(r: dict) -> str:
    nan = float("nan")
    mfu = f"{r['mfu']:6.1%}" if r.get("mfu") is not None else f"{'n/a':>6s}"
    oom = f"  OOM: {r['oom']}" if r.get("oom") else ""
    ratio = "    -" if oom else f"{r['predicted_gb'] / r['measured_gb']:5.2f}"  # a failed step's peak is no need
    return (f"{r['shape']:11s} {r['optim']:17s} {r['params'] / 1e9:6.2f}B {r['predicted_gb']:8.1f}G "
            f"{r['measured_gb']:7.1f}G {r.get('allocated_gb', nan):6.1f} {r.get('reserved_gb', nan):8.1f} "
            f"{ratio} {r.get('tokens_per_s', 0):9.0f} {mfu} {r['wall_s']:5.0f}s  "
            f"{r['device']}{oom}")


if __name__ == "__main__":
    main()
