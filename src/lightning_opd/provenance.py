"""Fingerprints of models, tokenizers and files, and the records that every
model directory this pipeline writes carries (provenance, training log).

A fingerprint names content, not a path: the same weights copied elsewhere
keep their fingerprint, and retrained weights get a new one.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

PROVENANCE_FILE = "provenance.json"
TRAIN_LOG_FILE = "train_log.jsonl"
_FINGERPRINT_CACHE = ".fingerprint.json"
_MODEL_FILE_PATTERNS = ("config.json", "*.safetensors", "*.bin", "tokenizer.json", "tokenizer_config.json")


def _short(digest: "hashlib._Hash") -> str:
    return digest.hexdigest()[:16]


def file_sha256(path: Path | str) -> str:
    with open(path, "rb") as handle:
        return _short(hashlib.file_digest(handle, "sha256"))


def key_digest(key: dict[str, Any]) -> str:
    """A short hash of a JSON-able record (the config and inputs a run depends on)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]


def model_fingerprint(name_or_path: str | Path) -> str:
    """Hash of config, tokenizer and weights of a local model directory, or
    ``hf:<repo>@<commit>`` for a hub id (the commit pins the content)."""
    path = Path(name_or_path)
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        from lightning_opd.modeling import local_source

        local_source(name_or_path)  # a missing local directory is refused here, not tried as a hub id

        snapshot = Path(snapshot_download(str(name_or_path), allow_patterns=["*.json"]))
        return f"hf:{name_or_path}@{snapshot.name}"
    files = sorted({f for pattern in _MODEL_FILE_PATTERNS for f in path.glob(pattern)})
    if not any(f.suffix in (".safetensors", ".bin") for f in files):
        raise FileNotFoundError(f"{path}: no model weights (*.safetensors or *.bin) in this directory")
    stamp = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    cache = path / _FINGERPRINT_CACHE
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("stamp") == stamp:
            return cached["fingerprint"]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0" + file_sha256(f).encode())
    fingerprint = _short(digest)
    try:
        cache.write_text(json.dumps({"stamp": stamp, "fingerprint": fingerprint}))
    except OSError:
        pass  # a read-only model directory just does not get the shortcut
    return fingerprint


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the token <-> id mapping, the part that must agree for stored
    token ids to mean the same to two models (chat templates may differ)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    special = sorted(tokenizer.all_special_tokens)
    return _short(hashlib.sha256(json.dumps([vocab, special]).encode()))


def check_same_tokenizer(artifact: Path | str, meta: dict[str, Any], tokenizer, model: str | Path) -> None:
    """Stored token ids only mean the same to a model with the same vocabulary."""
    from lightning_opd.artifacts import ArtifactError

    if "tokenizer_fingerprint" not in meta:
        raise ArtifactError(f"{artifact}: the provenance metadata lacks tokenizer_fingerprint; delete the file "
                            "and rerun the stage that wrote it")
    if meta["tokenizer_fingerprint"] != tokenizer_fingerprint(tokenizer):
        raise ArtifactError(f"{artifact}: token ids come from tokenizer {meta['tokenizer_fingerprint']}, "
                            f"but {model} uses {tokenizer_fingerprint(tokenizer)}: the artifact was made "
                            "with another tokenizer; rerun the stage that wrote it with this model's tokenizer")


def read_model_provenance(name_or_path: str | Path) -> dict[str, Any]:
    """The provenance a pipeline-written model carries; {} for outside models."""
    record = Path(name_or_path) / PROVENANCE_FILE
    return _read_json(record) if record.is_file() else {}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path}: not valid JSON ({error}); the model directory is damaged: delete it and "
                         "rerun the stage that wrote it") from None


def read_train_log(model_dir: str | Path) -> list[dict[str, Any]]:
    """The Trainer's log history that a model trained here carries, one entry per logging step."""
    path = Path(model_dir) / TRAIN_LOG_FILE
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except ValueError as error:
        raise ValueError(f"{path}: not valid JSON lines ({error}); delete the model directory and rerun "
                         "the stage that trained it") from None


def describe_model(name_or_path: str | Path) -> dict[str, Any]:
    """What an artifact records about a model that produced it."""
    return {
        "path": str(name_or_path),
        "fingerprint": model_fingerprint(name_or_path),
        "provenance": read_model_provenance(name_or_path),
    }


def sft_teacher_of(model_record: dict[str, Any]) -> dict[str, Any] | None:
    """The teacher (label + fingerprint) whose answers a model was fine-tuned on."""
    return model_record.get("provenance", {}).get("sft_teacher")


class TeacherConsistencyError(ValueError):
    """The OPD teacher is not the teacher that wrote the student's SFT data."""


def check_teacher_consistency(sft_teacher: dict[str, Any] | None, opd_teacher: dict[str, Any],
                              allow_mismatch: bool, where: str) -> bool:
    """True when consistent; raises unless ``allow_mismatch`` when not (the
    paper's ablation), and returns False then so the run is labelled."""
    if sft_teacher is None:
        if allow_mismatch:
            return False
        raise TeacherConsistencyError(
            f"{where}: cannot verify teacher consistency: the student's SFT teacher is unknown "
            "(the model has no provenance.json). Set allow_teacher_mismatch to train anyway.")
    for what, record in (("the student's SFT teacher", sft_teacher), ("the OPD teacher", opd_teacher)):
        if not isinstance(record, dict) or "fingerprint" not in record:
            raise TeacherConsistencyError(f"{where}: the provenance of {what} lacks its fingerprint ({record!r}); "
                                          "rerun the stage that wrote it")
    if sft_teacher["fingerprint"] == opd_teacher["fingerprint"]:
        return True
    if allow_mismatch:
        return False
    raise TeacherConsistencyError(
        f"{where}: teacher inconsistency: the SFT data was written by teacher "
        f"{sft_teacher.get('label') or '?'} ({sft_teacher['fingerprint']}) but OPD would learn from teacher "
        f"{opd_teacher.get('label') or '?'} ({opd_teacher['fingerprint']}). Lightning OPD needs the same teacher "
        "for both (a different one biases the gradient); set allow_teacher_mismatch: true only for the ablation.")
