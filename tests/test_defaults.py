"""Defaults come from one place: the dataclasses of `hparams` and the command-line
options of the stage modules default to the embedded config, config/config.yaml
(one section each), and every other section that feeds a dataclass is a valid
override of it."""
from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

import pytest
import yaml

import lightning_opd
from lightning_opd.hparams import ArchParams, OPDParams, SamplingParams, TaskParams, TrainParams, from_dict

CONFIG = yaml.safe_load((Path(__file__).resolve().parents[1] / "config/config.yaml").read_text())

# the section whose values are a dataclass's defaults
DEFAULTS = {TaskParams: ("task",), ArchParams: ("teachers", "A", "build", "arch"),
            SamplingParams: ("sft_data", "sampling"), TrainParams: ("sft", "train"), OPDParams: ("lightning_opd",)}
# the other sections passed to a dataclass: overrides of those defaults
OVERRIDES = {ArchParams: [("student_base", "build", "arch")],
             TrainParams: [("teachers", "A", "build", "train"), ("student_base", "build", "train")],
             SamplingParams: [("rollouts", "sampling"), ("standard_opd", "sampling")]}


# keys of a section that the DAG reads and the module never sees
DAG_KEYS = {("lightning_opd",): {"rounds"}}


def section(path: tuple[str, ...]) -> dict:
    value = CONFIG
    for key in path:
        value = value[key]
    return {k: v for k, v in value.items() if k not in DAG_KEYS.get(path, ())}


@pytest.mark.parametrize("cls", DEFAULTS, ids=lambda cls: cls.__name__)
def test_dataclass_defaults_are_the_embedded_config(cls):
    path = DEFAULTS[cls]
    assert from_dict(cls, section(path), ".".join(path)) == cls(), \
        f"{cls.__name__} defaults differ from config/config.yaml's {'.'.join(path)}"


@pytest.mark.parametrize("cls, path", [(cls, p) for cls, paths in OVERRIDES.items() for p in paths],
                         ids=lambda x: x.__name__ if isinstance(x, type) else ".".join(x))
def test_other_sections_override_the_defaults(cls, path):
    from_dict(cls, section(path), ".".join(path))  # no unknown keys


# ---- the command-line defaults of the stage modules (`python -m lightning_opd.<module>`): each option
# that a config key feeds defaults to that key's value in config/config.yaml
def config_value(path: str):
    value = CONFIG
    for key in path.split("."):
        value = value[key]
    return value


def from_json(text: str):
    return json.loads(text)


def null_as_zero(value):  # the rules pass opd_drift.every_steps null as --drift-every 0
    return value or 0


def same(value):
    return value


# module -> {option (its dest): (config key, how the option's default reads, how the key's value reads)}
OPD_OUTPUT = {"drift_n": ("opd_drift.n_prompts", same, same),
              "drift_max_new_tokens": ("opd_drift.max_new_tokens", same, same),
              "drift_every": ("opd_drift.every_steps", same, null_as_zero)}
TEMPLATE = {"prompt_template": ("prompt_template", same, same),
            "chat_template_kwargs": ("chat_template_kwargs", same, same)}
CLI_DEFAULTS = {
    "build_tokenizer": {"vocab_size": ("tokenizer.build.vocab_size", same, same)},
    "pretrain": {"style": ("teachers.A.build.style", same, same)},
    "sft": {"keep_unfinished": ("sft.keep_unfinished", same, same)},
    "generate": {"backend": ("generation.backend", same, same),
                 "backend_options": ("generation.backend_options", from_json, same),
                 "shard_size": ("generation.shard_size", same, same),
                 "data_parallel": ("generation.data_parallel", same, same), **TEMPLATE},
    "teacher_cache": {"backend": ("teacher_cache.backend", same, same),
                      "backend_options": ("teacher_cache.backend_options", from_json, same),
                      "max_response_tokens": ("teacher_cache.max_response_tokens", same, same),
                      "temperature": ("teacher_cache.temperature", same, same),
                      "top_k": ("teacher_cache.top_k", same, same),
                      "shard_size": ("teacher_cache.shard_size", same, same),
                      "data_parallel": ("teacher_cache.data_parallel", same, same)},
    "lightning_opd": {**OPD_OUTPUT},
    "standard_opd": {"sampler": ("standard_opd.sampler", same, same),
                     "sampler_options": ("standard_opd.sampler_options", same, same),
                     "teacher_temperature": ("teacher_cache.temperature", same, same), **OPD_OUTPUT, **TEMPLATE},
    "evaluate": {**{key: (f"eval.{key}", same, same)
                    for key in ("k", "temperature", "top_p", "max_gen_toks", "backend", "batch_size", "seed")},
                 "backend_options": ("eval.backend_options", from_json, same),
                 "task_yaml": ("eval.tasks", lambda path: [path.stem], same),
                 "chat_template_kwargs": ("chat_template_kwargs", same, same)},
}
# options with a default that no config key feeds: names, parts, and the JSON of a dataclass's fields
# (whose defaults test_dataclass_defaults_are_the_embedded_config checks)
NOT_FROM_THE_CONFIG = {"label", "teacher_label", "round", "sampling", "opd", "arch", "train", "hparams", "tracking",
                       "split", "nproc_per_node", "nnodes", "gpus_per_node", "configfile", "base"}
STAGE_MODULES = sorted(path.stem for path in (Path(lightning_opd.__file__).parent).glob("*.py")
                       if "\ndef main(" in path.read_text())


class Built(Exception):
    pass


def cli_defaults(module: str) -> dict:
    """Option (dest) -> default of the parser that the module's main() builds (stopped at parse_args)."""
    def stop(parser, *args, **kwargs):
        raise Built(parser)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", stop)
        with pytest.raises(Built) as built:
            importlib.import_module(f"lightning_opd.{module}").main([])
    parser = built.value.args[0]
    return {action.dest: action.default for action in parser._actions if action.default is not argparse.SUPPRESS}


@pytest.mark.parametrize("module", STAGE_MODULES)
def test_command_line_defaults_are_the_embedded_config(module):
    defaults = cli_defaults(module)
    unmapped = sorted(dest for dest, default in defaults.items() if default is not None
                      and dest not in CLI_DEFAULTS.get(module, {}) and dest not in NOT_FROM_THE_CONFIG)
    assert not unmapped, f"lightning_opd.{module}: options {unmapped} have defaults; add them to CLI_DEFAULTS"
    differing = {}
    for dest, (key, read_default, read_value) in CLI_DEFAULTS.get(module, {}).items():
        got, want = read_default(defaults[dest]), read_value(config_value(key))
        if got != want or type(got) is not type(want):
            differing[f"--{dest.replace('_', '-')}"] = f"{got!r}, but config/config.yaml's {key} is {want!r}"
    assert not differing, f"lightning_opd.{module}: {differing}"
