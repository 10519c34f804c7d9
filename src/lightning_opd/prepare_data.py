"""Stage 1 at paper scale: turn a math dataset (a hub id or a local
parquet/JSONL/JSON file, read with `datasets`) into a task parquet with the
pipeline's fields (id, problem, answer). Fields are given as dotted paths so
that nested layouts work: OpenThoughts3 ``conversations.0.value``,
DAPO-Math-17k ``prompt.0.content`` and ``reward_model.ground_truth``, AIME
2024 ``Problem`` and ``Answer``.

Problems are deduplicated by their normalised text (whitespace collapsed,
case folded; the first occurrence is kept), then shuffled with ``seed`` (if
given) and cut to ``limit``. ``problem_regex`` (a regular expression with a
named group ``problem``) strips a wrapper that a dataset puts around every
problem, such as DAPO-Math-17k's own answer-format instruction, so that
every stage formats prompts with the config's one ``prompt_template``."""
from __future__ import annotations

import argparse
import random
import re
from pathlib import Path
from typing import Any

from lightning_opd.artifacts import TASK_SCHEMA, ArtifactError, write_table

LOCAL_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


def field(row: dict[str, Any], path: str) -> Any:
    value: Any = row
    for part in path.split("."):
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value


def text_field(row: dict[str, Any], path: str, source: str, index: int) -> str:
    """A field as text; a null or blank one is refused (str() would make a problem or an answer "None")."""
    value = field(row, path)
    if value is None or not str(value).strip():
        raise ArtifactError(f"{source}: row {index}: the field {path!r} is {'null' if value is None else 'blank'}; "
                            "drop such rows from the data set or point the config at another field")
    return str(value)


def is_local(source: str) -> bool:
    return Path(source).suffix in LOCAL_FORMATS


def load_rows(source: str, split: str, revision: str | None = None):
    from datasets import load_dataset

    path = Path(source)
    if is_local(source):
        if not path.is_file():
            raise ArtifactError(f"{path}: file not found; put the data set there or point its "
                                "data.<set>.source in the config at the file")
        try:
            return load_dataset(LOCAL_FORMATS[path.suffix], data_files={split: str(path)}, split=split)
        except Exception as error:  # datasets wraps the reader's error (a truncated parquet, a broken JSON line)
            cause = f": {error.__cause__}" if error.__cause__ else ""
            raise ArtifactError(f"{path}: not a readable {path.suffix[1:]} file ({error}{cause})") from None
    return load_dataset(source, split=split, revision=revision)


def normalised(problem: str) -> str:
    """The text two copies of one problem share: whitespace and case do not count."""
    return " ".join(problem.split()).casefold()


def unwrap(problem: str, pattern: re.Pattern | None, source: str, index: int) -> str:
    if pattern is None:
        return problem
    match = pattern.fullmatch(problem)
    if match is None:
        raise ArtifactError(f"{source}: row {index}: the problem does not match problem_regex "
                            f"{pattern.pattern!r}: {problem[:200]!r}")
    return match.group("problem").strip()


def compile_problem_regex(problem_regex: str | None) -> re.Pattern | None:
    if problem_regex is None:
        return None
    try:
        pattern = re.compile(problem_regex, re.DOTALL)
    except re.error as error:
        raise ValueError(f"problem_regex {problem_regex!r} is not a regular expression: {error}") from None
    if "problem" not in pattern.groupindex:
        raise ValueError(f"problem_regex {problem_regex!r} has no named group (?P<problem>...)")
    return pattern


def prepare(source: str, out: Path, split: str, problem_field: str, answer_field: str | None,
            name: str, limit: int | None = None, seed: int | None = None, revision: str | None = None,
            problem_regex: str | None = None) -> int:
    if limit is not None and limit < 1:
        raise ValueError(f"{source}: limit {limit}: keep at least one problem (leave the limit out to keep all)")
    if limit and seed is None:
        raise ValueError(f"{source}: a limit needs a seed (the first rows of a dataset are not a sample of it)")
    pattern = compile_problem_regex(problem_regex)
    rows, seen, duplicates = [], set(), 0
    for index, row in enumerate(load_rows(source, split, revision)):
        try:
            problem = text_field(row, problem_field, source, index)
            answer = text_field(row, answer_field, source, index) if answer_field else ""
        except (KeyError, IndexError, TypeError) as error:
            raise ArtifactError(
                f"{source}: row {index} has no field {problem_field!r} / {answer_field!r} ({error!r})"
            ) from None
        problem = unwrap(problem, pattern, source, index)
        key = normalised(problem)
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        rows.append(
            {"id": f"{name}-{index:07d}", "problem": problem, "answer": answer, "solution": "", "solution_words": ""}
        )
    unique = len(rows)
    if seed is not None:
        random.Random(seed).shuffle(rows)
    rows = rows[:limit] if limit is not None else rows
    print(
        f"{source}: {unique + duplicates} rows, {duplicates} duplicates dropped, {unique} unique problems"
        + (f", shuffled with seed {seed}" if seed is not None else "")
        + f", {len(rows)} kept",
        flush=True,
    )
    write_table(
        out,
        rows,
        TASK_SCHEMA,
        {
            "stage": "prepare_data",
            "source": source,
            "split": split,
            "revision": None if is_local(source) else revision,
            "problem_field": problem_field,
            "answer_field": answer_field,
            "problem_regex": problem_regex,
            "rows": unique + duplicates,
            "duplicates_dropped": duplicates,
            "seed": seed,
            "limit": limit,
        },
    )
    return len(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="hub dataset id, or a local .parquet/.jsonl/.json/.csv")
    parser.add_argument("--split", default="train")
    parser.add_argument("--revision", default=None, help="hub dataset revision (commit, branch or tag)")
    parser.add_argument("--problem-field", required=True, help="dotted path, e.g. prompt.0.content")
    parser.add_argument(
        "--problem-regex", default=None, help="regular expression with a group (?P<problem>...) that strips a wrapper"
    )
    parser.add_argument("--answer-field", default=None, help="dotted path; none for SFT prompts")
    parser.add_argument("--name", required=True, help="id prefix, e.g. sft / opd / eval")
    parser.add_argument("--seed", type=int, default=None, help="shuffle with this seed before the limit")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        n = prepare(
            args.source,
            args.out,
            args.split,
            args.problem_field,
            args.answer_field,
            args.name,
            args.limit,
            args.seed,
            args.revision,
            args.problem_regex,
        )
    except ValueError as error:  # ArtifactError included: one clear line, no traceback
        raise SystemExit(f"prepare_data: {error}") from None
    print(f"{n} problems from {args.source} -> {args.out}")


if __name__ == "__main__":
    main()
