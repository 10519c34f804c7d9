"""Run in a subprocess by test_plan.py: one Lightning OPD optimiser step on
CPU through the project's trainer (OPDTrainer, training_arguments, the packed
collator) on a random Qwen3 of the shape given as JSON, then print the
process's peak RSS in GB."""
from __future__ import annotations

import json
import resource
import sys
import tempfile

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, Qwen3Config

from lightning_opd.hparams import OPDParams
from lightning_opd.opd_trainer import OPDTrainer, opd_example
from lightning_opd.training import collator, training_arguments


def main(shape_json: str, train_json: str, prompt_tokens: int, response_tokens: int) -> None:
    shape, train = json.loads(shape_json), json.loads(train_json)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen3Config(**shape, tie_word_embeddings=True))
    vocab = shape["vocab_size"]
    rows = [
        opd_example(
            torch.randint(vocab, (prompt_tokens,)).tolist(),
            torch.randint(vocab, (response_tokens,)).tolist(),
            (-torch.rand(response_tokens) * 5).tolist(),
        )
        for _ in range(train["batch_size"])
    ]
    params = OPDParams(**train)
    with tempfile.TemporaryDirectory() as out:
        trainer = OPDTrainer(
            model=model,
            tau=None,
            args=training_arguments(params, out),
            train_dataset=Dataset.from_list(rows),
            data_collator=collator(params, 0),
        )
        trainer.train()
    print(json.dumps({"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
