"""Parquet artifacts: the fixed schemas between stages, provenance in the file
metadata, atomic writes and validated reads.

Every reader error names the file and what is wrong with it, and every writer
leaves either the complete artifact or nothing at the target path.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

METADATA_KEY = b"lightning_opd"

TASK_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("problem", pa.string()),
    ("answer", pa.string()),
    ("solution", pa.string()),
    ("solution_words", pa.string()),
])

# SFT data written by a teacher and rollouts of pi_ref share one schema.
SAMPLES_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("problem", pa.string()),
    ("answer", pa.string()),
    ("prompt_ids", pa.list_(pa.int32())),
    ("response_ids", pa.list_(pa.int32())),
    ("response_text", pa.string()),
    ("finished", pa.bool_()),
])

# The teacher cache: the rollouts plus one float32 teacher log-prob per response token.
CACHE_SCHEMA = SAMPLES_SCHEMA.append(pa.field("teacher_logprobs", pa.list_(pa.float32())))


class ArtifactError(ValueError):
    """An input artifact is missing, unreadable, or breaks its contract."""


@contextlib.contextmanager
def atomic_path(path: Path | str, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; move it into place only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    if is_dir:
        tmp.mkdir()
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_table(path: Path | str, rows: list[dict] | pa.Table, schema: pa.Schema, metadata: dict[str, Any]) -> None:
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=schema)
    table = table.cast(schema).replace_schema_metadata({METADATA_KEY: json.dumps(metadata, default=str)})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_table(path: Path | str, schema: pa.Schema) -> tuple[pa.Table, dict[str, Any]]:
    """Read a parquet artifact, check its columns against ``schema``, return it and its provenance."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        raise ArtifactError(f"{path}: not a readable parquet file ({error})") from None
    missing = [name for name in schema.names if name not in table.schema.names]
    if missing:
        raise ArtifactError(f"{path}: missing columns {missing}; the schema needs {schema.names}")
    wrong = [f"{f.name} is {table.schema.field(f.name).type}, expected {f.type}"
             for f in schema if not table.schema.field(f.name).type.equals(f.type)]
    if wrong:
        raise ArtifactError(f"{path}: wrong column types: {'; '.join(wrong)}")
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ArtifactError(f"{path}: no lightning_opd provenance in the parquet metadata")
    return table.select(schema.names), json.loads(raw)


def read_cache(path: Path | str) -> tuple[pa.Table, dict[str, Any]]:
    """Read a teacher cache and check that every row has one log-prob per response token."""
    table, meta = read_table(path, CACHE_SCHEMA)
    ids = table.column("response_ids").to_pylist()
    logprobs = table.column("teacher_logprobs").to_pylist()
    row_ids = table.column("id").to_pylist()
    for row_id, tokens, scores in zip(row_ids, ids, logprobs):
        if scores is None or tokens is None or len(tokens) != len(scores):
            raise ArtifactError(
                f"{path}: row {row_id!r} has {len(tokens or [])} response tokens but "
                f"{len(scores or [])} teacher log-probs; the cache does not line up with its token ids"
            )
    return table, meta


def write_json(path: Path | str, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
