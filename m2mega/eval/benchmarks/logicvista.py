"""LogicVista (Xiao et al., 2024): 448 multiple-choice logical-reasoning questions on images.

Release: ``Yijia-Xiao/LogicVista`` ``data/dataset.json``, an object keyed by question id with fields
``imagename`` (under ``data/images/``), ``question``, ``answer`` (one or several options: ``"C"``,
``"A, C"``, or option numbers ``"3"``), ``skill`` (list: inductive, deductive, numerical, spatial,
mechanical), ``capability`` (list: diagram, ocr).

Scoring (the authors' ``eval/``): an LLM extracts the chosen options, right when they are exactly the
answer's set. Here the set is read by rule from the final answer: standalone capital letters (or numbers,
when the answer's options are numbers). Accuracy overall, per skill and per capability.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Sequence

from .base import BenchItem, BenchmarkSpec, accuracy_table, final_answer, image_of, rows

_LETTER_RE = re.compile(r"(?<![A-Za-z])([A-Z])(?![A-Za-z])")
_DIGITS_RE = re.compile(r"(?<![\d.])(\d+)(?![\d.])")


def _options(text: str, numeric: bool) -> frozenset[str]:
    return frozenset((_DIGITS_RE if numeric else _LETTER_RE).findall(text))


def load(path: str, **_: Any) -> list[BenchItem]:
    base = os.path.dirname(os.path.abspath(path))
    img_dir = os.path.join(base, "images")
    items = []
    for n, row, where in rows(path, ("question", "answer", "imagename"), id_key="id"):
        items.append(BenchItem(
            id=str(row.get("id", n)), text=row["question"], images=image_of(row["imagename"], img_dir, where),
            record={"answer": str(row["answer"]), "skill": list(row.get("skill") or []),
                    "capability": list(row.get("capability") or [])}))
    return items


def score(record: Mapping[str, Any], response: str) -> dict[str, Any]:
    gt = record["answer"]
    numeric = re.fullmatch(r"\s*\d+(\s*,\s*\d+)*\s*", gt) is not None
    pred = _options(final_answer(response), numeric)
    gold = _options(gt, numeric)
    return {"pred": ", ".join(sorted(pred)), "score": float(bool(gold) and pred == gold)}


def aggregate(scored: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return accuracy_table(scored, {"skill": "skill", "capability": "capability"})


SPEC = BenchmarkSpec(name="logicvista", headline="accuracy", load=load, score=score, aggregate=aggregate,
                     formats="data/dataset.json (object keyed by id), images under data/images/")
