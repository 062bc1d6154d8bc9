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
from typing import Iterable

import sympy
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from .extract import strip_answer
from .match import join_digit_groups, numbers_close, parse_number, plain_numbers_equal
from .math_equiv import MAX_MATH_CHARS

__all__ = ["MAX_MATH_CHARS", "WARM_UP_PAIRS", "math_value", "math_verify_equal", "use_two_stage_parsing",
           "warm_up"]

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


def use_two_stage_parsing() -> bool:
    """Make math-verify's LaTeX parser (latex2sympy2's ANTLR grammar) try ANTLR's fast SLL prediction first
    and re-parse with full LL only when SLL reports a syntax error: ANTLR's "two-stage parsing".

    Why: full-LL prediction is 60-75% of a grader call (measured with cProfile on the corpus), and most of
    the p99. SLL-then-LL gives the LL result whenever SLL finds no error (the grammar's ambiguities are
    the only exception: measured identical sympy output for all 382 distinct LaTeX strings the grader
    corpus and the warm-up give the parser; 27 of the corpus's 317 need the LL fallback) at ~1/4 of the
    parse time. latex2sympy2 has no option for the prediction mode, so this wraps its private
    ``_Latex2Sympy.create_parser``; when that is gone (another version) nothing is changed and ``False``
    is returned. Called once in the grader worker; idempotent.
    """
    try:
        from antlr4.atn.PredictionMode import PredictionMode
        from latex2sympy2_extended.latex2sympy2 import _Latex2Sympy
    except ImportError:
        return False
    make = getattr(_Latex2Sympy, "create_parser", None)
    if make is None or getattr(make, "_m2mega_two_stage", False):
        return make is not None

    def create_parser(self, latex_str):
        parser = make(self, latex_str)
        parser._interp.predictionMode = PredictionMode.SLL
        sll_math = parser.math

        def math():
            try:
                return sll_math()
            except Exception:  # noqa: BLE001 - the library's error listener raises Exception on a syntax error
                return make(self, latex_str).math()  # a fresh parser in ANTLR's default (full LL) mode

        parser.math = math
        return parser

    create_parser._m2mega_two_stage = True
    create_parser._m2mega_ll = make  # the library's own (full LL) parser factory, for comparisons in tests
    _Latex2Sympy.create_parser = create_parser
    return True


# (answer, ground truth) pairs a deep grader worker grades once (sandbox.warm_up). ANTLR builds its
# prediction DFA lazily, per grammar decision and lookahead, and sympy imports its solvers/sets/matrices on
# first use, so the first answer of each shape costs 2-5x its later cost (measured on the corpus, same
# machine and load: p99 116-136 ms with a lightly warmed worker, 65-69 ms with a warmed one). One answer per
# shape a grader meets: numbers, fractions, roots, trig/logs, equations and systems, inequalities,
# intervals and unions, sets, tuples, matrices, sums/integrals/limits, units, ratios, complex numbers,
# prose with delimiters. Written for the warm-up, not taken from the test corpus.
WARM_UP_PAIRS: tuple[tuple[str, str], ...] = (
    ("x^2-1", "(x-1)(x+1)"),
    ("\\dfrac{6}{8}", "0.75"),
    ("-\\tfrac12+3\\cdot 2", "\\frac{11}{2}"),
    ("3\\sqrt{12}", "6\\sqrt{3}"),
    ("\\sqrt[3]{27}\\div 3", "1"),
    ("\\sin^2\\theta+\\cos^2\\theta", "1"),
    ("\\log_{3} 81 + \\ln(e^{2})", "6"),
    ("\\tan\\left(\\frac{\\pi}{4}\\right)", "\\arcsin(1)\\cdot\\frac{2}{\\pi}"),
    ("e^{i\\pi}+2", "1"),
    ("y = 3x - 2", "3x - y - 2 = 0"),
    ("\\frac{x^2}{25}+\\frac{y^2}{9}=1", "9x^2 + 25y^2 = 225"),
    ("b_{1}=4,\\quad b_{2}=-7", "b_2 = -7, b_1 = 4"),
    ("f(t) = t^{3}", "t^3"),
    ("m \\geq -3", "[-3, \\infty)"),
    ("-2 < t \\le 5", "(-2, 5]"),
    ("|u| < 4", "-4<u<4"),
    ("k \\in (-\\infty, -1) \\cup (3, \\infty)", "k<-1 \\text{ or } k>3"),
    ("[1, 4) \\cup (4, 9]", "(4, 9] \\cup [1, 4)"),
    ("1 \\leq |w| \\leq 2", "w \\in [-2, -1] \\cup [1, 2]"),
    ("\\{2, 5, 8\\}", "\\{8, 2, 5\\}"),
    ("(4, -\\frac{\\pi}{3})", "\\left( 4, -\\frac{\\pi}{3} \\right)"),
    ("(m, n) = (5, 1)", "(5, 1)"),
    ("3 \\text{ and } 7", "7, 3"),
    ("\\begin{pmatrix} 2 & 0 \\\\ 1 & 3 \\end{pmatrix}", "\\left[\\begin{array}{cc} 2 & 0 \\\\ 1 & 3 \\end{array}\\right]"),
    ("\\begin{bmatrix} a & b \\\\ c & d \\end{bmatrix}", "\\begin{pmatrix} a & b \\\\ c & d \\end{pmatrix}"),
    ("\\sum_{j=1}^{n} j", "\\frac{n(n+1)}{2}"),
    ("G_m = \\sum_{i=0}^{m-1} G_i G_{m-i-1}", "G_m = \\sum_{i=0}^{m-1} G_{m-i-1} G_i"),
    ("\\int_{0}^{2} t\\,dt", "2"),
    ("\\lim_{h \\to 0} \\frac{\\sin h}{h}", "1"),
    ("\\prod_{r=1}^{4} r + \\binom{6}{2} + 3!", "45"),
    ("8\\text{ cm}^2", "8"),
    ("35\\%", "0.35"),
    ("60^\\circ", "\\frac{\\pi}{3}"),
    ("P:Q = 4:9", "4:9"),
    ("5 - 2i", "\\overline{5 + 2i}"),
    ("\\pm\\sqrt{2}", "-\\sqrt{2}, \\sqrt{2}"),
    ("\\varnothing", "\\emptyset"),
    ("2.5\\times10^{-4}", "0.00025"),
    ("So the result is $\\boxed{\\frac{7}{3}}$.", "\\frac{7}{3}"),
    ("The values are \\( 9, \\frac{1}{9} \\) in total.", "\\{9, \\frac{1}{9}\\}"),
    ("Therefore $$z = 4 - i$$ is the answer", "4 - i"),
)


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


_STRICT = {sympy.StrictLessThan: True, sympy.LessThan: False, sympy.StrictGreaterThan: True,
           sympy.GreaterThan: False}  # fmt: skip
_FLIP = {sympy.StrictLessThan: sympy.StrictGreaterThan, sympy.LessThan: sympy.GreaterThan,
         sympy.StrictGreaterThan: sympy.StrictLessThan, sympy.GreaterThan: sympy.LessThan}  # fmt: skip


def _simple_set(expr, var=None) -> sympy.Set | None:
    """The set of reals of a *simple* answer, built without sympy's solvers: an interval/union, ``x \\in S``,
    ``x < c`` or ``|x| < c`` (one symbol against a finite real constant), and and/or/lists of those in one
    symbol. ``None`` for anything else (then ``as_set`` decides, at 10-100x the cost: it runs a periodicity
    analysis and an inequality solver on each relation)."""
    if isinstance(expr, (sympy.Interval, sympy.Union)):
        return expr
    if isinstance(expr, sympy.Eq) and isinstance(expr.rhs, (sympy.Interval, sympy.Union)):
        return expr.rhs if isinstance(expr.lhs, sympy.Symbol) else None
    if isinstance(expr, (sympy.And, sympy.Or, sympy.FiniteSet)) and len(expr.args) > 1:
        var = var or _one_var(expr)
        parts = [_simple_set(a, var) for a in expr.args]
        if var is None or any(p is None for p in parts):
            return None
        return sympy.Intersection(*parts) if isinstance(expr, sympy.And) else sympy.Union(*parts)
    op = type(expr)
    if op not in _FLIP:
        return None
    lhs, rhs = expr.lhs, expr.rhs
    if isinstance(rhs, (sympy.Symbol, sympy.Abs)) and not isinstance(lhs, (sympy.Symbol, sympy.Abs)):
        lhs, rhs, op = rhs, lhs, _FLIP[op]
    absolute = isinstance(lhs, sympy.Abs)
    sym = lhs.args[0] if absolute else lhs
    if not isinstance(sym, sympy.Symbol) or (var is not None and sym != var) or rhs.free_symbols:
        return None
    if not (rhs.is_extended_real and rhs.is_finite) or (absolute and not rhs.is_positive):
        return None
    strict = _STRICT[op]
    if op in (sympy.StrictLessThan, sympy.LessThan):  # x < c, x <= c, |x| < c, |x| <= c
        return sympy.Interval(-rhs, rhs, strict, strict) if absolute else sympy.Interval(-sympy.oo, rhs, True, strict)
    above = sympy.Interval(rhs, sympy.oo, strict, True)
    return sympy.Union(sympy.Interval(-sympy.oo, -rhs, True, strict), above) if absolute else above


def _same_set(a: sympy.Set, b: sympy.Set) -> bool:
    try:
        return bool(a == b) or sympy.SymmetricDifference(a, b).simplify() is sympy.S.EmptySet
    except (TypeError, ValueError, NotImplementedError, AttributeError):
        return False


def _proportional_equations(gold, pred) -> bool:
    """Two equations in the same unknowns whose ``lhs - rhs`` differ by a non-zero constant factor
    (``x^2/16 + y^2/12 = 1/4`` and ``x^2/4 + y^2/3 = 1``): the same solutions. One ``cancel``, where
    math-verify gets there by solving both equations (5-10x the time)."""
    if not (isinstance(gold, sympy.Eq) and isinstance(pred, sympy.Eq)):
        return False
    if not all(isinstance(s, sympy.Expr) for s in (gold.lhs, gold.rhs, pred.lhs, pred.rhs)):
        return False
    try:
        dg, dp = gold.lhs - gold.rhs, pred.lhs - pred.rhs
        if not dg.free_symbols or dg.free_symbols != dp.free_symbols:
            return False
        ratio = sympy.cancel(dg / dp)
        return not ratio.free_symbols and bool(ratio.is_finite) and ratio.is_zero is False
    except Exception:  # noqa: BLE001 - sympy raises many kinds on odd input: then math-verify decides
        return False


def _sets_equal(gold, pred) -> bool:
    relational = (sympy.core.relational.Relational, sympy.And, sympy.Or, sympy.FiniteSet, sympy.Eq)
    if not (isinstance(gold, relational) or isinstance(pred, relational)):
        return False
    a, b = _real_set(gold), _real_set(pred)
    return a is not None and b is not None and _same_set(a, b)


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
    # Cheap ways to "equal" first (same solutions / same set of reals); they never say "not equal".
    if _proportional_equations(gp[0], pp[0]):
        return True
    try:
        a, b = _simple_set(gp[0]), _simple_set(pp[0])
    except Exception:  # noqa: BLE001 - sympy raises many kinds on odd input: then as_set decides
        a = b = None
    simple = a is not None and b is not None
    if simple and _same_set(a, b):
        return True
    if verify(list(gp), list(pp), strict=True, allow_set_relation_comp=True, timeout_seconds=None):
        return True
    # Two simple sets were compared above (as_set gives the same sets, 10-100x slower).
    return not simple and _sets_equal(gp[0], pp[0])


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


def warm_up(pairs: Iterable[tuple[str, str]] = WARM_UP_PAIRS, forget: bool = True) -> float:
    """Grade ``pairs`` (default :data:`WARM_UP_PAIRS`: fills ANTLR's prediction DFA and sympy's lazy
    imports, see there); ``forget`` then drops the cached parses, so that no later answer is served from a
    warm-up parse. Returns the seconds it took."""
    import time

    t0 = time.perf_counter()
    for pred, gold in pairs:
        math_verify_equal(pred, gold)
        math_value(pred)
    if forget:
        _mv_parse.cache_clear()
    return time.perf_counter() - t0
