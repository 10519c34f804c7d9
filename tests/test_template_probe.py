"""SFT refuses SFT data whose prompts the student's chat template renders
differently from the teacher's: pi_ref would learn one prompt format and then
sample its rollouts in another."""
from __future__ import annotations

import json
import shutil

import pytest

from lightning_opd import sft
from lightning_opd.artifacts import ArtifactError
from lightning_opd.modeling import load_tokenizer


def test_sft_refuses_a_student_whose_chat_template_differs(world, tmp_path):
    student = tmp_path / "student"
    shutil.copytree(world["student_base"], student)
    tokenizer = load_tokenizer(student)
    tokenizer.chat_template = "{{ 'You are a student.\\n' }}" + tokenizer.chat_template
    tokenizer.save_pretrained(student)
    with pytest.raises(ArtifactError) as error:
        sft.main(["--base", str(student), "--sft-data", str(world["root"] / "sft_data-A.parquet"),
                  "--train", json.dumps({"max_steps": 1, "batch_size": 8}), "--keep-unfinished",
                  "--out", str(tmp_path / "out"), "--checkpoint-root", str(tmp_path / "ckpt")])
    message = str(error.value)
    assert str(world["teacher_A"]) in message and str(student) in message
    assert "first difference at token 0" in message and "You are a student" in message
    assert not (tmp_path / "out").exists() and not (tmp_path / "ckpt").exists()
