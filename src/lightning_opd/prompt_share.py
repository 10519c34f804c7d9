"""Multi-round Lightning OPD: share I of N of the OPD prompts, the prompts of
round I (rows I-1, I-1+N, I-1+2N, ...: interleaved, so that every round sees
the same mix of problems). The shares of 1..N are disjoint and cover the set."""
from __future__ import annotations

import argparse
from pathlib import Path

from lightning_opd.artifacts import TASK_SCHEMA, ArtifactError, read_table, write_table
from lightning_opd.provenance import file_sha256
from lightning_opd.shards import Part


def share_rows(n_rows: int, share: Part) -> list[int]:
    return list(range(share.index - 1, n_rows, share.count))


def write_share(prompts: Path, share: Part, out: Path) -> int:
    table, meta = read_table(prompts, TASK_SCHEMA, keep_other_columns=True)
    rows = share_rows(table.num_rows, share)
    if not rows:
        raise ArtifactError(f"{prompts}: {table.num_rows} prompts cannot make {share.count} non-empty shares "
                            "(lightning_opd.rounds or a variant's rounds): lower the rounds or add OPD prompts")
    write_table(out, table.take(rows), table.schema.remove_metadata(), {
        **meta, "stage": "prompt_share", "share": str(share),
        "source": {"path": str(prompts), "sha256": file_sha256(prompts)}})
    return len(rows)


def share_ids(path: Path) -> set[str]:
    """The prompt ids of a share written by this module."""
    table, meta = read_table(path, TASK_SCHEMA)
    if meta.get("stage") != "prompt_share":
        raise ArtifactError(f"{path}: not a prompt share (its metadata says stage {meta.get('stage')!r}); "
                            "delete it and rerun the prompt_share stage")
    return set(table.column("id").to_pylist())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=Path, required=True, help="task parquet (id, problem, answer)")
    parser.add_argument("--share", type=Part.parse, required=True, help="I-of-N: share I of N")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    n = write_share(args.prompts, args.share, args.out)
    print(f"share {args.share} of {args.prompts}: {n} prompts -> {args.out}")


if __name__ == "__main__":
    main()
