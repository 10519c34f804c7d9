"""Parquet artifacts: the fixed schemas between stages, provenance in the file
metadata, atomic writes and validated reads.

Every reader error names the file and what is wrong with it, and every writer
leaves either the complete artifact or nothing at the target path.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
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
# A top-k cache (teacher_cache.top_k = k > 0) adds, for every response token, the teacher's k most
# likely token ids and their log-probs, flattened token by token (token t's k entries at
# t*k .. t*k + k - 1, most likely first, equal log-probs by increasing id). float16 log-probs: half
# of float32's bytes, and 8x bfloat16's precision over the log-probs' range (> -65504); the loss
# error it adds is measured by bench/topk_cache.py.
TOPK_FIELDS = (pa.field("teacher_topk_ids", pa.list_(pa.int32())),
               pa.field("teacher_topk_logprobs", pa.list_(pa.float16())))
TOPK_DTYPES = {"ids": "int32", "logprobs": "float16"}


# Provenance that later stages read from an artifact's metadata (dotted paths).
SAMPLES_METADATA = ("model.path", "model.fingerprint", "tokenizer_fingerprint", "sampling")
CACHE_METADATA = ("teacher.fingerprint", "tokenizer_fingerprint", "rollout_policy.path",
                  "rollout_policy.fingerprint", "rollouts", "sft_teacher")


class ArtifactError(ValueError):
    """An input artifact is missing, unreadable, or breaks its contract."""


def remove_stale_siblings(path: Path) -> None:
    """Remove the ``.name.tmp-*`` siblings that an interrupted (killed) write of ``path`` left."""
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)


def _os_errno(error: BaseException) -> int | None:
    """The errno behind ``error`` or its causes; torch, safetensors and arrow
    often wrap it in a message only."""
    while error is not None:
        if isinstance(error, OSError) and error.errno:
            return error.errno
        text = str(error)
        for code in (*_FULL, *_DENIED):
            if os.strerror(code) in text or f"os error {code})" in text.lower() or f"errno {code}]" in text.lower():
                return code
        # torch.save reports a failed write of its zip stream without an errno
        if any(sign in text for sign in ("StorageFull", "file write failed", "iostream error", "unexpected pos")):
            return errno.ENOSPC
        error = error.__cause__ or error.__context__
    return None


def write_failure(path: Path | str, error: BaseException) -> OSError | None:
    """An OSError naming ``path`` and what to do when ``error`` is a full disk
    or an unwritable location; None for any other error."""
    code = _os_errno(error)
    if code in _FULL:
        hint = "the disk (or quota) is full: free space there or point results_dir at a larger disk, then rerun"
    elif code in _DENIED:
        hint = "the location is not writable: make it writable or point results_dir elsewhere, then rerun"
    else:
        return None
    return OSError(code, f"{path}: cannot write ({os.strerror(code)}); {hint}")


def check_writable(path: Path | str, holds_files: bool = False) -> None:
    """Refuse at once, before any compute, when ``path`` cannot be written: a
    probe file is written in the directory that will receive it (its parent;
    ``path`` itself when it ``holds_files``, as a checkpoint root) or, where
    that does not exist yet, in its nearest existing ancestor (which will
    have to create it). Nothing is left behind."""
    path = Path(path)
    where, probe = (path, ".write-probe.tmp-") if holds_files else (path.parent, f".{path.name}.tmp-")
    where = next(d for d in (where.absolute(), *where.absolute().parents) if d.exists())
    try:
        with tempfile.NamedTemporaryFile(dir=where, prefix=probe):
            pass
    except OSError as error:
        if failure := write_failure(path, error):
            raise failure from error
        raise


@contextlib.contextmanager
def atomic_path(path: Path | str, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; move it into place only on success."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_siblings(path)  # one job writes a path at a time: older siblings are leftovers of a kill
        if is_dir:
            tmp.mkdir()
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except Exception as error:
        if failure := write_failure(path, error):
            raise failure from error
        raise
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_table(path: Path | str, rows: list[dict] | pa.Table, schema: pa.Schema, metadata: dict[str, Any]) -> None:
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=schema)
    if table.num_rows == 0:
        raise ArtifactError(f"{path}: refusing to write an artifact with no rows; its input gave nothing to "
                            "write: give the stage an input with rows (raise the config's counts that select "
                            "them, e.g. task.n_*), then rerun it")
    table = table.cast(schema).replace_schema_metadata({METADATA_KEY: json.dumps(metadata, default=str)})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _check_columns(path: Path, table: pa.Table, schema: pa.Schema, why: str = "") -> None:
    missing = [name for name in schema.names if name not in table.schema.names]
    if missing:
        raise ArtifactError(f"{path}: missing columns {missing}; the schema needs {schema.names}{why}")
    wrong = [f"{f.name} is {table.schema.field(f.name).type}, expected {f.type}"
             for f in schema if not table.schema.field(f.name).type.equals(f.type)]
    if wrong:
        raise ArtifactError(f"{path}: wrong column types: {'; '.join(wrong)}")


def _check_no_nulls(path: Path, table: pa.Table, schema: pa.Schema) -> None:
    """No null in the schema's columns, nor inside their lists: the stages would fail on one with a
    TypeError that names no file, or train on a token id that is not there."""
    for name in schema.names:
        column = table.column(name)
        if column.null_count:
            row, where = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0]), ""
        elif pa.types.is_list(column.type) and (values := pc.list_flatten(column)).null_count:
            at = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
            row = int(pc.list_parent_indices(column).to_numpy(zero_copy_only=False)[at])
            where = " inside its list"
        else:
            continue
        row_id = table.column("id")[row].as_py() if "id" in table.schema.names else None
        raise ArtifactError(f"{path}: row {row} (id {row_id!r}) has a null in column {name!r}{where}; the file "
                            "was not written by the pipeline or was damaged: delete it and rerun the stage that "
                            "wrote it")


def read_table(path: Path | str, schema: pa.Schema, keep_other_columns: bool = False
               ) -> tuple[pa.Table, dict[str, Any]]:
    """Read a parquet artifact, check its columns against ``schema``, return it
    (its other columns dropped unless ``keep_other_columns``) and its provenance."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found; run the stage that writes it first")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        raise ArtifactError(f"{path}: not a readable parquet file ({error}); it may be truncated or not an "
                            "artifact of the pipeline: delete it and rerun the stage that wrote it") from None
    _check_columns(path, table, schema)
    if table.num_rows == 0:
        raise ArtifactError(f"{path}: the artifact has no rows; delete it and rerun the stage that wrote it")
    _check_no_nulls(path, table, schema)
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ArtifactError(f"{path}: no lightning_opd provenance in the parquet metadata; this file was not "
                            "written by the pipeline: delete it and rerun the stage that writes it")
    try:
        meta = json.loads(raw)
    except ValueError as error:
        raise ArtifactError(f"{path}: the provenance metadata is not valid JSON ({error}); "
                            "delete the file and rerun the stage that wrote it") from None
    required = (SAMPLES_METADATA if schema.equals(SAMPLES_SCHEMA)
                else CACHE_METADATA if schema.names[:len(CACHE_SCHEMA)] == CACHE_SCHEMA.names else ())
    if missing := [key for key in required if not _has(meta, key)]:
        raise ArtifactError(
            f"{path}: the provenance metadata lacks {missing}; the file was written by an older "
            "or foreign version: delete it and rerun the stage that wrote it"
        )
    return (table if keep_other_columns else table.select(schema.names)), meta


def _has(meta: Any, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(meta, dict) or part not in meta:
            return False
        meta = meta[part]
    return True


def cache_schema(top_k: int = 0) -> pa.Schema:
    """The columns of a teacher cache that stores the teacher's ``top_k`` best tokens (0: none)."""
    return CACHE_SCHEMA if not top_k else pa.schema([*CACHE_SCHEMA, *TOPK_FIELDS])


def cache_top_k(meta: dict[str, Any]) -> int:
    """k of a cache's top-k columns, from its provenance (0 for caches written before top-k)."""
    return int(meta.get("top_k") or 0)


def _bad_row(path: Path, row_id: str, what: str) -> ArtifactError:
    return ArtifactError(f"{path}: row {row_id!r} {what}: delete the cache and rerun the teacher_cache stage "
                         "(check the teacher's weights if it happens again)")


# response tokens per block of the top-k checks: their memory is O(block x k) (~0.1 GB at k = 16), not O(cache):
# float64 probabilities of a whole paper-scale cache (4e8 tokens x 16) would take ~50 GB in every process
TOP_K_CHECK_TOKENS = 1 << 18


def _check_top_k(path: Path, table: pa.Table, k: int) -> None:
    """Per row k ids and log-probs per response token; finite log-probs <= 0 whose
    probabilities sum to at most 1; distinct non-negative ids at every token."""
    row_ids = table.column("id").to_pylist()
    tokens = pc.list_value_length(table.column("response_ids")).to_numpy(zero_copy_only=False)
    for name in ("teacher_topk_ids", "teacher_topk_logprobs"):
        column = table.column(name)
        lengths = pc.list_value_length(column).fill_null(-1).to_numpy(zero_copy_only=False)
        if (bad := np.flatnonzero(lengths != k * tokens)).size:
            row = bad[0]
            raise _bad_row(path, row_ids[row], f"has {tokens[row]} response tokens but {lengths[row]} values in "
                                               f"{name} (top_k {k}: {k} per token); the cache does not line up")
    ends = np.cumsum(tokens)  # where each row's response tokens end among all of them

    def bad_token(at: int, problem: str) -> ArtifactError:
        row = int(np.searchsorted(ends, at, side="right"))
        return _bad_row(path, row_ids[row], problem.format(token=at - (ends[row] - tokens[row])))

    all_logprobs = pc.list_flatten(table.column("teacher_topk_logprobs"))
    all_ids = pc.list_flatten(table.column("teacher_topk_ids"))
    total = int(ends[-1]) if len(ends) else 0
    for start in range(0, total, TOP_K_CHECK_TOKENS):
        n = min(TOP_K_CHECK_TOKENS, total - start)
        logprobs = all_logprobs.slice(start * k, n * k).to_numpy(zero_copy_only=False).astype(np.float32)
        logprobs = logprobs.reshape(n, k)
        bad = ~np.isfinite(logprobs).all(1) | (logprobs > 1e-3).any(1)
        if bad.any():
            at = int(np.flatnonzero(bad)[0])
            value = logprobs[at][~np.isfinite(logprobs[at]) | (logprobs[at] > 1e-3)][0]
            raise bad_token(start + at, f"has teacher top-k log-prob {value} at response token {{token}}; "
                                        f"a log-prob must be finite and <= 0")
        # float16 rounding moves each probability by at most p |log p| 2^-11, their sum by well under 1e-2
        mass = np.exp(logprobs.astype(np.float64)).sum(1)
        if (over := np.flatnonzero(mass > 1 + 1e-2)).size:
            at = int(over[0])
            raise bad_token(start + at, f"has teacher top-k probabilities summing to {mass[at]:.4f} > 1 "
                                        f"at response token {{token}}")
        ids = np.sort(all_ids.slice(start * k, n * k).to_numpy(zero_copy_only=False).reshape(n, k), 1)
        bad = (ids[:, 0] < 0) | (np.diff(ids, axis=1) == 0).any(1)
        if bad.any():
            at = int(np.flatnonzero(bad)[0])
            raise bad_token(start + at, f"has top-k token ids {ids[at].tolist()} at response token {{token}}; "
                                        f"they must be distinct and >= 0")


def read_cache(path: Path | str) -> tuple[pa.Table, dict[str, Any]]:
    """Read a teacher cache and check that every row has one log-prob per
    response token (and, in a top-k cache, k ids and log-probs per token)."""
    path = Path(path)
    table, meta = read_table(path, CACHE_SCHEMA, keep_other_columns=True)
    k = cache_top_k(meta)
    schema = cache_schema(k)
    _check_columns(path, table, schema, f" (its provenance says top_k {k})" if k else "")
    table = table.select(schema.names)
    # vectorised over the whole column: a paper-scale cache as Python lists would not fit in memory
    row_ids = table.column("id")
    tokens = pc.list_value_length(table.column("response_ids")).fill_null(-1).to_numpy(zero_copy_only=False)
    scores = pc.list_value_length(table.column("teacher_logprobs")).fill_null(-1).to_numpy(zero_copy_only=False)
    if (bad := np.flatnonzero((tokens != scores) | (tokens < 0))).size:
        row = int(bad[0])
        raise ArtifactError(
            f"{path}: row {row_ids[row].as_py()!r} has {max(tokens[row], 0)} response tokens but "
            f"{max(scores[row], 0)} teacher log-probs; the cache does not line up with its token ids: "
            "delete it and rerun the teacher_cache stage"
        )
    values = pc.list_flatten(table.column("teacher_logprobs")).to_numpy(zero_copy_only=False)
    # a log-prob is finite and at most 0; NaN or inf would train an all-NaN model without a word
    if (bad := np.flatnonzero(~np.isfinite(values) | (values > 1e-3))).size:
        at = int(bad[0])
        row = int(np.searchsorted(np.cumsum(tokens), at, side="right"))
        raise ArtifactError(
            f"{path}: row {row_ids[row].as_py()!r} has teacher log-prob {values[at]} at response token "
            f"{at - int(tokens[:row].sum())}; a log-prob must be finite and <= 0: delete the cache and rerun the "
            "teacher_cache stage (check the teacher's weights if it happens again)"
        )
    if k:
        _check_no_nulls(path, table, pa.schema(TOPK_FIELDS))
        _check_top_k(path, table, k)
    return table, meta


def write_json(path: Path | str, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
