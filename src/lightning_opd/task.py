"""The synthetic verifiable task: chains of additions and subtractions of small
integers, worked left to right one equation per step, answer in ``\\boxed{}``.

Shared by the stages that write task data and that build models for it.
"""
from __future__ import annotations

import random

from lightning_opd.hparams import TaskParams

SOLUTION_STYLES = ("chain", "words")


def make_problem(rng: random.Random, params: TaskParams) -> tuple[str, list[int], list[str]]:
    n_operands = rng.randint(params.min_operands, params.max_operands)
    operands = [rng.randint(1, params.max_operand) for _ in range(n_operands)]
    ops = [rng.choice("+-") for _ in range(n_operands - 1)]
    expression = str(operands[0]) + "".join(f" {op} {x}" for op, x in zip(ops, operands[1:]))
    return expression, operands, ops


def evaluate_chain(operands: list[int], ops: list[str]) -> list[tuple[int, str, int, int]]:
    """The left-to-right steps (left, op, right, result) of a chain."""
    steps, value = [], operands[0]
    for op, x in zip(ops, operands[1:]):
        result = value + x if op == "+" else value - x
        steps.append((value, op, x, result))
        value = result
    return steps


def gold_solution(operands: list[int], ops: list[str], style: str = "chain") -> str:
    """A step-by-step solution. Two styles solve the same problem differently,
    so that two teachers can be equally right but disagree token by token."""
    steps = evaluate_chain(operands, ops)
    answer = steps[-1][3]
    if style == "chain":
        body = " ".join(f"{a} {op} {b} = {r}." for a, op, b, r in steps)
        return f"{body} The answer is \\boxed{{{answer}}}."
    if style == "words":
        verbs = {"+": "plus", "-": "minus"}
        body = " ".join(f"{a} {verbs[op]} {b} gives {r};" for a, op, b, r in steps)
        return f"Step by step: {body} so the result is \\boxed{{{answer}}}."
    raise ValueError(f"unknown solution style {style!r}; expected 'chain' or 'words'")


def problem_text(expression: str) -> str:
    return f"Compute {expression}."


def arithmetic_facts(params: TaskParams) -> list[str]:
    """Every single step that a chain of this task can contain, as text: the
    knowledge a "base" model has before it learns to solve whole problems."""
    low = params.max_operands * -params.max_operand
    high = params.max_operands * params.max_operand
    facts = []
    for left in range(low, high + 1):
        for right in range(1, params.max_operand + 1):
            for op in "+-":
                result = left + right if op == "+" else left - right
                if low <= result <= high:
                    facts.append(f"{left} {op} {right} = {result}.")
    return facts
