"""avg@k scoring shared by the lm-eval tasks of this package: every one of
the k sampled answers per problem is checked with math-verify against the
gold answer; a problem's score is the fraction right, and the mean over
problems is avg@k.

A task file points at it by module path (lm-eval imports it like any module):
``process_results: !function lightning_opd.lm_eval_tasks.answer_check.avg_at_k``."""
from __future__ import annotations

from math_verify import parse, verify


def final_part(response: str) -> str:
    """The part of a response that holds its answer. A reasoning model's answer
    follows its thinking; one still thinking when it hit the length limit has
    given none (math-verify would otherwise take the last number it wrote)."""
    if "</think>" in response:
        return response.rsplit("</think>", 1)[1]
    return "" if "<think>" in response else response


def is_correct(response: str, answer: str) -> bool:
    gold = parse(f"${answer}$")
    return bool(gold) and bool(verify(gold, parse(final_part(response))))


def avg_at_k(doc: dict, results: list) -> dict[str, float]:
    # with repeats=k and the take_first_k filter, results holds one list of k responses
    responses = results[0] if results and isinstance(results[0], list) else results
    correct = [is_correct(r, str(doc["answer"])) for r in responses]
    return {"avg_at_k": sum(correct) / len(correct), "pass_at_k": float(any(correct))}
