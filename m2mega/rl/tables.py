"""Per-task tables of held-out metrics and their statistics over seeds. Pure Python (no torch), so the
command lines that print them stay fast to start."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

__all__ = ["format_table", "mean_ci"]


# two-sided 95% Student-t quantiles by degrees of freedom (seeds - 1); scipy is not a dependency for 30 numbers
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of its 95% t-interval over independent runs (seeds); NaN width for one run."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("mean_ci needs at least one value")
    n = len(xs)
    m = sum(xs) / n
    if n == 1:
        return m, float("nan")
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    df = n - 1
    t = _T95[max(k for k in _T95 if k <= df)] if df <= 30 else 1.96
    return m, t * sd / math.sqrt(n)


def format_table(table: Mapping[str, Mapping[str, float]], metrics: Sequence[str] | None = None, digits: int = 4) -> str:
    """A markdown table of :func:`aggregate`'s output (rows: groups; columns: n and the metrics)."""
    if metrics is None:
        seen: list[str] = []
        for d in table.values():
            seen += [k for k in d if k != "n" and not k.startswith("n_") and k not in seen]
        metrics = seen
    head = "| group | n | " + " | ".join(metrics) + " |"
    sep = "| --- | ---: | " + " | ".join("---:" for _ in metrics) + " |"
    lines = [head, sep]
    for grp, d in table.items():
        cells = [f"{d[m]:.{digits}f}" if m in d else "" for m in metrics]
        lines.append(f"| {grp} | {int(d.get('n', 0))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
