"""Evaluation metrics: accuracy, VSI-Bench's Mean Relative Accuracy, per-task/benchmark tables.

MRA follows VSI-Bench's official scorer: for thresholds theta in {0.50, 0.55, ..., 0.95} (10 values),
a prediction counts at theta when ``|pred - gt| / |gt| <= 1 - theta``; MRA is the mean over thresholds,
and a benchmark's MRA the mean over its questions. Unreadable predictions score 0. ``gt = 0`` (absent
from VSI-Bench) is defined as: exact prediction 1, else 0.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from m2mega.rewards import extract_answer, parse_number
from m2mega.rl.tables import format_table  # one table format for validation and benchmarks

__all__ = [
    "MRA_THRESHOLDS",
    "accuracy",
    "mean_relative_accuracy",
    "mra_from_text",
    "aggregate",
    "format_table",
    "benchmark_averages",
]

# np.linspace(0.5, 0.95, 10) exactly as the official code computes it (not 0.5 + 0.05 * k, which
# differs in the last bits and can flip a comparison at a boundary).
MRA_THRESHOLDS: np.ndarray = np.linspace(0.5, 0.95, 10)


def accuracy(correct: Iterable[bool | float]) -> float:
    """Mean of 0/1 (or fractional) scores; NaN for an empty input."""
    vals = [float(c) for c in correct]
    return sum(vals) / len(vals) if vals else math.nan


def mean_relative_accuracy(pred: float | None, gt: float, thresholds: Sequence[float] = MRA_THRESHOLDS) -> float:
    """MRA of one numeric prediction (see module docstring); ``None``/non-finite predictions score 0."""
    if not math.isfinite(gt):
        raise ValueError(f"ground truth must be finite, got {gt}")
    if pred is None or not math.isfinite(pred):
        return 0.0
    if gt == 0:
        return 1.0 if pred == 0 else 0.0
    rel = abs(pred - gt) / abs(gt)
    th = np.asarray(thresholds, dtype=np.float64)
    return float((rel <= 1.0 - th).mean())


def mra_from_text(response: str, gt: str | float) -> float:
    """MRA of a raw response: the answer is extracted (``<answer>``/``\\boxed``, else the whole response)
    and read as a number."""
    g = parse_number(gt) if isinstance(gt, str) else None
    gv = g.value if g is not None else (float(gt) if not isinstance(gt, str) else None)
    if gv is None:
        raise ValueError(f"ground truth {gt!r} is not a number")
    ans = extract_answer(response)
    p = parse_number(ans if ans is not None else response)
    return mean_relative_accuracy(p.value if p else None, gv)


def aggregate(records: Iterable[Mapping[str, Any]], by: str = "task", metrics: Sequence[str] | None = None) -> dict:
    """Mean of each metric per group: ``{group: {"n": count, metric: mean, ...}}`` plus ``"all"``.

    ``records`` are dicts with a ``by`` key and numeric metric values (e.g. per-rollout logging rows:
    reward, accuracy, response_length, repetition_rate, ...). Missing/None values are skipped per metric,
    so ``n_<metric>`` says how many values went into each mean when it differs from ``n``.
    """
    sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    cnts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    rows: dict[str, int] = defaultdict(int)
    for r in records:
        if by not in r:
            raise ValueError(f"record has no {by!r} key: {dict(r)}")
        g = str(r[by])
        keys = metrics if metrics is not None else [k for k, v in r.items() if k != by and _is_num(v)]
        for grp in (g, "all"):
            rows[grp] += 1
            for k in keys:
                v = r.get(k)
                if _is_num(v) and math.isfinite(float(v)):
                    sums[grp][k] += float(v)
                    cnts[grp][k] += 1
    out: dict[str, dict[str, float]] = {}
    for grp in sorted(rows, key=lambda x: (x == "all", x)):
        d: dict[str, float] = {"n": rows[grp]}
        for k in sums[grp]:
            d[k] = sums[grp][k] / cnts[grp][k]
            if cnts[grp][k] != rows[grp]:
                d[f"n_{k}"] = cnts[grp][k]
        out[grp] = d
    return out


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float, np.floating, np.integer))  # bool is an int: 0/1 flags average fine


def benchmark_averages(scores: Mapping[str, float], groups: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """Unweighted mean of benchmark scores per group, e.g. the paper's general average over its six general
    benchmarks. (The paper reports its spatial benchmarks one by one, CV-Bench 82.3 and VSI-Bench 42.3,
    not as a mean.) Raises ``ValueError`` naming a benchmark missing from ``scores``."""
    out = {}
    for name, members in groups.items():
        missing = [m for m in members if m not in scores]
        if missing:
            raise ValueError(f"group {name!r}: no score for {missing}")
        out[name] = sum(scores[m] for m in members) / len(members)
    return out
