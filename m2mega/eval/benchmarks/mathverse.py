"""MathVerse (Zhang et al., 2024): 788 math problems in 6 versions that move information from the text
into the diagram (Text Dominant, Text Lite, Vision Intensive, Vision Dominant, Vision Only; Text Only).

Release: ``AI4Math/MathVerse`` ``testmini.json`` (and ``testmini_text_only.json``), images under
``images/``; fields ``sample_index``, ``problem_index``, ``problem_version``, ``question``, ``image``,
``answer`` (a letter for multi-choice), ``question_type`` (``multi-choice`` / ``free-form``),
``query_wo`` / ``query_cot`` (the official prompts without / with a chain-of-thought instruction),
``question_for_eval``, ``metadata`` (``subject``, ``subfield``, ...).

Scoring: the authors extract the answer and judge it against the ground truth with GPT-4. The rule-based
part here: multi-choice by the option letter read from the final answer (``parse_choice``), free-form by
``math_equal``. A judge model plugs in through ``judge(question_for_eval, answer, response) -> bool``
(``--judge module:function``): when given it decides every sample, as the official pipeline does.
Accuracy overall, per problem version and per subfield.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Sequence

from m2mega.rewards import math_equal, parse_choice

from .base import BenchItem, BenchmarkSpec, accuracy_table, final_answer, row_image, rows

Judge = Callable[[str, str, str], bool]
VERSIONS = ("Text Dominant", "Text Lite", "Vision Intensive", "Vision Dominant", "Vision Only", "Text Only")


def load(path: str, prompt: str = "query_wo", **_: Any) -> list[BenchItem]:
    base = os.path.dirname(os.path.abspath(path))
    items = []
    for n, row, where in rows(path, ("question", "answer", "question_type", "problem_version"), id_key="sample_index"):
        record = {"answer": str(row["answer"]), "question_type": row["question_type"],
                  "problem_version": row["problem_version"], "subfield": (row.get("metadata") or {}).get("subfield"),
                  "question_for_eval": row.get("question_for_eval") or row["question"]}
        items.append(BenchItem(id=str(row.get("sample_index", n)), text=row.get(prompt) or row["question"],
                               images=row_image(row, base, where), record=record))
    return items


def rule_correct(record: Mapping[str, Any], response: str) -> tuple[str, bool]:
    pred = final_answer(response)
    if record["question_type"] == "multi-choice":
        return pred, parse_choice(pred) == record["answer"].strip()
    return pred, math_equal(pred, record["answer"])


def make_score(judge: Judge | None = None) -> Callable[[Mapping[str, Any], str], dict[str, Any]]:
    """The per-sample scorer: rule-based, or ``judge``'s verdict on the full response when given."""

    def score(record: Mapping[str, Any], response: str) -> dict[str, Any]:
        pred, ok = rule_correct(record, response)
        if judge is not None:
            return {"pred": pred, "rule_score": float(ok), "scored_by": "judge",
                    "score": float(bool(judge(record["question_for_eval"], record["answer"], response)))}
        return {"pred": pred, "score": float(ok), "scored_by": "rule"}

    return score


def aggregate(scored: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return accuracy_table(scored, {"problem_version": "version", "subfield": "subfield"})


SPEC = BenchmarkSpec(name="mathverse", headline="accuracy", load=load, score=make_score(), aggregate=aggregate,
                     formats="testmini.json (list), images under images/")
