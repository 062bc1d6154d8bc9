"""We-Math (Qiao et al., 2024): multiple-choice math problems decomposed into one-step sub-problems.

Release: ``We-Math/We-Math`` ``testmini.json`` (a list; parquet too) with fields ``ID`` (the problem id,
shared by a problem's rows), ``key`` (``2steps_1``, ``2steps_2``, ``2steps_multi``, ``3steps_1`` ...
``3steps_multi``), ``question``, ``option``, ``answer`` (a letter), ``image_path``, ``knowledge concept``.

Scoring (the authors' ``evaluation/four_dimensional_metrics.py``): a row is right when the letter read
from the response (the text after its last "Answer", stripped of ``<>:.``, first character if in A-H)
equals ``answer``. Each problem with all of its rows is one of, for its one-step rows s_i and its
multi-step row m:

- IK (insufficient knowledge): some s_i wrong and m wrong;
- IG (inadequate generalization): every s_i right and m wrong;
- CM (complete mastery): strict every s_i right, loose some s_i right, and m right;
- RM (rote memorization): strict some s_i wrong, loose every s_i wrong, and m right.

Score = (N - 0.5 IG - RM - IK) / N, strict and loose, with N = the number of problems (525 in testmini,
the constant in the official script). Rates: IK/N, IG/N, CM/N, RM/(CM + RM). Also the authors'
``accuracy.py`` one-step (S1), two-step (S2) and three-step (S3) accuracies.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Sequence

from .base import BenchDataError, BenchItem, BenchmarkSpec, final_answer, image_of, mean, rows

_KEY_RE = re.compile(r"^([23])steps_(\d|multi)$")
_STRIP_RE = re.compile(r"[><:.]")


def load(path: str, **_: Any) -> list[BenchItem]:
    base = os.path.dirname(os.path.abspath(path))
    items, seen = [], set()
    for n, row, where in rows(path, ("ID", "key", "question", "answer")):
        m = _KEY_RE.match(str(row["key"]))
        if not m:
            raise BenchDataError(f"{where}: key {row['key']!r} is not <2|3>steps_<i|multi>")
        if (row["ID"], row["key"]) in seen:
            raise BenchDataError(f"{where}: ID {row['ID']!r} has two {row['key']!r} rows")
        seen.add((row["ID"], row["key"]))
        text = row["question"] + ("\n" + row["option"] if row.get("option") else "")
        items.append(BenchItem(
            id=f"{row['ID']}/{row['key']}", text=text, images=image_of(row.get("image_path"), base, where),
            record={"ID": str(row["ID"]), "key": row["key"], "answer": str(row["answer"]).strip()}))
    return items


def answer_letter(response: str) -> str | None:
    """The official reading, applied to the extracted final answer."""
    s = _STRIP_RE.sub("", final_answer(response).split("Answer")[-1].strip()).strip()
    return s[0] if s and s[0] in "ABCDEFGH" else None


def score(record: Mapping[str, Any], response: str) -> dict[str, Any]:
    pred = answer_letter(response)
    return {"pred": pred, "score": float(pred == record["answer"])}


def four_dimensional(scored: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The four-dimensional metrics from per-row ``ID``, ``key`` and ``score``; problems missing a row are
    left out and counted under ``incomplete_problems``."""
    problems: dict[tuple[str, str], dict[str, bool]] = {}
    for r in scored:
        steps, part = _KEY_RE.match(r["key"]).groups()
        problems.setdefault((steps, r["ID"]), {})[part] = r["score"] == 1.0
    c = dict(IK=0, IG=0, CM_strict=0, CM_loose=0, RM_strict=0, RM_loose=0)
    one_step: list[bool] = []
    multi: dict[str, list[bool]] = {"2": [], "3": []}
    incomplete = 0
    for (steps, _), parts in problems.items():
        need = [str(i) for i in range(1, int(steps) + 1)]
        if any(p not in parts for p in need + ["multi"]):
            incomplete += 1
            continue
        s = [parts[p] for p in need]
        m = parts["multi"]
        one_step += s
        multi[steps].append(m)
        if m:
            c["CM_strict"] += all(s)
            c["CM_loose"] += any(s)
            c["RM_strict"] += not all(s)
            c["RM_loose"] += not any(s)
        else:
            c["IG"] += all(s)
            c["IK"] += not all(s)
    n = len(multi["2"]) + len(multi["3"])
    if n == 0:
        raise BenchDataError("WeMath: no complete problem (every step row and the multi-step row of one ID)")
    out: dict[str, Any] = {
        "score_strict": (n - 0.5 * c["IG"] - c["RM_strict"] - c["IK"]) / n,
        "score_loose": (n - 0.5 * c["IG"] - c["RM_loose"] - c["IK"]) / n,
        "problems": n, "incomplete_problems": incomplete,
        "IK": c["IK"] / n, "IG": c["IG"] / n, "CM_strict": c["CM_strict"] / n, "CM_loose": c["CM_loose"] / n}
    for k in ("strict", "loose"):
        cm, rm = c[f"CM_{k}"], c[f"RM_{k}"]
        out[f"RM_{k}"] = rm / (cm + rm) if cm + rm else float("nan")
    out.update({f"count/{k}": v for k, v in c.items()})
    out.update({"S1": mean(one_step), "S2": mean(multi["2"]), "S3": mean(multi["3"])})
    return out


def aggregate(scored: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return {**four_dimensional(scored), "n": len(scored), "accuracy_all": mean(r["score"] for r in scored)}


SPEC = BenchmarkSpec(name="wemath", headline="score_strict", load=load, score=score, aggregate=aggregate,
                     formats="testmini.json (list of rows with ID/key/question/option/answer/image_path)")
