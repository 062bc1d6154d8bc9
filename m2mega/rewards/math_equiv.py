"""Math answer equivalence without ever evaluating model text as code.

``math_equal("\\frac{1}{2}", "0.5")`` is True. The pipeline:

1. normalise notation (:func:`m2mega.rewards.match.clean_math_text`) and compare strings;
2. a bare single-variable left-hand side is dropped (``"x = 5"`` -> ``"5"``); tuples, intervals and
   sets (top-level commas) are compared element-wise, sets in any order, intervals with their brackets;
3. plain numbers (with ``%`` leniency) go through :func:`m2mega.rewards.match.numeric_match`;
4. otherwise both sides are parsed into sympy objects by :mod:`m2mega.rewards.math_parse` (no ``eval``;
   refuses hostile input such as ``9**9**9**9``) and compared: exactly for constants (30-digit
   evaluation), and at seeded random points for expressions with free symbols (an identity test that
   does not need ``simplify``, which can run for minutes on hostile input).

On the main thread a ``SIGALRM`` timer bounds the whole comparison (``timeout_s``; it nests with a timer
already armed). Any refusal, timeout or parse error means "not equal": nothing raises.
"""

from __future__ import annotations

import math
import random
import re
import signal
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import sympy

from .extract import strip_answer
from .match import clean_math_text, numeric_match
from .math_parse import MathParseError, parse_math

__all__ = ["math_equal", "parse_math", "MathParseError"]


class _Timeout(BaseException):
    """BaseException so that sympy's internal ``except Exception`` blocks cannot swallow the timeout."""


# --------------------------------------------------------------------------- comparison


@contextmanager
def _time_limit(seconds: float | None) -> Iterator[None]:
    """SIGALRM-based limit on the main thread (a no-op elsewhere: signals only reach the main thread).

    Nests with a timer someone else armed (pytest-timeout, a trainer watchdog): when theirs would fire
    first it is left alone; otherwise theirs is suspended and re-armed with its remaining time afterwards.
    """
    if (
        seconds is None
        or seconds <= 0
        or not hasattr(signal, "setitimer")
        or threading.current_thread() is not threading.main_thread()
    ):
        yield
        return
    outer_left, outer_interval = signal.getitimer(signal.ITIMER_REAL)
    outer_handler = signal.getsignal(signal.SIGALRM)
    if (outer_left and outer_left <= seconds) or outer_handler is None:
        yield  # the outer timer fires first anyway / a handler installed from C that we could not restore
        return

    def _raise(signum, frame):
        raise _Timeout()

    t0 = time.monotonic()
    signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, outer_handler)
        if outer_left:
            left = outer_left - (time.monotonic() - t0)
            signal.setitimer(signal.ITIMER_REAL, max(left, 1e-3), outer_interval)


def _close(a: complex, b: complex, rel_tol: float) -> bool:
    if not (math.isfinite(a.real) and math.isfinite(a.imag) and math.isfinite(b.real) and math.isfinite(b.imag)):
        return False
    return abs(a - b) <= max(rel_tol * max(abs(a), abs(b)), 1e-12)


def _expr_equal(a: sympy.Expr, b: sympy.Expr, rel_tol: float) -> bool:
    if a == b:
        return True
    if a.has(sympy.oo, -sympy.oo, sympy.zoo) or b.has(sympy.oo, -sympy.oo, sympy.zoo):
        return False  # infinities compare structurally only
    free = sorted(a.free_symbols | b.free_symbols, key=lambda s: s.name)
    if not free:
        return _close(complex(sympy.N(a, 30)), complex(sympy.N(b, 30)), rel_tol)
    # Identity test at random points: two different elementary expressions agree on a handful of random
    # points with probability ~0, while simplify() can take minutes on hostile input. Seeded for
    # reproducibility.
    rng = random.Random(1234)
    agreed = 0
    for _ in range(12):
        point = {s: sympy.Rational(rng.randint(50, 250), 100) for s in free}
        try:
            va = complex(sympy.N(a.subs(point), 30))
            vb = complex(sympy.N(b.subs(point), 30))
        except (TypeError, ValueError, ZeroDivisionError, OverflowError):
            continue  # outside a domain (log of a negative, pole): try another point
        if not (math.isfinite(abs(va)) and math.isfinite(abs(vb))):
            continue
        if not _close(va, vb, max(rel_tol, 1e-9)):
            return False
        agreed += 1
        if agreed >= 5:
            return True
    return False


_SIMPLE_LHS = re.compile(r"^\s*[A-Za-z](?:_\{?\w+\}?)?\s*=")
_PLAIN_NUMBER = re.compile(r"^[-+]?\s*(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?(?:[eE][-+]?\d+)?\s*%?$|^[-+]?\.\d+\s*%?$")


def _split_top(s: str) -> tuple[str, list[str], str] | None:
    """``"(1, 2]"`` -> ``("(", ["1", "2"], "]")``; ``None`` when there is no top-level comma."""
    t = s.strip()
    lo = hi = ""
    for o in ("\\{", "(", "[", "{"):
        if t.startswith(o):
            for c in ("\\}", ")", "]", "}"):
                if t.endswith(c) and len(t) >= len(o) + len(c):
                    lo, hi, t = o, c, t[len(o) : len(t) - len(c)]
                    break
            break
    parts, depth, cur = [], 0, []
    for ch in t:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    if len(parts) < 2:
        return None
    return lo, [p.strip() for p in parts], hi


def _scalar_equal(p: str, g: str, rel_tol: float) -> bool:
    if not p or not g:
        return False
    if p.replace(" ", "") == g.replace(" ", ""):
        return True
    if _PLAIN_NUMBER.match(p) and _PLAIN_NUMBER.match(g):
        return numeric_match(p, g, rel_tol=rel_tol, abs_tol=1e-12)
    if "=" in p or "=" in g:
        ps, gs = p.split("="), g.split("=")
        return len(ps) == len(gs) and all(_scalar_equal(a.strip(), b.strip(), rel_tol) for a, b in zip(ps, gs))
    try:
        return _expr_equal(parse_math(p), parse_math(g), rel_tol)
    except (MathParseError, TypeError, ValueError, ZeroDivisionError, OverflowError, AttributeError):
        return False


def _equal(p: str, g: str, rel_tol: float) -> bool:
    p, g = clean_math_text(strip_answer(p)), clean_math_text(strip_answer(g))
    if _SIMPLE_LHS.match(p):
        p = p.split("=", 1)[1].strip()
    if _SIMPLE_LHS.match(g):
        g = g.split("=", 1)[1].strip()
    if p == g:
        return bool(p)
    if _PLAIN_NUMBER.match(p) and _PLAIN_NUMBER.match(g):  # before the comma split: "1,000" is a number
        return numeric_match(p, g, rel_tol=rel_tol, abs_tol=1e-12)
    sp, sg = _split_top(p), _split_top(g)
    if sp is not None or sg is not None:
        if sp is None or sg is None or len(sp[1]) != len(sg[1]):
            return False
        if {sp[0], sg[0]} <= {"{", "\\{"} and sp[0]:  # sets: order-free one-to-one matching
            left = list(sg[1])
            for a in sp[1]:
                hit = next((i for i, b in enumerate(left) if _scalar_equal(a, b, rel_tol)), None)
                if hit is None:
                    return False
                left.pop(hit)
            return True
        if (sp[0], sp[2]) != (sg[0], sg[2]):  # (1,2] is not [1,2]; a bare "1, 2" matches "(1, 2)" only bare
            return False
        return all(_scalar_equal(a, b, rel_tol) for a, b in zip(sp[1], sg[1]))
    return _scalar_equal(p, g, rel_tol)


def math_equal(pred: str | None, gt: str, rel_tol: float = 1e-6, timeout_s: float | None = 2.0) -> bool:
    """True when the answer ``pred`` is mathematically equal to ``gt`` (see module docstring). Never raises."""
    if not isinstance(pred, str) or not isinstance(gt, str) or not pred.strip():
        return False
    try:
        with _time_limit(timeout_s):
            return _equal(pred, gt, rel_tol)
    except _Timeout:
        return False
    except Exception:  # noqa: BLE001 - hostile model output must score 0, whatever sympy raises
        return False

