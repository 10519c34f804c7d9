"""avg@k scoring for lm-eval generation tasks: every one of the k sampled
answers per problem is checked with math-verify against the gold answer;
a problem's score is the fraction right, and the mean over problems is avg@k."""
from __future__ import annotations

from math_verify import parse, verify


def is_correct(response: str, answer: str) -> bool:
    gold = parse(f"${answer}$")
    return bool(gold) and bool(verify(gold, parse(response)))


def avg_at_k(doc: dict, results: list) -> dict[str, float]:
    # with repeats=k and the take_first_k filter, results holds one list of k responses
    responses = results[0] if results and isinstance(results[0], list) else results
    correct = [is_correct(r, str(doc["answer"])) for r in responses]
    return {"avg_at_k": sum(correct) / len(correct), "pass_at_k": float(any(correct))}
