"""The eight benchmarks of the M2-Reasoning paper, each loaded from its released files and scored the way
its authors score it (headline number + sub-scores). ``get(name)`` returns a
:class:`~m2mega.eval.benchmarks.base.BenchmarkSpec`; ``score_all`` scores responses and aggregates.

The paper reports six general benchmarks (MathVista, MathVision, MathVerse, DynaMath, WeMath, LogicVista)
and two spatial ones, each on its own: CV-Bench (the 82.3 figure) and VSI-Bench (42.3).
"""

from __future__ import annotations

from typing import Any, Sequence

from . import cvbench, dynamath, logicvista, mathverse, mathvision, mathvista, vsibench, wemath
from .base import BenchDataError, BenchItem, BenchmarkSpec, final_answer

BENCHMARKS: dict[str, BenchmarkSpec] = {
    m.SPEC.name: m.SPEC for m in (mathvista, mathvision, mathverse, dynamath, wemath, logicvista, cvbench, vsibench)
}

__all__ = ["BENCHMARKS", "BenchDataError", "BenchItem", "BenchmarkSpec", "final_answer", "get", "score_all"]


def get(name: str) -> BenchmarkSpec:
    key = name.lower().replace("-", "").replace("_", "")
    if key not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    return BENCHMARKS[key]


def score_all(spec: BenchmarkSpec, items: Sequence[BenchItem], responses: Sequence[str],
              score=None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-sample records (``id``, the item's record, the response and its score fields) and the
    aggregate. ``score`` overrides the spec's per-sample scorer (MathVerse's judge)."""
    if len(items) != len(responses):
        raise ValueError(f"{len(items)} items but {len(responses)} responses")
    score = score or spec.score
    scored = [{"id": it.id, **it.record, "response": r, **score(it.record, r)} for it, r in zip(items, responses)]
    return scored, spec.aggregate(scored)
