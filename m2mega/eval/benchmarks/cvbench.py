"""CV-Bench (Tong et al., "Cambrian-1", 2024): 2D (count, relation; ADE20K and COCO images) and 3D
(depth, distance; Omni3D images) multiple-choice questions.

Release: ``nyu-visionx/CV-Bench`` ``test_2d.jsonl`` + ``test_3d.jsonl`` (or the older single
``test.jsonl``; parquet too), images under ``img/``; fields ``idx``, ``type`` (2D/3D), ``task``,
``question``, ``choices``, ``answer`` (``"(A)"``), ``prompt`` (question + lettered choices), ``filename``
(``img/2D/count/ade20k_10.png``), ``source`` (ADE20K / COCO / Omni3D). ``--data`` may be one of those
files or the folder holding them.

Scoring (the authors' formula, as in lmms-eval's ``cv_bench``): the predicted letter is the first letter
of the answer, optionally in parentheses; accuracy per source; CV-Bench =
1/2 * ((acc_ADE20K + acc_COCO) / 2 + acc_Omni3D).
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Sequence

from .base import (BenchDataError, BenchItem, BenchmarkSpec, final_answer, group_accuracy, image_of, mean,
                   option_letters, require, rows)

SOURCES = ("ADE20K", "COCO", "Omni3D")
_LETTER_RE = re.compile(r"[\(\s]*([A-Z])[\)\.\s]*", re.IGNORECASE)
_FILES = ("test_2d.jsonl", "test_3d.jsonl")


def _files(path: str) -> list[str]:
    if not os.path.isdir(path):
        return [path]
    found = [os.path.join(path, f) for f in _FILES if os.path.isfile(os.path.join(path, f))]
    if not found and os.path.isfile(os.path.join(path, "test.jsonl")):
        found = [os.path.join(path, "test.jsonl")]
    if not found:
        raise BenchDataError(f"{path}: no test_2d.jsonl / test_3d.jsonl / test.jsonl in this folder")
    return found


def load(path: str, **_: Any) -> list[BenchItem]:
    items = []
    for f in _files(path):
        base = os.path.dirname(os.path.abspath(f))
        for n, row, where in rows(f, ("answer", "source")):
            if row["source"] not in SOURCES:
                raise BenchDataError(f"{where}: source {row['source']!r} not in {SOURCES}")
            if row.get("prompt"):
                text = row["prompt"]
            else:
                require(row, ("question", "choices"), where)
                text = row["question"] + "\n" + "\n".join(
                    f"({c}) {o}" for c, o in zip(option_letters(len(row["choices"])), row["choices"]))
            img = row.get("image") if isinstance(row.get("image"), (dict, bytes)) else row.get("filename")
            items.append(BenchItem(
                id=str(row.get("idx", f"{os.path.basename(f)}:{n}")), text=text, images=image_of(img, base, where),
                record={"answer": str(row["answer"]).strip("() "), "source": row["source"],
                        "task": row.get("task"), "type": row.get("type")}))
    return items


def answer_letter(text: str) -> str:
    """The official reading: a leading letter, optionally wrapped as ``(B)`` / ``B.`` / ``B)``."""
    m = _LETTER_RE.match(text.strip())
    return m.group(1).upper() if m else ""


def score(record: Mapping[str, Any], response: str) -> dict[str, Any]:
    pred = answer_letter(final_answer(response))
    return {"pred": pred, "score": float(pred == record["answer"])}


def aggregate(scored: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    acc = {s: mean(r["score"] for r in scored if r["source"] == s) for s in SOURCES}
    out: dict[str, Any] = {
        "overall": 0.5 * ((acc["ADE20K"] + acc["COCO"]) / 2 + acc["Omni3D"]),
        "2d": (acc["ADE20K"] + acc["COCO"]) / 2, "3d": acc["Omni3D"], "n": len(scored),
        "accuracy_all": mean(r["score"] for r in scored)}
    out.update({f"source/{s}": acc[s] for s in SOURCES})
    out.update(group_accuracy(scored, "task", "task"))
    return out


SPEC = BenchmarkSpec(name="cvbench", headline="overall", load=load, score=score, aggregate=aggregate,
                     formats="test_2d.jsonl + test_3d.jsonl (or the folder holding them), images under img/")
