"""Peak memory of the top-k teacher cache's checks (`read_cache`), which every training process runs: a
synthetic cache of --tokens response tokens with the top --k stored (float16 log-probs, int32 ids, in rows of
1,000 tokens), the checks run in a fresh process each time; peak RSS over the loaded table (Linux).

    python bench/cache_check_memory.py --tokens 1000000 4000000 --k 16
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROW_TOKENS = 1000

# the peak is read from VmHWM after resetting it (Linux's clear_refs 5): reading the parquet file has a
# transient peak of its own, which ru_maxrss would keep
MEASURE = """
import sys, time
from pathlib import Path
import pyarrow.parquet as pq
from lightning_opd.artifacts import _check_top_k

def status_kib(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))

table = pq.read_table(sys.argv[1])
open("/proc/self/clear_refs", "w").write("5")
base = status_kib("VmRSS")
start = time.perf_counter()
_check_top_k(Path(sys.argv[1]), table, int(sys.argv[2]))
print(status_kib("VmHWM") - base, time.perf_counter() - start, table.nbytes)
"""


def synthetic_cache(path: Path, tokens: int, k: int) -> None:
    rng = np.random.default_rng(0)
    rows = tokens // ROW_TOKENS
    chunks = []
    for first in range(0, rows, 100):  # 100 rows at a time: the generator's temporaries stay small
        n = min(100, rows - first) * ROW_TOKENS
        probs = rng.dirichlet(np.ones(k + 1), size=n)[:, :k]
        order = np.argsort(-probs, 1)
        chunks.append((np.log(np.take_along_axis(probs, order, 1)).astype(np.float16),
                       rng.permutation(512)[:k][None, :].repeat(n, 0).astype(np.int32)))
    logprobs = np.concatenate([c[0] for c in chunks]).ravel()
    ids = np.concatenate([c[1] for c in chunks]).ravel()
    token_offsets = pa.array(np.arange(0, rows * ROW_TOKENS + 1, ROW_TOKENS, dtype=np.int32))
    value_offsets = pa.array(np.arange(0, rows * ROW_TOKENS * k + 1, ROW_TOKENS * k, dtype=np.int64))
    table = pa.table({
        "id": [f"row-{i}" for i in range(rows)],
        "response_ids": pa.ListArray.from_arrays(token_offsets, pa.array(np.zeros(rows * ROW_TOKENS, np.int32))),
        "teacher_topk_logprobs": pa.LargeListArray.from_arrays(value_offsets, pa.array(logprobs)),
        "teacher_topk_ids": pa.LargeListArray.from_arrays(value_offsets, pa.array(ids)),
    })
    pq.write_table(table, path, row_group_size=1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1_000_000, 4_000_000])
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for tokens in args.tokens:
            path = Path(tmp) / f"cache-{tokens}.parquet"
            synthetic_cache(path, tokens, args.k)
            for _ in range(args.repeats):
                out = subprocess.run([sys.executable, "-c", MEASURE, str(path), str(args.k)], check=True,
                                     capture_output=True, text=True).stdout.split()
                peak_kib, seconds, table_bytes = int(out[0]), float(out[1]), int(out[2])
                print(f"{tokens:>11,} tokens x k {args.k}: checks' peak RSS +{peak_kib / 1024:6.0f} MiB over the "
                      f"loaded table ({table_bytes / 2**20:.0f} MiB), {peak_kib * 1024 / tokens:5.0f} bytes per "
                      f"token, {seconds:.2f} s", flush=True)


if __name__ == "__main__":
    main()
