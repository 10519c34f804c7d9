"""Model fingerprints name the content of config, tokenizer and weights files:
a local copy of a model and the hub repo holding the same files agree; the
cache of per-file hashes never returns a stale hash and survives 8 processes
writing it at once."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from huggingface_hub.hf_api import ModelInfo
from safetensors.torch import save_file

from lightning_opd.provenance import fingerprint_of, hub_file_digests, model_fingerprint

COMMIT = "0123456789abcdef0123456789abcdef01234567"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A model directory as save_pretrained writes it (the fingerprint reads files, it loads nothing),
    its timestamps already older than the cache's two-second guard."""
    path = tmp_path / "model"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "qwen3", "hidden_size": 8}))
    (path / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0, "b": 1}}}))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "b"}))
    (path / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 1}))
    save_file({"w": torch.arange(64, dtype=torch.float32)}, path / "model-00001-of-00002.safetensors")
    save_file({"v": torch.ones(16)}, path / "model-00002-of-00002.safetensors")
    (path / "model.safetensors.index.json").write_text("{}")
    (path / "README.md").write_text("a model")
    time.sleep(2.1)
    return path


def test_copy_has_the_same_fingerprint_and_other_weights_another(model_dir, tmp_path):
    fingerprint = model_fingerprint(model_dir)
    assert (model_dir / ".fingerprint.json").is_file()
    copy = Path(shutil.copytree(model_dir, tmp_path / "copy"))  # the cache file comes along
    (copy / "README.md").write_text("another readme")
    assert model_fingerprint(copy) == fingerprint
    save_file({"v": torch.zeros(16)}, copy / "model-00002-of-00002.safetensors")
    assert model_fingerprint(copy) != fingerprint


@pytest.mark.parametrize("name", ["chat_template.jinja", "generation_config.json"])
def test_another_chat_template_or_eos_is_another_model(model_dir, name):
    """The template renders every prompt and the generation config says where sampling stops: shards or
    caches of the model before such an edit must not count as this model's."""
    fingerprint = model_fingerprint(model_dir)
    (model_dir / name).write_text((model_dir / name).read_text() + "\n")
    assert model_fingerprint(model_dir) != fingerprint


def test_cache_is_not_fooled_by_a_rewrite_with_the_same_size_and_mtime(model_dir):
    fingerprint = model_fingerprint(model_dir)
    weights = model_dir / "model-00001-of-00002.safetensors"
    before = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-4:] = b"\x00\x00\x80\x7f"  # same size, other content
    with open(weights, "r+b") as handle:  # in place: the inode stays
        handle.write(data)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))  # as `cp -p` or `touch -r` would
    assert weights.stat().st_size == before.st_size and weights.stat().st_mtime_ns == before.st_mtime_ns
    assert weights.stat().st_ino == before.st_ino
    assert model_fingerprint(model_dir) != fingerprint


def test_hub_checksums_give_the_local_fingerprint(model_dir):
    """The hub side from a model_info payload in the shape the hub API returns
    (`siblings` with `lfs.sha256` for LFS files): there is no hub here, so the
    payload is written from the local files, as the hub would describe them once uploaded."""
    siblings = [{"rfilename": name, "size": (model_dir / name).stat().st_size, "blobId": "f" * 40}
                for name in sorted(os.listdir(model_dir)) if not name.startswith(".")]
    for s in siblings:
        if s["rfilename"].endswith(".safetensors"):
            s["lfs"] = {"size": s["size"], "sha256": sha256(model_dir / s["rfilename"]), "pointerSize": 134}
    siblings += [{"rfilename": ".gitattributes", "size": 10}, {"rfilename": "original/consolidated.pth", "size": 9},
                 {"rfilename": "pytorch_model.bin", "size": 9, "lfs": {"size": 9, "sha256": "0" * 64,
                                                                       "pointerSize": 134}}]
    info = ModelInfo(id="org/tiny", sha=COMMIT, siblings=siblings)
    fetched = []

    def fetch(name):  # only the small non-LFS files are downloaded
        fetched.append(name)
        return model_dir / name

    digests = hub_file_digests(info.siblings, fetch)
    assert sorted(fetched) == ["chat_template.jinja", "config.json", "generation_config.json", "tokenizer.json",
                              "tokenizer_config.json"]
    assert fingerprint_of(digests) == model_fingerprint(model_dir)


def hf_cache(model_dir: Path, root: Path) -> Path:
    """The Hugging Face cache layout of a downloaded snapshot: files are links to blobs named by their etag
    (the sha256 for LFS files, the git blob sha1 for the others)."""
    repo = root / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for f in model_dir.iterdir():
        if f.name.startswith("."):
            continue
        data = f.read_bytes()
        etag = (sha256(f) if f.suffix == ".safetensors"
                else hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest())
        shutil.copy(f, repo / "blobs" / etag)
        (snapshot / f.name).symlink_to(Path("../../blobs") / etag)
    return snapshot


@pytest.mark.parametrize("reference", ["org/tiny", f"org/tiny@{COMMIT}"])
def test_hub_id_offline_uses_the_cached_snapshot(model_dir, tmp_path, reference):
    hf_cache(model_dir, tmp_path / "hub")
    env = {**ENV, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    code = f"from lightning_opd.provenance import describe_model as d; import json; print(json.dumps(d({reference!r})))"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(result.stdout)
    assert record["fingerprint"] == model_fingerprint(model_dir)
    assert record["revision"] == (COMMIT if "@" in reference else None)
    assert not (tmp_path / "hub/models--org--tiny/snapshots" / COMMIT / ".fingerprint.json").exists()


@pytest.mark.parametrize("reference", ["org/tiny", f"org/tiny@{COMMIT}"])
def test_a_pinned_hub_id_gives_the_models_config_offline(model_dir, tmp_path, reference):
    """The context and vocabulary checks of every stage, and the empty model of an FSDP rank, read the config
    of a hub id pinned to a revision (the config README's `path: org/name@revision`) as of one that is not."""
    config = {"model_type": "qwen3", "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4, "vocab_size": 97,
              "max_position_embeddings": 64}
    (model_dir / "config.json").write_text(json.dumps(config))
    hf_cache(model_dir, tmp_path / "hub")
    env = {**ENV, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    code = ("from lightning_opd.modeling import context_length, vocab_size; "
            "from lightning_opd.training import empty_model; "
            f"print(context_length({reference!r}), vocab_size({reference!r}), "
            f"empty_model({reference!r}).get_output_embeddings().weight.shape[0])")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["64", "97", "97"]


RACE = """
import sys
from pathlib import Path
from lightning_opd.provenance import model_fingerprint
path = Path(sys.argv[1])
seen = set()
for i in range(40):
    seen.add(model_fingerprint(path))
    if i % 3 == 0:
        (path / ".fingerprint.json").unlink(missing_ok=True)  # everyone hashes and writes again
print(*seen)
"""


def test_eight_processes_fingerprinting_at_once(model_dir):
    expected = model_fingerprint(model_dir)
    (model_dir / ".fingerprint.json").unlink()
    ranks = [subprocess.Popen([sys.executable, "-c", RACE, str(model_dir)], env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(8)]
    outputs = [rank.communicate(timeout=300) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0] * 8, [err[-2000:] for _, err in outputs]
    assert [out.split() for out, _ in outputs] == [[expected]] * 8
    assert not [p.name for p in model_dir.iterdir() if p.name.endswith(".tmp")]
    model_fingerprint(model_dir)
    assert json.loads((model_dir / ".fingerprint.json").read_text())["version"] == 2
