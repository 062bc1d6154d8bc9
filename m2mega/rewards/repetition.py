"""Repetition detector: the paper's main failure mode (reasoning that loops until the length limit).

Two measures, on word tokens of a string or on a list of token ids:

* **n-gram repetition rate**: the fraction of the sequence's n-grams that already occurred earlier in it,
  ``1 - unique / total``. 0 for text that never repeats a phrase, -> 1 for a loop. Natural reasoning text
  has a small base rate (stock phrases), so penalties start above a threshold (see
  :func:`repetition_penalty`).
* **longest loop**: the longest span made of one block repeated back-to-back (a tandem repeat), found for
  every period ``p <= max_period`` by comparing the sequence with itself shifted by ``p``: a run of ``L``
  positions where ``tok[i] == tok[i + p]`` is a block of ``p`` tokens repeated ``(L + p) / p`` times.
  ``loop_fraction`` is the share of the sequence that span covers. Cost: O(N * max_period) vectorised.

Strings are split into word tokens (runs of letters/digits), single punctuation marks, and single CJK
characters (CJK text has no spaces, so a character is the closest thing to a word).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = [
    "RepetitionStats",
    "tokenize_words",
    "ngram_repetition_rate",
    "longest_loop",
    "repetition_stats",
    "repetition_penalty",
]

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af"
_CJK_RE = re.compile(rf"[{_CJK}]")
_WORD_CJK_RE = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+|[^\w\s]")
_WORD_RE = re.compile(r"\w+|[^\w\s]")  # same tokens when there is no CJK, ~1.5x faster


def tokenize_words(text: str) -> list[str]:
    """Word tokens of ``text`` (see module docstring); lower-cased so "The"/"the" count as a repeat."""
    if not isinstance(text, str):
        return []
    t = text.lower()
    return (_WORD_CJK_RE if _CJK_RE.search(t) else _WORD_RE).findall(t)


def _as_tokens(seq: str | Sequence) -> list:
    if isinstance(seq, str):
        return tokenize_words(seq)
    if hasattr(seq, "tolist"):  # numpy array / torch tensor of token ids
        return seq.tolist()
    return list(seq)


def _as_int_array(toks: list) -> np.ndarray:
    """Token ids as int64 (fast path), or any hashable tokens mapped to dense ids."""
    if toks and isinstance(toks[0], int):
        try:
            return np.asarray(toks, dtype=np.int64)
        except (TypeError, ValueError, OverflowError):
            pass
    ids: dict = {}
    return np.fromiter((ids.setdefault(t, len(ids)) for t in toks), dtype=np.int64, count=len(toks))


def ngram_repetition_rate(seq: str | Sequence, n: int = 4) -> float:
    """``1 - unique_ngrams / total_ngrams`` of a string (word tokens) or a token-id list; 0 if too short."""
    if n < 1:
        raise ValueError(f"n-gram size must be >= 1, got {n}")
    toks = _as_tokens(seq)
    total = len(toks) - n + 1
    if total <= 1:
        return 0.0
    grams = set(zip(*(toks[i:] for i in range(n))))
    return 1.0 - len(grams) / total


@dataclass(frozen=True)
class Loop:
    """A block of ``period`` tokens repeated back-to-back ``repeats`` times from token ``start``."""

    period: int
    repeats: float
    start: int
    span: int  # tokens covered: period * repeats


def longest_loop(seq: str | Sequence, max_period: int = 256) -> Loop | None:
    """The tandem repeat covering the most tokens (see module docstring), or ``None`` if nothing repeats.

    Ties go to the shortest period (``"a a a a"`` is period 1, not period 2).
    """
    toks = _as_tokens(seq)
    n = len(toks)
    if n < 2:
        return None
    arr = _as_int_array(toks)
    best: Loop | None = None
    for p in range(1, min(max_period, n // 2) + 1):
        eq = arr[p:] == arr[:-p]
        # A run must be >= p (two full copies) and, to beat the best, cover more than best.span tokens.
        need = max(p, (best.span - p + 1) if best else 0)
        if int(np.count_nonzero(eq)) < need:
            continue
        # Longest run of True without materialising run boundaries: the running count minus the count
        # at the last False before each position.
        c = np.cumsum(eq, dtype=np.int64)
        runs = c - np.maximum.accumulate(np.where(eq, 0, c))
        k = int(runs.argmax())
        run = int(runs[k])
        if run < need:
            continue
        best = Loop(period=p, repeats=(run + p) / p, start=k - run + 1, span=run + p)
    return best


@dataclass(frozen=True)
class RepetitionStats:
    """Repetition measures of one sequence; ``loop_fraction`` counts loops of >= ``min_repeats`` copies."""

    n_tokens: int
    ngram_rate: float
    loop_period: int
    loop_repeats: float
    loop_fraction: float

    @property
    def looping(self) -> bool:
        """Heuristic verdict used by the quality filter: a loop covers at least a fifth of the sequence."""
        return self.loop_fraction >= 0.2


def repetition_stats(
    seq: str | Sequence, n: int = 4, max_period: int = 256, min_repeats: float = 3.0
) -> RepetitionStats:
    """n-gram rate and longest loop of ``seq``; loops with fewer than ``min_repeats`` copies are ignored
    (a phrase said twice is not a loop)."""
    toks = _as_tokens(seq)
    loop = longest_loop(toks, max_period=max_period)
    frac = 0.0
    if loop is not None and loop.repeats >= min_repeats and toks:
        frac = loop.span / len(toks)
    return RepetitionStats(
        n_tokens=len(toks),
        ngram_rate=ngram_repetition_rate(toks, n),
        loop_period=loop.period if loop else 0,
        loop_repeats=loop.repeats if loop else 0.0,
        loop_fraction=frac,
    )


def repetition_penalty(rate: float, weight: float, threshold: float = 0.2) -> float:
    """``weight * max(0, rate - threshold) / (1 - threshold)``: 0 at or below the threshold (the base rate
    of normal text), ``weight`` for a sequence that is all repeats. Returned as a positive amount to subtract."""
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"repetition threshold must be in [0, 1), got {threshold}")
    return weight * max(0.0, rate - threshold) / (1.0 - threshold)
