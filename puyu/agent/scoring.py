"""Closed-form scoring as InfiAgent-DABench does it.

An answer is written `@name[value]`; when a name occurs twice the last value counts. A predicted value is correct
when it equals the label as a string, or both parse as numbers within 1e-6. Three accuracies: by question (every
sub-answer right), proportional by sub-question (the mean over questions of the fraction right), and by sub-question
(all sub-answers pooled).
"""
from __future__ import annotations

import re
from typing import Optional

_ANSWER = re.compile(r"@(\w+)\[(.*?)\]")


def extract_answers(text: str) -> dict[str, str]:
    return {name: value for name, value in _ANSWER.findall(text or "")}


def is_equal(predicted: Optional[str], label: str) -> bool:
    if predicted is None:
        return False
    if predicted == label:
        return True
    try:
        return abs(float(predicted) - float(label)) < 1e-6
    except ValueError:
        return False


def score_answer(response: str, labels: dict[str, str]) -> dict:
    """{'predicted': {...}, 'correctness': {name: bool}} for one task's final answer."""
    predicted = extract_answers(response)
    return {"predicted": predicted, "correctness": {n: is_equal(predicted.get(n), v) for n, v in labels.items()}}


def accuracies(scored: list[dict]) -> dict[str, Optional[float]]:
    """The three DABench accuracies over scored tasks (each a `score_answer` result); None when nothing is scored."""
    scored = [s for s in scored if s["correctness"]]
    if not scored:
        return {"by_question": None, "proportional_by_sub_question": None, "by_sub_question": None}
    by_question = sum(all(s["correctness"].values()) for s in scored) / len(scored)
    proportional = sum(sum(s["correctness"].values()) / len(s["correctness"]) for s in scored) / len(scored)
    pooled = sum(sum(s["correctness"].values()) for s in scored) / sum(len(s["correctness"]) for s in scored)
    return {"by_question": round(by_question, 4), "proportional_by_sub_question": round(proportional, 4),
            "by_sub_question": round(pooled, 4)}


def normalise_labels(raw, where: str) -> dict[str, str]:
    """Labels as `{name: value}` from a dict, DABench's `[[name, value], ...]`, or an `@name[value]` string."""
    if raw is None:
        return {}
    if isinstance(raw, str):
        labels = extract_answers(raw)
        if not labels:
            raise ValueError(f"{where}: answer string has no @name[value] items")
        return labels
    if isinstance(raw, dict):
        return {str(k): str(v) for k, v in raw.items()}
    if isinstance(raw, list) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in raw):
        return {str(k): str(v) for k, v in raw}
    raise ValueError(f"{where}: answers must be an object, a list of [name, value] pairs or an @name[value] string")
