"""Peak memory of the log-prob path per token: teacher scoring (the
teacher_cache stage's `hf` backend `score`) and one Lightning OPD training
step (`response_logprobs` + `opd_loss` + backward on a packed micro-batch,
gradient checkpointing on, as the paper configs), before (the whole
[tokens x vocab] logits at once, as the project computed them until the
chunked `lightning_opd.logprobs`) and after.

The model is a random tiny Qwen3 whose output layer has Qwen3's real width
(151,936; hidden 64, 2 layers, tied embeddings, fp32, 39 MB of weights), so
that nearly all the memory beyond the Python process and the model is the
log-prob path. Each setting runs in a fresh subprocess; its peak RSS
(getrusage ru_maxrss) is reported, with the RSS once the model and batch are
set up, and the difference per token.

    python bench/logprob_memory.py                      # all settings
    python bench/logprob_memory.py --tokens 4096 --paths after
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from lightning_opd.backends.hf import HFBackend
from lightning_opd.logprobs import response_logprobs
from lightning_opd.opd_loss import opd_loss
from lightning_opd.training import IGNORE_INDEX, PackCollator, supervised_example

QWEN3_VOCAB = 151_936
PROMPT_TOKENS = 64
SEQUENCES = 2  # the tokens of a setting: 2 sequences of tokens / 2 each


def tiny_qwen3():
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=QWEN3_VOCAB, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=8192,
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=None, eos_token_id=1)
    return AutoModelForCausalLM.from_config(config)


def sequences(tokens: int) -> tuple[list[list[int]], list[list[int]]]:
    generator = torch.Generator().manual_seed(0)
    ids = [torch.randint(2, QWEN3_VOCAB, (tokens // SEQUENCES,), generator=generator).tolist()
           for _ in range(SEQUENCES)]
    return [s[:PROMPT_TOKENS] for s in ids], [s[PROMPT_TOKENS:] for s in ids]


# ---- before: the full-logits code the project ran until `lightning_opd.logprobs`
def full_logits_token_logprobs(logits, targets, temperature=1.0):
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def full_logits_response_logprobs(model, batch):
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    logits = model(**inputs, use_cache=False).logits[:, :-1]
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    return full_logits_token_logprobs(logits, batch["input_ids"][:, 1:]), mask


@torch.no_grad()
def full_logits_score(model, prompts, responses, temperature=1.0):
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    input_ids = torch.zeros((len(prompts), width), dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, (p, r) in enumerate(zip(prompts, responses)):
        input_ids[row, :len(p) + len(r)] = torch.tensor(p + r)
        attention[row, :len(p) + len(r)] = 1
    logits = model(input_ids=input_ids, attention_mask=attention).logits
    logprobs = full_logits_token_logprobs(logits[:, :-1], input_ids[:, 1:], temperature)
    return [logprobs[row, len(p) - 1:len(p) - 1 + len(r)].numpy() for row, (p, r) in enumerate(zip(prompts, responses))]


def hf_backend(model) -> HFBackend:
    """The `hf` backend around a model built here (it has no tokenizer to load)."""
    backend = HFBackend.__new__(HFBackend)
    backend.model, backend.device, backend.batch_size, backend.pad_id = model.eval(), model.device, SEQUENCES, 0
    return backend


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_child(mode: str, path: str, tokens: int) -> dict:
    model = tiny_qwen3()
    prompts, responses = sequences(tokens)
    if mode == "score":
        backend = hf_backend(model)
        work = (lambda: backend.score(prompts, responses)) if path == "after" else \
            (lambda: full_logits_score(model, prompts, responses))
    else:
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
        model.train()
        batch = PackCollator()([supervised_example(p, r) for p, r in zip(prompts, responses)])
        batch.pop("use_cache")
        teacher = -torch.rand(batch["input_ids"].shape[0], batch["input_ids"].shape[1] - 1)
        logprobs_of = response_logprobs if path == "after" else full_logits_response_logprobs

        def work():
            student, mask = logprobs_of(model, batch)
            loss, _ = opd_loss(student, teacher, mask)
            loss.backward()
    setup = rss_mb()
    work()
    return {"mode": mode, "path": path, "tokens": tokens, "setup_mb": setup, "peak_mb": rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=["score", "train"], choices=["score", "train"])
    parser.add_argument("--paths", nargs="+", default=["before", "after"], choices=["before", "after"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[1024, 2048, 4096])
    parser.add_argument("--child", nargs=3, metavar=("MODE", "PATH", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args.child[0], args.child[1], int(args.child[2]))))
        return
    print(f"tiny Qwen3, vocab {QWEN3_VOCAB:,}, hidden 64, 2 layers, fp32; {SEQUENCES} sequences per pass; "
          "peak RSS of a fresh process per setting")
    print("| setting | path | tokens | peak RSS (MB) | after setup (MB) | (peak - setup) / token (KB) | "
          "peak vs half the tokens |")
    print("|---|---|---|---|---|---|---|")
    for mode in args.modes:
        for path in args.paths:
            previous = None
            for tokens in args.tokens:
                result = subprocess.run([sys.executable, __file__, "--child", mode, path, str(tokens)],
                                        capture_output=True, text=True)
                if result.returncode:
                    raise SystemExit(result.stderr[-2000:])
                r = json.loads(result.stdout.strip().splitlines()[-1])
                growth = f"+{100 * (r['peak_mb'] / previous['peak_mb'] - 1):.0f}%" \
                    if previous and previous["tokens"] * 2 == tokens else ""
                name = "teacher scoring (hf score)" if mode == "score" else "training step (loss + backward)"
                print(f"| {name} | {path} | {tokens:,} | {r['peak_mb']:,.0f} | {r['setup_mb']:,.0f} | "
                      f"{1024 * (r['peak_mb'] - r['setup_mb']) / tokens:,.0f} | {growth} |", flush=True)
                previous = r


if __name__ == "__main__":
    main()
