"""Fingerprints of models, tokenizers and files, and the records that every
model directory this pipeline writes carries (provenance, training log).

A fingerprint names content, not a path: the same weights copied elsewhere
keep their fingerprint, and retrained weights get a new one.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning_opd.hub import local_source, split_revision

PROVENANCE_FILE = "provenance.json"
TRAIN_LOG_FILE = "train_log.jsonl"
_FINGERPRINT_CACHE = ".fingerprint.json"
# what decides the model's outputs besides its weights: the chat template renders every prompt, the
# generation config holds the EOS ids generation stops at
_CONFIG_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "chat_template.json")
# a file changed within this many seconds of being hashed may share its
# timestamps with the next change (coarse file-system clocks): not cached
_RACY_SECONDS = 2.0


def _short(digest: hashlib._Hash) -> str:
    return digest.hexdigest()[:16]


def _sha256(path: Path | str) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def file_sha256(path: Path | str) -> str:
    return _sha256(path)[:16]


def fingerprinted_files(names) -> list[str]:
    """The files a model fingerprint covers, of a directory's (or hub repo's)
    top-level file names: config, generation config, tokenizer, chat template
    and the weights (*.safetensors, or
    the *.bin weights where there are none), so that a hub repo that carries
    both formats and a local copy of its safetensors agree."""
    names = {n for n in names if "/" not in n}
    weights = sorted(n for n in names if n.endswith(".safetensors")) or sorted(
        n for n in names if n.endswith(".bin") and n != "training_args.bin")
    return sorted(n for n in names if n in _CONFIG_FILES) + weights


def fingerprint_of(digests: dict[str, str]) -> str:
    """The fingerprint: a hash of (file name, sha256 of its content) pairs, the
    same function whether the sha256 values were computed here or are the hub's."""
    if not any(name.endswith((".safetensors", ".bin")) for name in digests):
        raise FileNotFoundError("no model weights (*.safetensors or *.bin)")
    return _short(hashlib.sha256(json.dumps(sorted(digests.items())).encode()))


def _stamp(path: Path) -> list[int]:
    """What changes whenever the file's content may have: a rewrite in place
    changes mtime and ctime (which no tool can set back), a replacement or a
    copy changes the inode, and a copied cache lands beside other inodes."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _hub_blob_sha256(path: Path) -> str | None:
    """A file of a Hugging Face cache snapshot is a link to blobs/<etag>; the
    etag of an LFS file (the weights) is the sha256 of its content."""
    if path.is_symlink():
        target = Path(os.readlink(path))
        if target.parent.name == "blobs" and len(target.name) == 64:
            return target.name
    return None


def _read_cache(cache: Path) -> dict[str, Any]:
    try:
        cached = json.loads(cache.read_text())
        return cached["files"] if cached.get("version") == 2 else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _write_cache(cache: Path, files: dict[str, Any]) -> None:
    """Atomically (a temporary file renamed over the cache): processes that
    fingerprint the same directory at once each write a whole file, and a
    reader sees one whole version or another."""
    try:
        fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=f"{cache.name}.", suffix=".tmp")
    except OSError:
        return  # a read-only model directory just does not get the shortcut
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump({"version": 2, "files": files}, handle)
        os.replace(tmp, cache)
    except OSError:
        Path(tmp).unlink(missing_ok=True)


def local_file_digests(path: Path, use_cache: bool = True) -> dict[str, str]:
    """sha256 of every fingerprinted file of a model directory. The cache
    file keeps the sha256 of each file with its stamp; a file whose stamp
    differs, or that changed too recently to tell, is hashed again."""
    files = fingerprinted_files(p.name for p in path.iterdir() if p.is_file())
    cache = path / _FINGERPRINT_CACHE
    cached = _read_cache(cache) if use_cache else {}
    digests, fresh = {}, {}
    for name in files:
        f = path / name
        stamp = _stamp(f)
        entry = cached.get(name)
        if entry and entry.get("stamp") == stamp:
            digests[name] = entry["sha256"]
        else:
            digests[name] = _hub_blob_sha256(f) or _sha256(f)
        settled = time.time_ns() - max(stamp[1], stamp[2]) > _RACY_SECONDS * 1e9
        if _stamp(f) == stamp and settled:  # unchanged while it was hashed
            fresh[name] = {"stamp": stamp, "sha256": digests[name]}
    if use_cache and fresh and fresh != cached:
        _write_cache(cache, fresh)
    return digests


def hub_file_digests(siblings, fetch: Callable[[str], Path | str]) -> dict[str, str]:
    """sha256 of every fingerprinted file of a hub repo, from its file
    metadata (``HfApi().model_info(..., files_metadata=True).siblings``):
    the LFS sha256 the hub keeps for the weights (the plain sha256 of the
    content), and for small non-LFS files (config, tokenizer; the hub gives
    only their git blob sha1) the sha256 of the file ``fetch`` returns."""
    by_name = {s.rfilename: s for s in siblings}
    digests = {}
    for name in fingerprinted_files(by_name):
        lfs = by_name[name].lfs
        digests[name] = lfs.sha256 if lfs is not None else _sha256(fetch(name))
    return digests


def _hub_digests(repo: str, revision: str | None) -> dict[str, str]:
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        info = HfApi().model_info(repo, revision=revision, files_metadata=True)
    except HfHubHTTPError:
        raise  # no such repo or revision: nothing to fall back on
    except Exception as error:  # the hub is unreachable: the snapshot in the local cache, if any
        try:
            snapshot = snapshot_download(repo, revision=revision, local_files_only=True)
        except Exception:
            raise FileNotFoundError(f"{repo}@{revision or 'main'}: cannot reach the hub ({error}) and the "
                                    "model is not in the local Hugging Face cache") from None
        return local_file_digests(Path(snapshot), use_cache=False)
    return hub_file_digests(info.siblings, lambda name: hf_hub_download(repo, name, revision=info.sha))


PACKAGE = Path(__file__).resolve().parent


@functools.cache
def code_digest(package: Path = PACKAGE) -> str:
    """A short hash of every Python file of the package: part of the name of a stage's partial work
    (shards, training checkpoints), so that a rerun after the code changed (Snakemake reruns the rule)
    does not resume from what the old code made. Finished artifacts do not carry it."""
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        if path.name.startswith(".") or not path.is_file():  # an editor's lock or backup file (.#module.py)
            continue
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def key_digest(key: dict[str, Any]) -> str:
    """A short hash of a JSON-able record (the config and inputs a run depends on)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]


def model_fingerprint(name_or_path: str | Path) -> str:
    """Hash of config, tokenizer, chat template and weights files' content: the same for a
    local directory and a hub id (``org/name`` or ``org/name@revision``) that
    hold the same files, whatever else (a README) a hub commit changes."""
    path = Path(name_or_path)
    if path.is_dir():
        digests = local_file_digests(path)
    else:
        repo, revision = split_revision(name_or_path)
        local_source(repo)  # a missing local directory is refused here, not tried as a hub id
        digests = _hub_digests(repo, revision)
    try:
        return fingerprint_of(digests)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{name_or_path}: {error} in this model") from None


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
        "revision": split_revision(name_or_path)[1],
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
