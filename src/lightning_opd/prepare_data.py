"""Stage 1 at paper scale: turn a math dataset (a hub id or a local
parquet/JSONL/JSON file, read with `datasets`) into a task parquet with the
pipeline's fields (id, problem, answer). Fields are given as dotted paths so
that nested layouts work: OpenThoughts3 ``conversations.0.value``,
DAPO-Math-17k ``prompt.0.content`` and ``reward_model.ground_truth``, AIME
2024 ``Problem`` and ``Answer``."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lightning_opd.artifacts import TASK_SCHEMA, ArtifactError, write_table

LOCAL_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


def field(row: dict[str, Any], path: str) -> Any:
    value: Any = row
    for part in path.split("."):
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value


def load_rows(source: str, split: str, limit: int | None):
    from datasets import load_dataset

    path = Path(source)
    if path.suffix in LOCAL_FORMATS:
        if not path.is_file():
            raise ArtifactError(f"{path}: file not found")
        dataset = load_dataset(LOCAL_FORMATS[path.suffix], data_files={split: str(path)}, split=split)
    else:
        dataset = load_dataset(source, split=split)
    return dataset.select(range(min(limit, len(dataset)))) if limit else dataset


def prepare(source: str, out: Path, split: str, problem_field: str, answer_field: str | None,
            name: str, limit: int | None = None) -> int:
    rows = []
    for index, row in enumerate(load_rows(source, split, limit)):
        try:
            problem = str(field(row, problem_field))
            answer = str(field(row, answer_field)) if answer_field else ""
        except (KeyError, IndexError, TypeError) as error:
            raise ArtifactError(f"{source}: row {index} has no field {problem_field!r} / {answer_field!r} ({error!r})") from None
        rows.append({"id": f"{name}-{index:07d}", "problem": problem, "answer": answer,
                     "solution": "", "solution_words": ""})
    write_table(out, rows, TASK_SCHEMA, {"stage": "prepare_data", "source": source, "split": split,
                                         "problem_field": problem_field, "answer_field": answer_field})
    return len(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="hub dataset id, or a local .parquet/.jsonl/.json/.csv")
    parser.add_argument("--split", default="train")
    parser.add_argument("--problem-field", required=True, help="dotted path, e.g. prompt.0.content")
    parser.add_argument("--answer-field", default=None, help="dotted path; none for SFT prompts")
    parser.add_argument("--name", required=True, help="id prefix, e.g. sft / opd / eval")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    n = prepare(args.source, args.out, args.split, args.problem_field, args.answer_field, args.name, args.limit)
    print(f"{n} problems from {args.source} -> {args.out}")


if __name__ == "__main__":
    main()
