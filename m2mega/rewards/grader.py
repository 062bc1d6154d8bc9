"""Math answer equivalence on HF math-verify, with m2mega's stricter number rules in front of it.

This module runs inside the bounded grader worker (:mod:`m2mega.rewards.sandbox`), never in the trainer:
sympy can run for minutes on hostile input and math-verify's own timeout is ``signal.alarm`` (main thread
only, whole seconds), so the worker process is the limit that always holds.

Why math-verify (TRL, open-r1, verl use it): its LaTeX/expression extraction and comparison (sets and
tuples in any order, intervals vs inequalities, ``x \\in``, matrices, named left-hand sides ``(p,q)=(3,2)``,
equivalent equations, ``\\text`` units, several boxes) is far more complete than a hand-written parser.
What we keep in front of it, because measured on ``tests/data/grader_corpus.jsonl`` it is more exact:

* plain numbers on both sides are compared with a **relative** tolerance (math-verify rounds to 6 decimal
  places: ``2e-9`` would equal ``5e-9`` and ``6.63\\times10^{-34}`` equal ``1.0\\times10^{-34}``), and so are
  two answers that both evaluate to a single real constant;
* thousands groups (``12,\\!000``, ``1 000``), ``2e-9`` scientific notation and plain trailing unit words
  (``3 cm``) are normalised before parsing (math-verify reads ``1 000`` as ``1*0`` and ``2e-9`` as
  ``2e - 9``);
* an inequality written as a union of intervals and vice versa (``x<1 or x>2`` vs
  ``(-\\infty,1)\\cup(2,\\infty)``) is compared as a set of reals.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache

import sympy
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from .extract import strip_answer
from .match import join_digit_groups, numbers_close, parse_number, plain_numbers_equal
from .math_equiv import MAX_MATH_CHARS

__all__ = ["math_verify_equal", "math_value", "MAX_MATH_CHARS"]

_CONFIG = (LatexExtractionConfig(), ExprExtractionConfig())
_E_NOTATION = re.compile(r"(?<![\w\\.])(\d+(?:\.\d*)?|\.\d+)[eE]([-+]?\d{1,4})(?![\w.])")
_UNIT_WORDS = (
    r"(?:cm|mm|km|m|meters?|metres?|centimet(?:er|re)s?|millimet(?:er|re)s?|kilomet(?:er|re)s?|inch(?:es)?|"
    r"feet|foot|ft|miles?|yards?|kg|grams?|g|seconds?|sec|s|minutes?|min|hours?|hrs?|h|days?|years?|"
    r"degrees?|units?|square\s+units|sq\.?\s*units|yuan|dollars?|cents?|liters?|litres?|ml|L)"
)
# A unit after a value: "3 cm", "3\text{ cm}^2", "12\,\mathrm{m}". Single-letter units need a space or a
# text wrapper, so that "5m" (a product) is left alone.
_TRAILING_UNIT = re.compile(
    rf"(?<=[\d}}\)])\s*(?:\\(?:text|textnormal|mbox|mathrm|rm)\s*\{{\s*{_UNIT_WORDS}\s*\}}|\s{_UNIT_WORDS}|"
    rf"(?:cm|mm|km|kg|ft)(?![A-Za-z]))(?:\s*\^\s*\{{?\s*[23]\s*\}}?|[²³])?\s*\.?$"
)
_TEXT_GROUP = re.compile(r"\\(?:text|textnormal|mbox|mathrm|textbf|operatorname)\s*\{[^{}]*\}")
_MATH_WORDS = frozenset(
    "sin cos tan cot sec csc arcsin arccos arctan sinh cosh tanh log ln exp sqrt frac dfrac tfrac cfrac "
    "infty inf pmod mod max min gcd lcm det and or pm mp cdot times div le ge leq geq neq lt gt cup cap in "
    "left right begin end pmatrix bmatrix matrix vmatrix array circ pi theta alpha beta gamma".split()
)
_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{3,}")
_NEGATION = r"(?:not|never|no|except|isn't|is\s+not|cannot\s+be|can't\s+be)"


def _unwrapped(s: str) -> str:
    """Case-folded text with ``\\text{..}`` wrappers, ``$`` and spaces gone: ``\\text{Even}`` == ``Even``."""
    s = re.sub(r"\\(?:text|textnormal|mbox|mathrm|textbf|operatorname)\s*\{([^{}]*)\}", r"\1", s)
    return re.sub(r"[\s$]", "", s).casefold()


def _negated(text: str, used: str) -> bool:
    """Whether the value math-verify picked out of prose is the one the prose rules out ("not 5")."""
    return bool(used) and re.search(rf"\b{_NEGATION}\s*\$?\s*{re.escape(used)}", text, re.I) is not None


def _prep(text: str) -> str:
    """Notation fixes math-verify gets wrong; keeps LaTeX otherwise untouched (see module docstring)."""
    s = strip_answer(text)
    s = join_digit_groups(s)
    s = _E_NOTATION.sub(r"\1\\times10^{\2}", s)
    s = _TRAILING_UNIT.sub("", s).replace("**", "^")  # LaTeX reads "9**9" as 9*(*9): Python's power
    return s.strip()


def _wordy(s: str) -> bool:
    """Prose around the answer ("the final answer is ..."): math-verify must find the answer in it."""
    bare = _TEXT_GROUP.sub(" ", s)
    return any(w.lower() not in _MATH_WORDS for w in _WORD.findall(bare))


@lru_cache(maxsize=4096)  # ground truths repeat across the G rollouts of a prompt
def _mv_parse(s: str) -> tuple:
    """math-verify's reading of an answer: bare math is parsed as one LaTeX formula (``$s$``), prose is
    searched for its answer the way math-verify does it (delimiters, "final answer is", last formula)."""
    if not s or len(s) > MAX_MATH_CHARS:
        return ()
    delimited = any(d in s for d in ("$", "\\(", "\\[", "\\boxed"))
    return tuple(parse(s if delimited or _wordy(s) else f"${s}$", list(_CONFIG), parsing_timeout=None))


def _whole(parsed: tuple, s: str) -> bool:
    """Whether math-verify's reading used the whole answer (not one number picked out of ``9**9**9``)."""
    used = next((x for x in parsed if isinstance(x, str)), "")
    return used.replace(" ", "") == s.replace(" ", "")


def _constant(expr) -> complex | None:
    """The value of ``expr`` when it is one finite number (no symbols, not a set/relation/matrix)."""
    if not isinstance(expr, sympy.Expr) or getattr(expr, "is_Matrix", False) or expr.free_symbols:
        return None
    try:
        v = complex(sympy.N(expr, 30))
    except (TypeError, ValueError, ZeroDivisionError, OverflowError, AttributeError, RecursionError):
        return None
    return v if math.isfinite(v.real) and math.isfinite(v.imag) else None


def _close(a: complex, b: complex, rel_tol: float) -> bool:
    if b.imag == 0 and a.imag == 0:
        return numbers_close(a.real, b.real, rel_tol=rel_tol, abs_tol=1e-12)
    return abs(a - b) <= rel_tol * max(abs(a), abs(b)) or abs(a - b) <= 1e-12 * (abs(b) == 0)


def _one_var(expr) -> sympy.Symbol | None:
    free = getattr(expr, "free_symbols", set())
    return next(iter(free)) if len(free) == 1 else None


def _real_set(expr) -> sympy.Set | None:
    """``expr`` as a set of reals when it describes one: an interval/union, an inequality in one variable,
    an and/or of such, a list of them (math-verify's reading of "x<1 or x>2"), ``x \\in S``."""
    try:
        if isinstance(expr, (sympy.Interval, sympy.Union)):
            return expr
        if isinstance(expr, sympy.Eq) and isinstance(expr.rhs, sympy.Set):  # "x \in [1, 2]"
            return expr.rhs
        if isinstance(expr, (sympy.core.relational.Relational, sympy.And, sympy.Or)) and not isinstance(
            expr, (sympy.Eq, sympy.Ne)
        ):
            var = _one_var(expr)
            return expr.as_set() if var is not None else None
        if isinstance(expr, sympy.FiniteSet) and len(expr) > 1:
            parts = [_real_set(e) for e in expr.args]
            if all(p is not None for p in parts) and len({str(_one_var(e)) for e in expr.args}) == 1:
                return sympy.Union(*parts)
    except (TypeError, ValueError, NotImplementedError, AttributeError):
        return None
    return None


def _sets_equal(gold, pred) -> bool:
    relational = (sympy.core.relational.Relational, sympy.And, sympy.Or, sympy.FiniteSet, sympy.Eq)
    if not (isinstance(gold, relational) or isinstance(pred, relational)):
        return False
    a, b = _real_set(gold), _real_set(pred)
    if a is None or b is None:
        return False
    try:
        return bool(a == b) or sympy.SymmetricDifference(a, b).simplify() is sympy.S.EmptySet
    except (TypeError, ValueError, NotImplementedError, AttributeError):
        return False


def math_verify_equal(pred: str, gold: str, rel_tol: float = 1e-6) -> bool:
    """True when the answer ``pred`` equals the ground truth ``gold`` (see the module docstring).

    Runs unbounded: call it through :func:`m2mega.rewards.math_equiv.math_equal`, which runs it in the
    bounded worker. Raises nothing on bad input: what cannot be parsed is not equal.
    """
    p, g = _prep(pred), _prep(gold)
    if not p or not g or len(p) > MAX_MATH_CHARS:
        return False
    if p.replace(" ", "") == g.replace(" ", "") or _unwrapped(p) == _unwrapped(g):
        return True
    plain = plain_numbers_equal(p, g, rel_tol)
    if plain is not None:
        return plain
    gp, pp = _mv_parse(g), _mv_parse(p)
    if not gp or not pp or _negated(p, next((x for x in pp if isinstance(x, str)), "")):
        return False
    gv, pv = _constant(gp[0]), _constant(pp[0])
    if gv is not None and pv is not None:  # relative, not math-verify's 6-decimal rounding
        return _close(pv, gv, rel_tol)
    if verify(list(gp), list(pp), strict=True, allow_set_relation_comp=True, timeout_seconds=None):
        return True
    return _sets_equal(gp[0], pp[0])


def math_value(text: str) -> float | None:
    """The real number an answer evaluates to (``"4\\sqrt{2}"``, ``"2^3 + 1"``), or ``None`` when it is not
    one finite real constant (``"2x"``, ``"3 or 4"``, a set, an equation)."""
    p = _prep(text)
    n = parse_number(p, words=False)
    if n is not None:
        return n.value / 100.0 if n.percent else n.value
    parsed = _mv_parse(p)
    if not parsed or not _whole(parsed, p):
        return None
    v = _constant(parsed[0])
    if v is None or v.imag != 0:
        return None
    return v.real
