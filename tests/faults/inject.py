"""Helpers of the fault-injection suite: run a stage as `python -m` would
(in this process, or in a subprocess where a kill or a limit is the point),
damage artifacts, and check that nothing is left at a target path."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lightning_opd.artifacts import METADATA_KEY

SRC = Path(__file__).resolve().parents[2] / "src"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
       "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
# words of an error that tell the user what to do next
ADVICE = ("rerun", "delete", "lower", "set ", "add ", "remove", "rebuild", "free space", "make it writable",
          "check", "write {problem}", "point results_dir", "define them", "use ")


@dataclass
class Outcome:
    returncode: int
    output: str


def call(main, argv: list[str]) -> Outcome:
    """``main(argv)`` as `python -m` runs it: an uncaught exception is exit status 1 with its traceback."""
    try:
        main([str(a) for a in argv])
    except SystemExit as exit_:
        return Outcome(exit_.code if isinstance(exit_.code, int) else 1, str(exit_))
    except Exception:
        return Outcome(1, traceback.format_exc())
    return Outcome(0, "")


def run_module(module: str, argv: list, timeout: int = 300, **popen) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, argv)], env=ENV, capture_output=True,
                          text=True, timeout=timeout, **popen)


def assert_refused(outcome, *names: str) -> None:
    """Non-zero exit, an error naming each of ``names`` (file or config key), and advice on what to do."""
    text = outcome.output if isinstance(outcome, Outcome) else outcome.stdout + outcome.stderr
    assert outcome.returncode != 0, f"expected a refusal, got exit 0:\n{text[-2000:]}"
    last = text.strip().splitlines()[-1] if text.strip() else ""
    for name in names:
        assert name in text, f"the error does not name {name!r}:\n{text[-2000:]}"
    assert any(word in text.lower() for word in ADVICE), f"the error says nothing on what to do:\n{last}"


def assert_nothing_at(target: Path, shards_kept: bool = False) -> None:
    """No output at ``target`` and no temporary or staging sibling of it; with ``shards_kept``, the
    finished shards of a sharded stage (its `.<name>.shards` work directory) stay for the rerun."""
    target = Path(target)
    assert not target.exists(), f"{target} exists after a failure"
    leftovers = list(target.parent.glob(f".{target.name}.*")) if target.parent.exists() else []
    if shards_kept:
        assert any(target.parent.glob(f".{target.name}.shards/*/shard-*.parquet")), "no finished shard was kept"
        leftovers = [p for p in leftovers if p.name != f".{target.name}.shards"]
    assert not leftovers, f"leftovers beside {target}: {leftovers}"


def rewrite(src: Path, dst: Path, mutate_rows=None, mutate_meta=None, raw_meta: bytes | None = None) -> Path:
    """A copy of a parquet artifact with its rows and/or metadata changed (schema kept)."""
    table = pq.read_table(src)
    rows = table.to_pylist()
    meta = json.loads(table.schema.metadata[METADATA_KEY])
    if mutate_rows:
        changed = mutate_rows(rows)
        rows = rows if changed is None else changed
    if mutate_meta:
        mutate_meta(meta)
    out = pa.Table.from_pylist(rows, schema=table.schema.remove_metadata())
    metadata = {METADATA_KEY: raw_meta if raw_meta is not None else json.dumps(meta)}
    pq.write_table(out.replace_schema_metadata(metadata), dst)
    return dst


def wait_for(predicate, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert process.poll() is None, f"the process ended (exit {process.returncode}) before the point to kill it"
        assert time.time() < deadline, "timed out waiting for progress"
        time.sleep(0.02)


def start(module: str, argv: list, log: Path) -> subprocess.Popen:
    handle = open(log, "w")
    return subprocess.Popen([sys.executable, "-m", module, *map(str, argv)], env=ENV, stdout=handle,
                            stderr=subprocess.STDOUT, start_new_session=True)


def kill9(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL


@contextlib.contextmanager
def small_filesystem(path: Path, size: str, read_only: bool = False):
    """A tmpfs of ``size`` at ``path`` (needs root); skips where mounting is not allowed."""
    import pytest

    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}); needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / ".fingerprint.json").unlink(missing_ok=True)
    return dst
