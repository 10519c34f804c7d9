"""Sharded, resumable and data-parallel work for the generation stages
(SFT data, rollouts, teacher cache).

A stage's input rows are cut into shards of ``shard_size`` rows. Each
finished shard is written atomically (parquet, in the final artifact's
schema) into a work directory keyed by a hash of the stage's inputs and
params, so a rerun after a kill, a preemption or a time limit redoes only
the missing shards. With ``data_parallel`` N > 1, N worker processes, each
with its own engine on its own GPUs (or on the CPU), take whole shards from
a queue; a lone vLLM engine runs in one such worker too (see
``ShardTask.engine_in_worker``). Once every shard is there, the artifact is assembled in shard
order, atomically, and the work directory is removed.

Results do not depend on where or when a shard ran: a stage seeds each
shard from the global index of its first row (see ``backends.request_seed``).

``python -m lightning_opd.shards --gather PART... --out OUT`` joins the part
files of a stage split over several jobs (``--part i-of-n``) into the artifact.
"""
from __future__ import annotations

import abc
import argparse
import contextlib
import json
import multiprocessing
import os
import queue
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from lightning_opd.artifacts import METADATA_KEY, ArtifactError, atomic_path, read_table, write_json, write_table
from lightning_opd.provenance import code_digest, key_digest

if TYPE_CHECKING:
    from lightning_opd.backends.base import Backend

KEY_FILE = "key.json"
WORKER_EXIT_TIMEOUT_S = 300  # for the engines to shut down after the last shard, all together


class ShardTask(abc.ABC):
    """One stage's work on a range of its input rows. An instance crosses to
    the worker processes by pickling, so ``open`` (engine, inputs) runs in the
    process that uses them, once."""

    unit = "tokens"  # what run() counts, for the progress lines
    engine: Backend | None = None  # what open() loads

    @property
    def engine_in_worker(self) -> bool:
        """Whether a lone engine runs in a worker process too, as data-parallel
        engines do. vLLM's: its process has once aborted at exit (SIGABRT, in
        its engine's teardown) after every shard was written, which must not
        fail the stage. The parent judges by the shards, not the exit code."""
        return getattr(self, "backend", None) == "vllm"

    @abc.abstractmethod
    def open(self) -> None:
        """Load the engine and the inputs."""

    def close(self) -> None:
        """Release the engine once this process is done with its shards."""
        if self.engine is not None:
            self.engine.close()

    @abc.abstractmethod
    def run(self, shard: range) -> tuple[pa.Table, int]:
        """The artifact rows for the input rows ``shard`` (in the artifact's schema) and the tokens processed."""


@dataclass(frozen=True)
class Part:
    """Part ``index`` (1-based) of ``count`` contiguous groups of shards, one per job."""
    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Part:
        try:
            index, count = (int(x) for x in text.split("-of-"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected I-of-N, e.g. 2-of-4") from None
        if not 1 <= index <= count:
            raise argparse.ArgumentTypeError(f"{text!r}: I must be between 1 and N")
        return cls(index, count)

    def __str__(self) -> str:
        return f"{self.index}-of-{self.count}"

    def select(self, shards: list[range]) -> list[int]:
        n = len(shards)
        return list(range((self.index - 1) * n // self.count, self.index * n // self.count))


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def add_shard_arguments(parser: argparse.ArgumentParser, default_size: int) -> None:
    """The command-line options of a sharded stage."""
    parser.add_argument("--shard-size", type=positive_int, default=default_size, help="input rows per shard")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where finished shards wait, under a hash of the inputs and params "
                             "(default: next to --out)")
    parser.add_argument("--data-parallel", type=positive_int, default=1,
                        help="engines, each on its own GPU(s) of the job, or on the CPU")
    parser.add_argument("--part", type=Part.parse, default=None,
                        help="I-of-N: only the I-th of N groups of shards (a stage split over N jobs)")


def shard_ranges(n_rows: int, shard_size: int) -> list[range]:
    if shard_size < 1:
        raise ValueError(f"shard_size must be a positive number of rows, got {shard_size}")
    return [range(start, min(start + shard_size, n_rows)) for start in range(0, n_rows, shard_size)]


def shard_path(work_dir: Path, index: int) -> Path:
    return work_dir / f"shard-{index:06d}.parquet"


def default_work_root(out: Path) -> Path:
    return out.with_name(f".{out.name}.shards")


def engine_devices(data_parallel: int, gpus_per_engine: int) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES of each engine: consecutive groups of this job's
    GPUs; None for every engine on a machine without GPUs (CPU engines)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        import torch

        gpus = [str(i) for i in range(torch.cuda.device_count())]
    else:
        gpus = [d.strip() for d in visible.split(",") if d.strip()]
    if not gpus:
        return [None] * data_parallel
    if data_parallel * gpus_per_engine > len(gpus):
        raise ValueError(f"data_parallel {data_parallel} x {gpus_per_engine} GPU(s) per engine needs "
                         f"{data_parallel * gpus_per_engine} GPUs, but this job sees {len(gpus)} ({','.join(gpus)})")
    return [",".join(gpus[w * gpus_per_engine:(w + 1) * gpus_per_engine]) for w in range(data_parallel)]


class Progress:
    """Shards and tokens done, and tokens/s, printed (flushed) as each shard completes."""

    def __init__(self, name: str, shards: list[range], total: int, done_before: int, unit: str):
        self.name, self.shards, self.unit = name, shards, unit
        self.total, self.done = total, done_before
        self.tokens, self.start = 0, time.time()

    def update(self, index: int, tokens: int, engine: int) -> None:
        self.done += 1
        self.tokens += tokens
        elapsed = time.time() - self.start
        rows = self.shards[index]
        print(f"[{self.name}] shard {index + 1}/{len(self.shards)} (rows {rows.start}-{rows.stop - 1}, "
              f"engine {engine}) done: {self.done}/{self.total} shards, {self.tokens} {self.unit} in "
              f"{elapsed:.1f} s this run ({self.tokens / max(elapsed, 1e-9):.1f} {self.unit}/s)", flush=True)


def _shard_metadata(key_digest: str, index: int, rows: range) -> dict[str, Any]:
    return {"work_key": key_digest, "shard": index, "rows": [rows.start, rows.stop]}


def _write_shard(work_dir: Path, index: int, rows: range, table: pa.Table, schema: pa.Schema) -> None:
    write_table(shard_path(work_dir, index), table, schema, _shard_metadata(work_dir.name, index, rows))


def _complete(work_dir: Path, index: int, rows: range) -> bool:
    """Whether a shard file is there and is the one this run would write."""
    path = shard_path(work_dir, index)
    if not path.is_file():
        return False
    try:
        meta = json.loads(pq.read_schema(path).metadata[METADATA_KEY])
    except (pa.ArrowException, OSError, KeyError, TypeError, ValueError) as error:
        print(f"{path}: unreadable ({error}); redoing it", flush=True)
        path.unlink()
        return False
    return meta == _shard_metadata(work_dir.name, index, rows)


def run_sharded(task: ShardTask, *, name: str, n_rows: int, shard_size: int, key: dict[str, Any],
                work_root: Path | None, out: Path, schema: pa.Schema, metadata: dict[str, Any],
                data_parallel: int = 1, gpus_per_engine: int = 1, part: Part | None = None) -> None:
    """Run ``task`` over the missing shards of ``n_rows`` rows, then assemble
    ``out`` (with ``metadata``) and drop the work directory. ``key`` names
    everything the results depend on; a part of a split stage works on its
    own group of shards, in a work directory of its own."""
    if data_parallel < 1:
        raise ValueError(f"data_parallel must be at least 1, got {data_parallel}")
    shards = shard_ranges(n_rows, shard_size)
    selected = part.select(shards) if part else list(range(len(shards)))
    if part and not selected:
        raise ValueError(f"[{name}] part {part}: {n_rows} rows make {len(shards)} shard(s) of up to {shard_size} "
                         f"rows, none left for this part; split the stage into at most {len(shards)} job(s) "
                         "or lower its shard_size")
    if part:
        metadata = {**metadata, "part": {"index": part.index, "count": part.count, "n_rows": n_rows,
                                         "shards": [selected[0], selected[-1] + 1],
                                         "rows": [shards[selected[0]].start, shards[selected[-1]].stop]}}
    root = Path(work_root) if work_root else default_work_root(out)
    key = {**key, "shard_size": shard_size, "part": str(part) if part else None, "out": str(out),
           "code": code_digest()}
    work_dir = root / key_digest(key)
    work_dir.mkdir(parents=True, exist_ok=True)
    for stale in work_dir.glob(".*.tmp-*"):  # a killed run's half-written shard
        stale.unlink()
    if not (work_dir / KEY_FILE).is_file():
        write_json(work_dir / KEY_FILE, key)  # for people: what the shards here belong to

    todo = [i for i in selected if not _complete(work_dir, i, shards[i])]
    print(f"[{name}] {len(selected)} shards of up to {shard_size} rows{f' (part {part})' if part else ''} "
          f"in {work_dir}: {len(selected) - len(todo)} done before, {len(todo)} to do "
          f"on {min(data_parallel, max(len(todo), 1))} engine(s)", flush=True)
    progress = Progress(name, shards, len(selected), len(selected) - len(todo), task.unit)
    try:
        if todo and data_parallel == 1 and not task.engine_in_worker:
            try:
                task.open()
                for i in todo:
                    table, tokens = task.run(shards[i])
                    _write_shard(work_dir, i, shards[i], table, schema)
                    progress.update(i, tokens, 0)
            finally:
                task.close()
        elif todo:
            _run_workers(task, todo, shards, work_dir, schema, progress, data_parallel, gpus_per_engine)
    except Exception:
        if not any(work_dir.glob("shard-*.parquet")):  # e.g. bad backend options: nothing to resume
            _remove(work_dir, root if not work_root else None)
        raise
    rows = write_shards_as(out, [shard_path(work_dir, i) for i in selected], schema, metadata)
    _remove(work_dir, root if not work_root else None)
    print(f"[{name}] {len(selected)} shards, {rows} rows -> {out}", flush=True)


def _remove(work_dir: Path, default_root: Path | None) -> None:
    """Drop a work directory, and the default root next to the output once it is empty."""
    shutil.rmtree(work_dir)
    if default_root is not None:
        try:
            default_root.rmdir()
        except OSError:
            pass  # another stage's work is still there


def write_shards_as(out: Path, paths: list[Path], schema: pa.Schema, metadata: dict[str, Any]) -> int:
    """Concatenate parquet files in order into ``out`` (atomically), one
    file's rows in memory at a time; returns the number of rows."""
    schema = schema.with_metadata({METADATA_KEY: json.dumps(metadata, default=str)})
    rows = 0
    with atomic_path(out) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for path in paths:
            table = pq.read_table(path).select(schema.names).cast(schema)
            writer.write_table(table)
            rows += table.num_rows
    return rows


def _die_with_parent() -> None:
    """Linux: a worker is killed when the stage process dies (kill -9, a time
    limit), rather than going on with the queue on the GPUs of a rerun."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker(engine: int, task: ShardTask, shards: list[range], work_dir: Path, schema: pa.Schema,
            jobs: multiprocessing.Queue, results: multiprocessing.Queue,
            ready: multiprocessing.synchronize.Barrier) -> None:
    _die_with_parent()
    index = None
    try:
        task.open()
        # An engine that loads first would otherwise drain a short queue alone
        # while the others are still loading. An engine that fails to load
        # breaks nothing here: the parent sees its failure and stops them all.
        ready.wait()
        while (index := jobs.get()) is not None:
            table, tokens = task.run(shards[index])
            _write_shard(work_dir, index, shards[index], table, schema)
            results.put(("done", engine, index, tokens))
    except BaseException:
        results.put(("failed", engine, index, traceback.format_exc()))
        _flush(results)  # the traceback reaches the parent even if the engine's teardown aborts
        raise SystemExit(1) from None
    results.put(("finished", engine, None, None))
    # every result reaches the parent before the engine closes: a process that dies closing it loses nothing
    _flush(results)
    task.close()


def _flush(results: multiprocessing.Queue) -> None:
    """Wait until what this process put on the queue is in the pipe (a queue sends from a thread of its own)."""
    results.close()
    results.join_thread()


def _run_workers(task: ShardTask, todo: list[int], shards: list[range], work_dir: Path, schema: pa.Schema,
                 progress: Progress, data_parallel: int, gpus_per_engine: int) -> None:
    devices = engine_devices(data_parallel, gpus_per_engine)[:len(todo)]
    context = multiprocessing.get_context("spawn")  # each engine initialises its own CUDA
    jobs, results, ready = context.Queue(), context.Queue(), context.Barrier(len(devices))
    for index in todo:
        jobs.put(index)
    workers = []
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        for engine, device in enumerate(devices):
            jobs.put(None)
            if device is not None:
                os.environ["CUDA_VISIBLE_DEVICES"] = device  # inherited by the spawned worker
            worker = context.Process(target=_worker, name=f"engine-{engine}",
                                     args=(engine, task, shards, work_dir, schema, jobs, results, ready))
            worker.start()
            workers.append(worker)
            print(f"engine {engine}: pid {worker.pid}"
                  + (f", CUDA_VISIBLE_DEVICES={device}" if device is not None else ", CPU"), flush=True)
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved
    try:
        remaining, finished = len(todo), set()
        while remaining:
            try:
                status, engine, index, detail = results.get(timeout=5)
            except queue.Empty:
                # a worker that sent "finished" may die closing its engine; the others may not,
                # unless what they sent before dying is still to be read
                dead = [w for e, w in enumerate(workers) if e not in finished and w.exitcode not in (None, 0)]
                if dead and results.empty():
                    raise RuntimeError(f"{dead[0].name} died (exit code {dead[0].exitcode}); the shards done so "
                                       f"far are kept in {work_dir}: rerun to resume") from None
                continue
            if status == "failed":
                where = "starting" if index is None else f"on shard {index + 1}"
                raise RuntimeError(f"engine {engine} failed {where}; the shards done so far are kept "
                                   f"in {work_dir}: rerun to resume\n{detail}")
            if status == "finished":
                finished.add(engine)
                continue
            progress.update(index, detail, engine)
            remaining -= 1
        deadline = time.monotonic() + WORKER_EXIT_TIMEOUT_S
        for worker in workers:
            worker.join(timeout=max(0.0, deadline - time.monotonic()))  # then killed below
            if worker.exitcode != 0:
                how = f"ended with exit code {worker.exitcode}" if worker.exitcode is not None else "did not end"
                print(f"{worker.name} {how} after its last shard; every shard is written, so the stage "
                      "goes on", flush=True)
    finally:
        for worker in workers:
            if worker.is_alive():
                _kill_tree(worker)


def _kill_tree(worker: multiprocessing.Process) -> None:
    """Kill a worker and the processes it started (a vLLM engine's, which would hold the GPUs on)."""
    try:
        children = psutil.Process(worker.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    worker.kill()
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    worker.join()


def gather(parts: list[Path], out: Path, schema: pa.Schema) -> None:
    """Join the part files of a stage split over jobs (``--part i-of-n``) into
    its artifact: every part present once, in order, with the same provenance."""
    metas = []
    for path in parts:
        _, meta = read_table(path, schema)
        if "part" not in meta:
            raise ArtifactError(f"{path}: not a part file (no 'part' in its metadata)")
        metas.append(meta)
    indices = [m["part"]["index"] for m in metas]
    counts = {m["part"]["count"] for m in metas}
    if counts != {len(parts)} or sorted(indices) != list(range(1, len(parts) + 1)):
        raise ArtifactError(f"{out}: the parts {[str(p) for p in parts]} are parts {indices} of {sorted(counts)}; "
                            f"expected each of 1..{len(parts)} once")
    ordered = [path for _, path in sorted(zip(indices, parts))]
    metas = sorted(metas, key=lambda m: m["part"]["index"])
    _check_rows_chain(ordered, [m["part"] for m in metas])
    common = [{k: v for k, v in m.items() if k != "part"} for m in metas]
    for path, meta in zip(ordered[1:], common[1:]):
        if meta != common[0]:
            raise ArtifactError(f"{path}: its provenance differs from that of {ordered[0]}; the parts come from "
                                "different runs")
    rows = write_shards_as(out, ordered, schema, common[0])
    print(f"gathered {len(parts)} parts, {rows} rows -> {out}", flush=True)


def _check_rows_chain(parts: list[Path], records: list[dict[str, Any]]) -> None:
    """The parts' row ranges, in part order, cover the input rows once each: parts cut with
    different shard sizes (a shard_size changed between the jobs) would drop or repeat rows."""
    n_rows = {r.get("n_rows") for r in records}
    if None in n_rows or len(n_rows) != 1:
        raise ArtifactError(f"{parts[0]}: the parts record {sorted(map(str, n_rows))} input rows, expected one "
                            "number: they come from different inputs or an older version; rerun the stage's jobs")
    total, end = n_rows.pop(), 0
    for path, record in zip(parts, records):
        start, stop = record["rows"]
        if start != end:
            raise ArtifactError(f"{path}: part {record['index']} holds rows {start}-{stop - 1}, but the parts "
                                f"before it end at row {end - 1}: the parts were cut with different shard sizes; "
                                "rerun the stage's jobs with one shard_size")
        end = stop
    if end != total:
        raise ArtifactError(f"{parts[-1]}: the parts end at row {end - 1} of {total} input rows; "
                            "rerun the stage's jobs with one shard_size")


def main(argv: list[str] | None = None) -> None:
    from lightning_opd.artifacts import CACHE_SCHEMA, SAMPLES_SCHEMA, cache_schema, cache_top_k

    parser = argparse.ArgumentParser(description="Join the part files of a generation stage split over jobs.")
    parser.add_argument("--gather", type=Path, nargs="+", required=True, help="the part files, any order")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--schema", choices=("samples", "cache"), required=True)
    args = parser.parse_args(argv)
    schema = SAMPLES_SCHEMA
    if args.schema == "cache":  # a top-k cache has more columns: as many as its first part's provenance says
        schema = cache_schema(cache_top_k(read_table(args.gather[0], CACHE_SCHEMA)[1]))
    gather(args.gather, args.out, schema)


if __name__ == "__main__":
    main()
