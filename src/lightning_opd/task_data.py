"""Stage 1: write the synthetic task (see `lightning_opd.task`) as four disjoint
splits: gold solutions for building teachers, SFT prompts, OPD prompts and a
held-out evaluation set, as parquet with the fields a real math set has
(``id``, ``problem``, ``answer``, ``solution``).
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Any

from lightning_opd.artifacts import TASK_SCHEMA, ArtifactError, write_table
from lightning_opd.hparams import TaskParams, from_dict, parse_hparams
from lightning_opd.task import evaluate_chain, gold_solution, make_problem, problem_text

SPLITS = ("teacher", "sft", "opd", "eval")


def build_splits(params: TaskParams) -> dict[str, list[dict]]:
    rng = random.Random(params.seed)
    sizes = {"teacher": params.n_teacher, "sft": params.n_sft, "opd": params.n_opd, "eval": params.n_eval}
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {}
    attempts_left = 100 * sum(sizes.values())
    for split in SPLITS:
        rows = []
        while len(rows) < sizes[split]:
            attempts_left -= 1
            if attempts_left < 0:
                raise ValueError(
                    f"cannot draw {sum(sizes.values())} distinct problems with "
                    f"operands in 1..{params.max_operand} and "
                    f"{params.min_operands}-{params.max_operands} operands; widen the task"
                )
            expression, operands, ops = make_problem(rng, params)
            if expression in seen:
                continue
            seen.add(expression)
            steps = evaluate_chain(operands, ops)
            rows.append({
                "id": f"{split}-{len(rows):06d}",
                "problem": problem_text(expression),
                "answer": str(steps[-1][3]),
                "solution": gold_solution(operands, ops, "chain"),
                "solution_words": gold_solution(operands, ops, "words"),
            })
        splits[split] = rows
    return splits


def recorded_task(path: Path | str, meta: dict[str, Any]) -> TaskParams:
    """The task params a split of this stage records (``meta``: its provenance, as `read_table` returns it)."""
    if not isinstance(meta.get("params"), dict):
        raise ArtifactError(f"{path}: the provenance records no task params; this needs a split of the embedded "
                            "synthetic task (lightning_opd.task_data), not prepared data")
    return from_dict(TaskParams, meta["params"], f"{path}: the task's params")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, required=True, help="writes sft.parquet, opd.parquet, eval.parquet")
    parser.add_argument("--hparams", default="{}", help="JSON object of TaskParams fields")
    args = parser.parse_args(argv)
    params = parse_hparams(TaskParams, args.hparams)
    for split, rows in build_splits(params).items():
        write_table(args.out_dir / f"{split}.parquet", rows, TASK_SCHEMA,
                    {"stage": "task_data", "split": split, "params": params.__dict__})
        print(f"{split}: {len(rows)} problems -> {args.out_dir / f'{split}.parquet'}")


if __name__ == "__main__":
    main()
