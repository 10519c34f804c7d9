"""Loading models and tokenizers (hub id or local path alike), prompt
formatting through the chat template, and the tiny Qwen3 config."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase, Qwen3Config

from lightning_opd.hparams import ArchParams
from lightning_opd.hub import ModelLoadError, local_source, split_revision

DEFAULT_PROMPT_TEMPLATE = "{problem}"


def pick_device(device: str | None = None) -> torch.device:
    """``device``, else this process's GPU (torchrun's LOCAL_RANK), else the CPU."""
    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    repo, revision = split_revision(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(repo, revision=revision, **local_source(repo))
    if tokenizer.chat_template is None:
        raise ValueError(f"{name_or_path}: the tokenizer has no chat template")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path: str | Path, dtype: str = "float32", device: str | None = None):
    repo, revision = split_revision(name_or_path)
    source = local_source(repo)
    try:
        model = AutoModelForCausalLM.from_pretrained(repo, revision=revision, dtype=getattr(torch, dtype), **source)
    except Exception as error:
        if not source:
            raise
        weights = sorted(p.name for p in Path(name_or_path).glob("*") if p.suffix in (".safetensors", ".bin"))
        raise ModelLoadError(f"{name_or_path}: cannot load the model (weights {weights or 'missing'}): {error}. "
                             "The directory is incomplete or a weights file is corrupt or truncated: rebuild it "
                             "(delete the directory and rerun the stage that writes it) or copy it again") from error
    return model.to(pick_device(device))


def model_config(name_or_path: str | Path):
    """The model's config, from a local directory or a hub id pinned or not (``org/name@revision``)."""
    repo, revision = split_revision(name_or_path)
    return AutoConfig.from_pretrained(repo, revision=revision, **local_source(repo))


def context_length(name_or_path: str | Path) -> int | None:
    """The longest sequence the model was built for (max_position_embeddings)."""
    return getattr(model_config(name_or_path), "max_position_embeddings", None)


def vocab_size(name_or_path: str | Path) -> int:
    """Width of the model's output layer (config vocab_size; may exceed the tokenizer's length)."""
    return model_config(name_or_path).vocab_size


def check_context(name_or_path: str | Path, lengths: dict[str, int], source: Path | str, advice: str) -> None:
    """Refuse sequences (id -> length in tokens) longer than the model's
    context: past it the positions are untrained and the output is garbage."""
    limit = context_length(name_or_path)
    over = {key: n for key, n in lengths.items() if limit and n > limit}
    if over:
        worst = max(over, key=over.get)
        raise ValueError(f"{source}: {len(over)} sequence(s) longer than the context of {name_or_path} "
                         f"({limit} tokens, max_position_embeddings), e.g. {worst!r} with {over[worst]} tokens; "
                         f"{advice}")


def stop_token_ids(model, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Ids that end a response: the tokenizer's eos and the model's generation eos ids."""
    eos = model.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    return {i for i in (tokenizer.eos_token_id, *eos) if i is not None}


def fill_template(template: str, problem: str) -> str:
    """``template`` with ``{problem}`` replaced; other braces (``\\boxed{}``) stay as written."""
    if "{problem}" not in template:
        raise ValueError(f"prompt template {template!r} has no {{problem}} placeholder (prompt_template in the "
                         "config): write {problem} where the problem text goes")
    return template.replace("{problem}", problem)


def prompt_ids(tokenizer: PreTrainedTokenizerBase, problem: str, template: str = DEFAULT_PROMPT_TEMPLATE,
               chat_template_kwargs: dict[str, Any] | None = None) -> list[int]:
    """Token ids of a user turn holding the problem, ending where the assistant
    answers; ``chat_template_kwargs`` go to the template (e.g. Qwen3's
    ``enable_thinking``). Every stage that renders a prompt comes here."""
    messages = [{"role": "user", "content": fill_template(template, problem)}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                         **(chat_template_kwargs or {}))
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def add_chat_template_argument(parser) -> None:
    """``--chat-template-kwargs``: the one argument of every module that renders prompts."""
    parser.add_argument("--chat-template-kwargs", type=json_object, default={},
                        help="JSON object of extra chat template arguments, e.g. {\"enable_thinking\": false}")


def json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {type(value).__name__}")
    return value


def tiny_qwen3_config(arch: ArchParams, tokenizer: PreTrainedTokenizerBase) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads,
        head_dim=arch.head_dim,
        max_position_embeddings=arch.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
