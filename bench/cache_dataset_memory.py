"""Host memory of Lightning OPD's training set over a teacher cache: the cache's
Arrow columns (its top k as numpy arrays) with examples made when a batch
loads, by a torch dataset (what `lightning_opd` does: "arrow") or by a
`datasets` transform (what it did before: "datasets transform"), against
every row built up front as Python lists (what it did before that).
Each way runs in fresh processes (``--repeats``, median and range printed: a
single peak RSS moves by tens of MiB from run to run) on the same synthetic
cache (random ids and log-probs of the cache's schema, top-k columns of
``--stored`` tokens per position) and prints the peak RSS over the cache read,
and the time to build the set and load one epoch of micro-batches, whose
examples carry the loss's ``--top-k`` (at most ``--stored``).

    python bench/cache_dataset_memory.py --rows 2000 --tokens 1024 --top-k 16
    python bench/cache_dataset_memory.py --rows 2000 --tokens 1024 --top-k 4 --stored 16
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def write_cache(path: Path, rows: int, tokens: int, top_k: int, vocab: int = 151_936) -> None:
    rng = np.random.default_rng(0)
    prompt = 64
    ids = pa.array(list(rng.integers(0, vocab, (rows, tokens), dtype=np.int32)), pa.list_(pa.int32()))
    table = pa.table({
        "prompt_ids": pa.array(list(rng.integers(0, vocab, (rows, prompt), dtype=np.int32)), pa.list_(pa.int32())),
        "response_ids": ids,
        "teacher_logprobs": pa.array(list(-rng.random((rows, tokens), dtype=np.float32)), pa.list_(pa.float32())),
        "teacher_topk_ids": pa.array(list(rng.integers(0, vocab, (rows, tokens * top_k), dtype=np.int32)),
                                     pa.list_(pa.int32())),
        "teacher_topk_logprobs": pa.array(list(-rng.random((rows, tokens * top_k)).astype(np.float16)),
                                          pa.list_(pa.float16())),
    })
    pq.write_table(table, path, row_group_size=1024)  # as the teacher_cache stage's shards of 1,024


def measure(path: Path, way: str, top_k: int, stored: int, micro_batch: int) -> dict:
    from datasets import Dataset

    from lightning_opd.lightning_opd import CacheRows, TopK
    from lightning_opd.opd_trainer import opd_example

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    table = pq.read_table(path)
    if way == "arrow":
        dataset = CacheRows(table, TopK(table, stored, top_k))
        del table
    elif way == "datasets transform":
        top = TopK(table, stored, top_k)
        rows = Dataset(table.select(["prompt_ids", "response_ids", "teacher_logprobs"]).append_column(
            "row", pa.array(np.arange(len(table), dtype=np.int64))))
        del table

        def examples_of(batch: dict[str, list]) -> dict[str, list]:
            made = [opd_example(p, r, lp, *top.of_row(n)) for n, p, r, lp in
                    zip(batch["row"], batch["prompt_ids"], batch["response_ids"], batch["teacher_logprobs"])]
            return {key: [e[key] for e in made] for key in made[0]}
        dataset = rows.with_transform(examples_of)  # datasets pickles the transform (and top) to fingerprint it
    else:
        examples = []
        for r in table.to_pylist():
            ids = np.asarray(r["teacher_topk_ids"]).reshape(-1, stored)[:, :top_k].tolist()
            logprobs = np.asarray(r["teacher_topk_logprobs"], np.float32).reshape(-1, stored)[:, :top_k].tolist()
            example = opd_example(r["prompt_ids"], r["response_ids"], r["teacher_logprobs"], ids, logprobs)
            examples.append({key: np.asarray(v).tolist() for key, v in example.items()})
        dataset = Dataset.from_list(examples)
    built = time.perf_counter() - start
    for i in range(0, len(dataset), micro_batch):
        dataset.__getitems__(list(range(i, min(i + micro_batch, len(dataset)))))
    return {"way": way, "peak_rss_gb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20,
            "build_s": built, "epoch_load_s": time.perf_counter() - start - built}


def spread(runs: list[dict], key: str, unit: str, digits: int) -> str:
    """The median of ``key`` over the runs, and its range."""
    values = sorted(run[key] for run in runs)
    return f"{statistics.median(values):.{digits}f} {unit} ({values[0]:.{digits}f}-{values[-1]:.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=512, help="response tokens per row")
    parser.add_argument("--top-k", type=int, default=16, help="k of the loss")
    parser.add_argument("--stored", type=int, help="k the cache stores (default: --top-k)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per way")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--measure", nargs=2, metavar=("CACHE", "WAY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    stored = args.top_k if args.stored is None else args.stored
    if not 1 <= args.top_k <= stored or args.repeats < 1:
        parser.error("need 1 <= --top-k <= --stored and --repeats >= 1")
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), args.measure[1], args.top_k, stored, args.micro_batch)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache.parquet"
        write_cache(cache, args.rows, args.tokens, stored)
        print(f"cache: {args.rows} rows x {args.tokens} response tokens, top_k {stored} stored, "
              f"{args.top_k} loaded: "
              f"{cache.stat().st_size / 2**20:.0f} MiB parquet, "
              f"{pq.read_table(cache).nbytes / 2**30:.2f} GiB as Arrow")
        for way in ("arrow", "datasets transform", "python lists"):
            runs = [json.loads(subprocess.run(
                [sys.executable, __file__, "--top-k", str(args.top_k), "--stored", str(stored), "--micro-batch",
                 str(args.micro_batch), "--measure", str(cache), way],
                capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
                for _ in range(args.repeats)]
            print(f"{way:>18}: peak RSS +{spread(runs, 'peak_rss_gb', 'GiB', 2)}, built in "
                  f"{spread(runs, 'build_s', 's', 1)}, one epoch of micro-batches {args.micro_batch} loaded in "
                  f"{spread(runs, 'epoch_load_s', 's', 1)}; "
                  f"median (range) of {args.repeats} processes")


if __name__ == "__main__":
    main()
