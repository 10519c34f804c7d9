"""Stage 2a: train a byte-level BPE tokenizer on the task text, with Qwen's
pre-tokenisation (digits one by one) and a Qwen-style chat template, and save
it as a transformers tokenizer directory."""
from __future__ import annotations

import argparse
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lightning_opd.artifacts import TASK_SCHEMA, atomic_path, read_table
from lightning_opd.hparams import TaskParams
from lightning_opd.task import arithmetic_facts

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# The split pattern of Qwen2/Qwen3 tokenizers.
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen3's turns, and its switch of thinking mode: `enable_thinking=False`
# opens the answer with an empty thinking block (as Qwen3's template does).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{% endif %}"
)


def training_corpus(task_files: list[Path]) -> list[str]:
    texts: list[str] = []
    for path in task_files:
        table, meta = read_table(path, TASK_SCHEMA)
        for column in ("problem", "solution", "solution_words"):
            texts.extend(table.column(column).to_pylist())
    params = TaskParams(**{k: v for k, v in meta.get("params", {}).items()})
    texts.extend(arithmetic_facts(params))
    texts.extend(["user\n", "assistant\n", "system\n"])  # the chat template's role names
    return texts


def build(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE, padding_side="left", clean_up_tokenization_spaces=False,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task-files", type=Path, nargs="+", required=True)
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--out", type=Path, required=True, help="tokenizer directory to write")
    args = parser.parse_args(argv)
    tokenizer = build(training_corpus(args.task_files), args.vocab_size)
    with atomic_path(args.out, is_dir=True) as tmp:
        tokenizer.save_pretrained(tmp)
    print(f"tokenizer with {len(tokenizer)} tokens -> {args.out}")


if __name__ == "__main__":
    main()
