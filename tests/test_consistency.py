"""Lightning OPD refuses a teacher-inconsistent cache unless the config asks
for it, refuses a cache that does not belong to the student, and leaves no
output behind when it refuses."""
import json

import pytest

from lightning_opd import lightning_opd
from lightning_opd.artifacts import ArtifactError
from lightning_opd.provenance import TeacherConsistencyError, read_model_provenance
from test_cache import rewrite

TWO_STEPS = {"max_steps": 2, "batch_size": 4, "save_steps": 100, "learning_rate": 1e-4}


def run(world, cache, out, **opd):
    lightning_opd.main(["--init", str(world["sft_A"]), "--cache", str(cache), "--opd", json.dumps({**TWO_STEPS, **opd}),
                        "--out", str(out), "--checkpoint-root", str(out.parent / "ckpt")])


def test_consistent_cache_trains(world, tmp_path):
    run(world, world["cache_A"], tmp_path / "lopd")
    provenance = read_model_provenance(tmp_path / "lopd")
    assert provenance["teacher_consistent"] is True
    assert provenance["teacher"]["label"] == "A"


def test_inconsistent_cache_is_refused_without_the_switch(world, tmp_path):
    with pytest.raises(
        TeacherConsistencyError, match="SFT data was written by teacher A .* OPD would learn from teacher B"
    ):
        run(world, world["cache_B"], tmp_path / "lopd")
    assert not (tmp_path / "lopd").exists()
    assert not list(tmp_path.glob(".lopd*"))


def test_inconsistent_cache_is_accepted_and_labelled_with_the_switch(world, tmp_path):
    run(world, world["cache_B"], tmp_path / "lopd", allow_teacher_mismatch=True)
    provenance = read_model_provenance(tmp_path / "lopd")
    assert provenance["teacher_consistent"] is False
    assert provenance["sft_teacher"]["label"] == "A" and provenance["teacher"]["label"] == "B"


def test_tokenizer_mismatch_is_refused(world, tmp_path):
    def other_tokenizer(meta):
        meta["tokenizer_fingerprint"] = "0123456789abcdef"

    bad = rewrite(world["cache_A"], tmp_path / "othertok.parquet", mutate_meta=other_tokenizer)
    with pytest.raises(ArtifactError, match="othertok.parquet: token ids come from tokenizer 0123456789abcdef"):
        run(world, bad, tmp_path / "lopd")
    assert not (tmp_path / "lopd").exists()


def test_cache_of_another_policy_is_refused(world, tmp_path):
    with pytest.raises(ArtifactError, match="rollouts were sampled by .* not by the OPD init model"):
        lightning_opd.main(
            [
                "--init",
                str(world["student_base"]),
                "--cache",
                str(world["cache_A"]),
                "--opd",
                json.dumps(TWO_STEPS),
                "--out",
                str(tmp_path / "lopd"),
                "--checkpoint-root",
                str(tmp_path / "ckpt"),
            ]
        )


def test_cache_with_misaligned_lengths_leaves_no_output(world, tmp_path):
    def drop(rows):
        rows[0]["teacher_logprobs"] = rows[0]["teacher_logprobs"][:2]

    bad = rewrite(world["cache_A"], tmp_path / "short.parquet", drop)
    with pytest.raises(ArtifactError, match="does not line up"):
        run(world, bad, tmp_path / "lopd")
    assert not (tmp_path / "lopd").exists()
