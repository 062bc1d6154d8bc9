"""Math answer equivalence, bounded: ``math_equal("\\frac{1}{2}", "0.5")`` is True.

The comparison itself is :func:`m2mega.rewards.grader.math_verify_equal` (HF math-verify behind m2mega's
number rules). It runs in a grader worker process (:mod:`m2mega.rewards.sandbox`) so that ``timeout_s`` is
a hard limit on every thread and in every process: a call that overruns is answered "not equal" and the
worker is replaced. Two cases never need the worker: equal strings and two plain numbers (relative
tolerance), which are most rewards; power towers (``9^{9^{9^{9}}}``, more than 30 powers), factorial
chains, factorials of a power of a power (``(10^{10^{8}})!``) and bare formulas over 2000 characters are
refused outright. Nothing here evaluates model text as code, and nothing raises.
"""

from __future__ import annotations

import re

from .extract import strip_answer
from .match import MAX_ANSWER_CHARS, parse_number, plain_numbers_equal
from .sandbox import call

__all__ = ["math_equal", "math_value", "DEFAULT_MATH_TIMEOUT_S", "MAX_MATH_CHARS"]

DEFAULT_MATH_TIMEOUT_S = 1.0
# An answer block may hold prose ("... so the final answer is $(7, 6)$."): math-verify finds the answer in
# it. Beyond this length it is not an answer, and reading it only costs time.
MAX_MATH_CHARS = 20_000


# Power towers (a^{b^{c^{d}}}, 9**9**9**9) are the classic hostile answers: their value has astronomically
# many digits, and no real ground truth is one. Refused before any worker time is spent on them.
_POW, _EXP = r"(?:\^|\*\*)", r"\s*(?:\{[^{}^]*|[\d.]+|\w)\s*"  # an exponent opening a group, or one token
_TOWER = re.compile(_POW + _EXP + _POW + _EXP + _POW)
# The factorial of a power of a power, ``(10^{10^{8}})!``: sympy spent the whole soft limit on it, and on
# a loaded machine ran past the hard limit inside one C call (a worker kill and restart).
_TOWER_FACTORIAL = re.compile(_POW + _EXP + _POW + r"[\s\d{}()]*!")
MAX_POWERS = 30
MAX_FORMULA_CHARS = 2000  # a bare formula (no prose) longer than this is not an answer
_PROSE = re.compile(r"(?<![A-Za-z])[A-Za-z]{3,}\s+[A-Za-z]")  # starts only at word starts: linear


def _hostile(text: str) -> bool:
    if text.count("^") + text.count("**") > MAX_POWERS or _TOWER.search(text) or re.search(r"!\s*!\s*!", text):
        return True  # power towers, 3!!!!: astronomically large values
    if "!" in text and _TOWER_FACTORIAL.search(text):
        return True
    return len(text) > MAX_FORMULA_CHARS and _PROSE.search(text) is None


def _fast_path(pred: str, gt: str, rel_tol: float) -> bool | None:
    p, g = strip_answer(pred), strip_answer(gt)
    if p.replace(" ", "") == g.replace(" ", ""):
        return bool(p)
    return plain_numbers_equal(p, g, rel_tol)


def math_equal(pred: str | None, gt: str, rel_tol: float = 1e-6, timeout_s: float = DEFAULT_MATH_TIMEOUT_S) -> bool:
    """True when the answer ``pred`` is mathematically equal to ``gt``; False on a timeout (at most
    ``timeout_s`` seconds, from any thread) or anything unreadable. Never raises on model output."""
    if not isinstance(pred, str) or not isinstance(gt, str) or not pred.strip() or not gt.strip():
        return False
    if len(pred) > MAX_MATH_CHARS or _hostile(pred) or _hostile(gt):
        return False
    fast = _fast_path(pred, gt, rel_tol)
    if fast is not None:
        return fast
    out = call("math_equal", [pred, gt, rel_tol], timeout_s)
    return out.status == "ok" and out.value is True


def math_value(text: str | None, timeout_s: float = DEFAULT_MATH_TIMEOUT_S) -> float | None:
    """The real number an answer evaluates to (``"4\\sqrt{2}"`` -> 5.657), or ``None`` (not one finite real
    constant, a timeout, unreadable). Plain numbers are read in-process; expressions in the worker."""
    if not isinstance(text, str) or not text.strip() or len(text) > MAX_ANSWER_CHARS:
        return None
    n = parse_number(text)
    if n is not None:
        return n.value
    if _hostile(text):
        return None
    out = call("math_value", [text], timeout_s)
    if out.status != "ok" or not isinstance(out.value, (int, float)):
        return None
    return float(out.value)
