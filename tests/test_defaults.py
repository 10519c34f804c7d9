"""Defaults come from one place: the dataclasses of `hparams` default to the
embedded config, config/config.yaml (one section each), and every other
section that feeds one of them is a valid override of it."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

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
