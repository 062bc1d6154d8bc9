"""MathVista (Lu et al., 2023): visual math questions, multiple choice and free form.

Release: ``AI4Math/MathVista`` ``annot_testmini.json`` (an object keyed by ``pid``; a list or JSONL
works too; parquet ``data/testmini-*.parquet`` with ``decoded_image``), images under ``images/``; fields
``pid``, ``question``, ``image``, ``choices`` (null for free form), ``precision``, ``answer`` (for
multiple choice the option's text), ``question_type`` (``multi_choice`` / ``free_form``),
``answer_type`` (``text`` / ``integer`` / ``float`` / ``list``), ``query`` (the official prompt: hint,
question, choices), ``metadata`` (``task``, ``context``, ``grade``, ``skills``, ...).

Scoring (the authors' ``calculate_score.py``): the extracted answer is normalised by type: multiple
choice: a letter (also ``(B)``) maps to its option, anything else to the option nearest by edit
distance; ``integer``: ``str(int(float(x)))`` (truncates); ``float``: ``str(round(float(x),
precision))``; ``list``: ``str(x)``; right when equal to ``answer`` as stripped strings. The official
extraction step is a GPT prompt; here the answer is the response's final answer (``<answer>`` /
``\\boxed``), and for integer/float types a number read from it when it is not a bare number.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Sequence

from m2mega.rewards import parse_number

from .base import (BenchItem, BenchmarkSpec, accuracy_table, final_answer, levenshtein, option_letters, row_image,
                   rows)

_PAREN_LETTER_RE = re.compile(r"\(([a-zA-Z])\)")


def prompt_text(row: Mapping[str, Any]) -> str:
    if row.get("query"):
        return row["query"]
    text = row["question"]
    if row.get("choices"):
        text += "\nChoices:\n" + "\n".join(f"({c}) {o}" for c, o in zip(option_letters(len(row["choices"])), row["choices"]))
    return text


def load(path: str, **_: Any) -> list[BenchItem]:
    base = os.path.dirname(os.path.abspath(path))
    items = []
    for n, row, where in rows(path, ("question", "answer", "question_type", "answer_type"), id_key="pid"):
        meta = row.get("metadata") or {}
        items.append(BenchItem(
            id=str(row.get("pid", n)), text=prompt_text(row), images=row_image(row, base, where),
            record={"answer": str(row["answer"]), "choices": list(row.get("choices") or []),
                    "question_type": row["question_type"], "answer_type": row["answer_type"],
                    "precision": row.get("precision"), "task": meta.get("task"), "context": meta.get("context"),
                    "grade": meta.get("grade"), "skills": list(meta.get("skills") or [])}))
    return items


def _number_text(x: str) -> str:
    try:
        float(x)
        return x
    except ValueError:
        p = parse_number(x)
        return repr(p.value) if p is not None else x


def normalize(extraction: str, choices: Sequence[str], question_type: str, answer_type: str,
              precision: Any) -> str | None:
    """The official normalisation of an extracted answer (see module docstring)."""
    if question_type == "multi_choice":
        extraction = extraction.strip()
        letter = _PAREN_LETTER_RE.findall(extraction)
        if letter:
            extraction = letter[0].upper()
        options = option_letters(len(choices))
        if extraction in options:
            return choices[options.index(extraction)]
        dist = [levenshtein(extraction, c) for c in choices]
        return choices[dist.index(min(dist))]
    if answer_type == "integer":
        try:
            return str(int(float(_number_text(extraction))))
        except (ValueError, OverflowError):
            return None
    if answer_type == "float":
        try:
            v = float(_number_text(extraction))
            return str(round(v, int(precision)) if precision is not None else round(v))
        except (ValueError, OverflowError):
            return None
    return str(extraction)


def score(record: Mapping[str, Any], response: str) -> dict[str, Any]:
    pred = normalize(final_answer(response), record["choices"], record["question_type"], record["answer_type"],
                     record["precision"])
    ok = pred is not None and str(pred).strip() == str(record["answer"]).strip()
    return {"pred": pred, "score": float(ok)}


def aggregate(scored: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return accuracy_table(scored, {k: k for k in ("task", "skills", "question_type", "answer_type", "grade", "context")})


SPEC = BenchmarkSpec(name="mathvista", headline="accuracy", load=load, score=score, aggregate=aggregate,
                     formats="annot_testmini.json (object keyed by pid) / JSONL / parquet, images under images/")
