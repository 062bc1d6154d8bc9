"""DynaMath (Zou et al., 2024): 501 seed questions, each generated as 10 variants (values, functions,
geometry changed by the seed's program).

Release: ``DynaMath/DynaMath_Sample`` splits ``sample_variant1`` ... ``sample_variant10``; fields ``id``
(the seed question, shared by its variants), ``question``, ``image`` (path) / ``decoded_image`` (bytes),
``ground_truth``, ``answer_type`` (``float`` / ``multiple choice`` / free form), ``subject``,
``knowledge_level``. ``--data``: one JSON/JSONL/parquet file whose rows carry a ``variant`` field, or a
folder of per-variant files named after their split (``sample_variant3.jsonl``,
``sample3-00000-of-00001.parquet``, ...).

Answer checks (the authors' ``evaluation/*_json_eval.py``) on the short answer: ``float``: the first
space-separated token read as a number (``k\u03c0`` as k*pi) within 0.001 of the ground truth;
``multiple choice``: the answer itself when one character, else the ground truth among its first 3
characters; other types: the ground truth is a substring. Worst-case accuracy: the fraction of seed
questions answered right in every variant; average accuracy over all rows; reasoning robustness RR =
worst / average.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Mapping, Sequence

from .base import BenchDataError, BenchItem, BenchmarkSpec, final_answer, group_accuracy, mean, row_image, rows

_VARIANT_RE = re.compile(r"sample(?:_variant)?(\d+)")
_EXT = (".json", ".jsonl", ".parquet")


def _sources(path: str) -> list[tuple[str, int | None]]:
    if not os.path.isdir(path):
        return [(path, None)]
    out = []
    for f in sorted(os.listdir(path)):
        m = _VARIANT_RE.match(f)
        if m and f.endswith(_EXT):
            out.append((os.path.join(path, f), int(m.group(1))))
    if not out:
        raise BenchDataError(f"{path}: no sample_variant<K>.jsonl / sample<K>-*.parquet files in this folder")
    return out


def load(path: str, **_: Any) -> list[BenchItem]:
    items = []
    for f, variant in _sources(path):
        base = os.path.dirname(os.path.abspath(f))
        for n, row, where in rows(f, ("id", "question", "ground_truth", "answer_type")):
            v = variant if variant is not None else row.get("variant")
            if v is None:
                raise BenchDataError(f"{where}: no 'variant' field and the file name names no variant")
            text = row["question"]
            if row["answer_type"] == "float":
                text += "Please answer in a floating-point number."  # the authors' prompt suffix
            items.append(BenchItem(
                id=f"{row['id']}/v{v}", text=text, images=row_image(row, base, where),
                record={"seed": str(row["id"]), "variant": int(v), "ground_truth": str(row["ground_truth"]),
                        "answer_type": row["answer_type"], "subject": row.get("subject"),
                        "knowledge_level": row.get("knowledge_level")}))
    return items


def _to_number(text: str) -> float:
    if "\u03c0" in text:
        return float(text.split("\u03c0")[0]) * math.pi
    return float(text)


def check(answer: str, gt: str, answer_type: str) -> bool:
    """The authors' per-type check of a short answer; anything unreadable is wrong."""
    try:
        if answer_type == "float":
            if not answer.isdigit():
                answer = answer.split(" ")[0]
            return abs(_to_number(answer) - float(gt)) <= 0.001
        if answer_type == "multiple choice":
            return answer == gt if len(answer) == 1 else gt in answer[0:3]
        return gt in answer
    except (ValueError, IndexError, OverflowError):
        return False


def score(record: Mapping[str, Any], response: str) -> dict[str, Any]:
    ans = final_answer(response)
    return {"pred": ans, "score": float(check(ans, record["ground_truth"], record["answer_type"]))}


def _worst(scored: Sequence[Mapping[str, Any]]) -> float:
    seeds: dict[str, list[float]] = {}
    for r in scored:
        seeds.setdefault(r["seed"], []).append(r["score"])
    return mean(min(v) for v in seeds.values())


def aggregate(scored: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    per_seed: dict[str, int] = {}
    for r in scored:
        per_seed[r["seed"]] = per_seed.get(r["seed"], 0) + 1
    avg, worst = mean(r["score"] for r in scored), _worst(scored)
    out: dict[str, Any] = {"worst_case": worst, "average": avg, "RR": worst / avg if avg else float("nan"),
                           "n": len(scored), "seeds": len(per_seed),
                           "variants_per_seed_min": min(per_seed.values(), default=0),
                           "variants_per_seed_max": max(per_seed.values(), default=0)}
    for key in ("subject", "knowledge_level"):
        out.update(group_accuracy(scored, key, f"average/{key}"))
        groups = sorted({str(r[key]) for r in scored if r.get(key)})
        out.update({f"worst_case/{key}/{g}": _worst([r for r in scored if str(r.get(key)) == g]) for g in groups})
    return out


SPEC = BenchmarkSpec(name="dynamath", headline="worst_case", load=load, score=score, aggregate=aggregate,
                     formats="per-variant files sample_variant<K>.{jsonl,json,parquet} in a folder, or one file with a 'variant' field")
