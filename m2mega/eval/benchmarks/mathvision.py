"""MATH-Vision (Wang et al., 2024): competition math problems with a figure, multiple choice and free form.

Release: ``mathllm/MATH-V`` ``data/test.jsonl`` / ``data/testmini.jsonl`` (parquet on the hub);
fields ``id``, ``question``, ``options`` (list, empty for free form), ``image`` (``images/1.jpg``),
``answer`` (a letter for multiple choice), ``solution``, ``level`` (1-5), ``subject``.

Scoring (the authors' ``evaluation/evaluate``, also lmms-eval's ``mathvision_standard_eval``): right when
the final answer equals the ground truth or, for multiple choice, the text of the right option; equality
here is the training rewards' letter reading (``parse_choice``) for letters and ``math_equal`` (numeric
and symbolic equivalence) for values. Accuracy overall, per subject and per level.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from m2mega.rewards import math_equal, parse_choice

from .base import BenchItem, BenchmarkSpec, accuracy_table, final_answer, option_letters, row_image, rows


def prompt_text(row: Mapping[str, Any]) -> str:
    opts = row.get("options") or []
    if not opts:
        return row["question"]
    return row["question"] + "\nChoices: " + "\n".join(f"{c}. {o}" for c, o in zip(option_letters(len(opts)), opts))


def load(path: str, **_: Any) -> list[BenchItem]:
    base = os.path.dirname(os.path.abspath(path))
    items = []
    for n, row, where in rows(path, ("question", "answer"), id_key="id"):
        items.append(BenchItem(
            id=str(row.get("id", n)), text=prompt_text(row), images=row_image(row, base, where),
            record={"answer": str(row["answer"]), "options": [str(o) for o in row.get("options") or []],
                    "subject": row.get("subject"), "level": row.get("level")}))
    return items


def score(record: Mapping[str, Any], response: str) -> dict[str, Any]:
    pred = final_answer(response)
    gt, opts = record["answer"], record["options"]
    if opts:
        letters = option_letters(len(opts))
        ok = parse_choice(pred, len(opts)) == gt
        if not ok and gt in letters:
            ok = math_equal(pred, opts[letters.index(gt)])
    else:
        ok = math_equal(pred, gt)
    return {"pred": pred, "score": float(bool(ok))}


def aggregate(scored: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return accuracy_table(scored, {"subject": "subject", "level": "level"})


SPEC = BenchmarkSpec(name="mathvision", headline="accuracy", load=load, score=score, aggregate=aggregate,
                     formats="data/test.jsonl or data/testmini.jsonl, images under images/")
