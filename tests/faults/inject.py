"""Helpers of the fault-injection suite: run a stage as `python -m` would
(in this process, or in a subprocess where a kill or a limit is the point),
damage artifacts, and check that nothing is left at a target path."""
from __future__ import annotations

import contextlib
import json
import os
import re
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
# what an error says to do next: imperative words and phrases, matched as whole words in the error message
# itself (not in a traceback); generic words ("check", "use") are left out, as they appear in any text
ADVICE = re.compile(r"(?<!\w)(" + "|".join(map(re.escape, [
    "rerun", "run the", "run it", "delete", "remove", "rebuild", "build it", "lower", "raise", "set", "add",
    "free space", "make it", "make sure", "point", "define", "copy", "give", "write {problem}", "choose",
    "use a", "use an", "use only", "use loss",
])) + r")(?!\w)", re.IGNORECASE)


@dataclass
class Outcome:
    returncode: int
    output: str  # what `python -m` would print: the traceback of an uncaught exception
    message: str = ""  # the error itself: the exception's type and message, without the traceback


def call(main, argv: list[str]) -> Outcome:
    """``main(argv)`` as `python -m` runs it: an uncaught exception is exit status 1 with its traceback."""
    try:
        main([str(a) for a in argv])
    except SystemExit as exit_:
        return Outcome(exit_.code if isinstance(exit_.code, int) else 1, str(exit_), str(exit_))
    except Exception as error:
        return Outcome(1, traceback.format_exc(), "".join(traceback.format_exception_only(error)).strip())
    return Outcome(0, "")


def run_module(module: str, argv: list, timeout: int = 300, **popen) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, argv)], env=ENV, capture_output=True,
                          text=True, timeout=timeout, **popen)


# the first line of an error as `python -m` (an uncaught exception) and Snakemake print it
ERROR_START = re.compile(r"^(?:[\w.]+(?:Error|Exception)\b|Error\b)")


def error_message(outcome) -> str:
    """The error a user reads, without the traceback before it: the exception's message of an in-process
    call; of a subprocess, its output from the last line that starts an error (`SomeError: ...`, or a
    Snakemake error block) to the end, else its last non-empty line."""
    if isinstance(outcome, Outcome):
        return outcome.message
    lines = [line for line in (outcome.stdout + outcome.stderr).splitlines() if line.strip()]
    starts = [i for i, line in enumerate(lines) if ERROR_START.match(line)]
    return "\n".join(lines[starts[-1]:]) if starts else (lines[-1] if lines else "")


def assert_refused(outcome, *names: str) -> None:
    """Non-zero exit, and an error message naming each of ``names`` (file, config key, problem) and
    saying what to do."""
    text = outcome.output if isinstance(outcome, Outcome) else outcome.stdout + outcome.stderr
    assert outcome.returncode != 0, f"expected a refusal, got exit 0:\n{text[-2000:]}"
    message = error_message(outcome)
    for name in names:
        assert name in message, f"the error does not name {name!r}:\n{message}\n(output: {text[-2000:]})"
    assert ADVICE.search(message), f"the error says nothing on what to do:\n{message}"


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
