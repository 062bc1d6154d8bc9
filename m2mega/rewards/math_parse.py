"""A small recursive-descent parser from LaTeX/plain math answers straight to sympy objects.

``sympify``/``parse_expr`` are not used because they ``eval`` their input; here model text is only ever
tokenised and turned into sympy nodes by the parser, so ``__import__('os')`` is just a parse error.
Syntax: ``\\frac``/``\\dfrac`` (also ``\\frac12``), ``\\sqrt[n]{}``, ``^``/``**`` (right-associative),
implicit products (``2x``, ``2\\pi``, ``x(x+1)``), ``\\cdot``/``\\times``/``\\div``, ``\\pi``, ``e``,
``\\infty``, trig/log/exp functions (``\\log_2 8``, ``\\sin^2 x``), ``|x|``, ``n!``, subscripts (``a_1``),
Greek letters as symbols.

Guards against hostile input (each raises :class:`MathParseError`): more than ``MAX_SYMBOLIC_CHARS``
characters, numbers over ``MAX_DIGITS`` digits, nesting deeper than ``MAX_DEPTH``, powers whose value
would exceed ~``MAX_RESULT_DIGITS`` digits (``9**9**9**9``) and factorials above ``MAX_FACTORIAL``.
"""

from __future__ import annotations

import math
import re

import sympy

from .match import clean_math_text

__all__ = ["MathParseError", "parse_math", "MAX_SYMBOLIC_CHARS"]

MAX_SYMBOLIC_CHARS = 300
MAX_DIGITS = 50
MAX_DEPTH = 60
MAX_RESULT_DIGITS = 10_000
MAX_FACTORIAL = 1000


class MathParseError(ValueError):
    """The text is not a math expression this parser reads (or it was refused as too costly)."""


# --------------------------------------------------------------------------- tokenizer

_TOKEN_RE = re.compile(
    r"\s*(?:(?P<num>\d+(?:\.\d*)?|\.\d+)|(?P<cmd>\\[A-Za-z]+|\\[{}|])|(?P<word>[A-Za-z]+)"
    r"|(?P<op>\*\*|[-+*/^!(){}\[\]|,_]))"
)
_FUNCS = {
    "sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan, "cot": sympy.cot, "sec": sympy.sec,
    "csc": sympy.csc, "arcsin": sympy.asin, "arccos": sympy.acos, "arctan": sympy.atan,
    "asin": sympy.asin, "acos": sympy.acos, "atan": sympy.atan, "sinh": sympy.sinh, "cosh": sympy.cosh,
    "tanh": sympy.tanh, "exp": sympy.exp, "ln": sympy.log, "log": sympy.log, "sqrt": sympy.sqrt,
    "abs": sympy.Abs,
}  # fmt: skip
_CONSTS = {"pi": sympy.pi, "infty": sympy.oo, "infinity": sympy.oo, "e": sympy.E}
_MUL_CMDS = {"\\cdot", "\\times", "\\ast"}
_FRAC_CMDS = {"\\frac", "\\dfrac", "\\tfrac", "\\cfrac"}


def _tokenize(s: str) -> list[tuple[str, str]]:
    toks: list[tuple[str, str]] = []
    pos = 0
    s = s.rstrip()
    while pos < len(s):
        m = _TOKEN_RE.match(s, pos)
        if m is None or m.end() == pos:
            raise MathParseError(f"unexpected character {s[pos]!r}")
        pos = m.end()
        kind = m.lastgroup
        val = m.group(kind)
        if kind == "num" and len(val.replace(".", "")) > MAX_DIGITS:
            raise MathParseError("number too long")
        if kind == "op" and val == "**":
            val = "^"
        if kind == "cmd":
            if val in _MUL_CMDS:
                kind, val = "op", "*"
            elif val == "\\div":
                kind, val = "op", "/"
            elif val in ("\\{", "\\}"):
                kind, val = "op", val[1]
            elif val == "\\|":
                kind, val = "op", "|"
        toks.append((kind, val))
    return toks


# --------------------------------------------------------------------------- parser


def _check_pow(base: sympy.Expr, exp: sympy.Expr) -> None:
    """Refuse powers whose exact value would be astronomically large (the ``9**9**9**9`` guard)."""
    if not exp.is_number:
        return  # symbolic exponents stay unevaluated: nothing is computed, nothing to refuse
    try:
        e = abs(float(exp))
    except (TypeError, ValueError, OverflowError):
        raise MathParseError("non-real exponent") from None
    if base.is_number:
        try:
            b = abs(complex(sympy.N(base, 15)))
        except (TypeError, ValueError, OverflowError):
            raise MathParseError("unevaluable base") from None
        if b in (0.0, 1.0):
            return
        if e * abs(math.log10(b)) > MAX_RESULT_DIGITS:
            raise MathParseError("power too large")
    elif e > MAX_RESULT_DIGITS:
        raise MathParseError("exponent too large")


class _Parser:
    def __init__(self, toks: list[tuple[str, str]]):
        self.toks = toks
        self.i = 0
        self.depth = 0

    def peek(self) -> tuple[str, str] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self) -> tuple[str, str]:
        t = self.peek()
        if t is None:
            raise MathParseError("unexpected end")
        self.i += 1
        return t

    def expect(self, val: str) -> None:
        t = self.take()
        if t[1] != val:
            raise MathParseError(f"expected {val!r}, got {t[1]!r}")

    def parse(self) -> sympy.Expr:
        e = self.expr()
        if self.peek() is not None:
            raise MathParseError(f"trailing token {self.peek()[1]!r}")
        return e

    def expr(self) -> sympy.Expr:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise MathParseError("nesting too deep")
        left = self.term()
        while (t := self.peek()) is not None and t[1] in "+-" and t[0] == "op":
            self.take()
            right = self.term()
            left = left + right if t[1] == "+" else left - right
        self.depth -= 1
        return left

    def _starts_atom(self, t: tuple[str, str] | None) -> bool:
        if t is None:
            return False
        kind, val = t
        return kind in ("num", "word") or (kind == "cmd" and val not in ("\\right",)) or val in ("(", "{", "[")

    def term(self) -> sympy.Expr:
        left = self.unary()
        while True:
            t = self.peek()
            if t is not None and t[0] == "op" and t[1] in "*/":
                self.take()
                right = self.unary()
                if t[1] == "*":
                    left = left * right
                else:
                    if right == 0:
                        raise MathParseError("division by zero")
                    left = left / right
            elif self._starts_atom(t):  # implicit product: 2x, 2\pi, x(x+1), 2\sqrt{2}
                left = left * self.power()
            else:
                return left

    def unary(self) -> sympy.Expr:
        t = self.peek()
        if t is not None and t[0] == "op" and t[1] in "+-":
            self.take()
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise MathParseError("nesting too deep")
            v = self.unary()
            self.depth -= 1
            return -v if t[1] == "-" else v
        return self.power()

    def power(self) -> sympy.Expr:
        base = self.postfix()
        t = self.peek()
        if t is not None and t[1] == "^":
            self.take()
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise MathParseError("nesting too deep")
            exp = self.unary()  # right-associative, allows 2^-1
            self.depth -= 1
            _check_pow(base, exp)
            return sympy.Pow(base, exp)
        return base

    def postfix(self) -> sympy.Expr:
        v = self.atom()
        while (t := self.peek()) is not None and t[1] == "!":
            self.take()
            if not (v.is_Integer and 0 <= int(v) <= MAX_FACTORIAL):
                raise MathParseError("factorial of a non-integer or too large")
            v = sympy.factorial(v)
        return v

    def group(self) -> sympy.Expr:
        """A TeX argument: ``{...}`` or a single token (``\\frac12`` has arguments ``1`` and ``2``)."""
        t = self.peek()
        if t is None:
            raise MathParseError("missing argument")
        if t[1] == "{":
            self.take()
            v = self.expr()
            self.expect("}")
            return v
        if t[0] == "num" and len(t[1]) > 1:  # \frac12 -> first digit only, rest stays in the stream
            self.toks[self.i] = ("num", t[1][1:])
            return sympy.Integer(t[1][0])
        if t[0] == "word" and len(t[1]) > 1:
            self.toks[self.i] = ("word", t[1][1:])
            return sympy.Symbol(t[1][0])
        return self.atom()

    def _subscript(self, name: str) -> str:
        if (t := self.peek()) is not None and t[1] == "_":
            self.take()
            s = self.take()
            if s[1] == "{":
                parts = []
                while (u := self.take())[1] != "}":
                    parts.append(u[1])
                    if len(parts) > 20:
                        raise MathParseError("subscript too long")
                return f"{name}_{''.join(parts)}"
            return f"{name}_{s[1]}"
        return name

    def call(self, fn) -> sympy.Expr:
        base = None
        if fn is sympy.log and (t := self.peek()) is not None and t[1] == "_":
            self.take()
            base = self.group()
        if (t := self.peek()) is not None and t[1] == "^" and fn is not sympy.sqrt:  # \sin^2 x
            self.take()
            p = self.group()
            arg = self.power()
            _check_pow(fn(arg), p)
            return sympy.Pow(fn(arg), p)
        arg = self.power()
        return fn(arg, base) if base is not None else fn(arg)

    def atom(self) -> sympy.Expr:
        kind, val = self.take()
        if kind == "num":
            return sympy.Rational(val) if "." in val else sympy.Integer(val)
        if val in ("(", "[", "{"):
            close = {"(": ")", "[": "]", "{": "}"}[val]
            v = self.expr()
            self.expect(close)
            return v
        if val == "|":
            v = self.expr()
            self.expect("|")
            return sympy.Abs(v)
        if kind == "cmd":
            name = val[1:]
            if val in _FRAC_CMDS:
                num = self.group()
                den = self.group()
                if den == 0:
                    raise MathParseError("division by zero")
                return num / den
            if name == "sqrt":
                if (t := self.peek()) is not None and t[1] == "[":
                    self.take()
                    n = self.expr()
                    self.expect("]")
                    arg = self.group()
                    if n == 0:
                        raise MathParseError("zeroth root")
                    return sympy.root(arg, n)
                return sympy.sqrt(self.group())
            if name in _FUNCS:
                return self.call(_FUNCS[name])
            if name in _CONSTS:
                return _CONSTS[name]
            if name in ("left", "right"):
                return self.atom()
            # Greek letters and other commands become symbols: \alpha, \theta.
            return sympy.Symbol(self._subscript(name))
        if kind == "word":
            low = val.lower() if val.lower() in _FUNCS or val.lower() in _CONSTS else val
            if low in _FUNCS:
                return self.call(_FUNCS[low])
            if low in _CONSTS:
                return _CONSTS[low]
            if len(val) > 1:  # "xy" is x*y: put the tail back as its own word token
                self.toks.insert(self.i, ("word", val[1:]))
                val = val[0]
            if val == "e":
                return sympy.E
            return sympy.Symbol(self._subscript(val))
        raise MathParseError(f"unexpected token {val!r}")


def parse_math(text: str) -> sympy.Expr:
    """Parse a short LaTeX/plain math answer into a sympy expression (no ``eval``). Raises MathParseError."""
    if len(text) > MAX_SYMBOLIC_CHARS:
        raise MathParseError("expression too long")
    s = clean_math_text(text)
    s = re.sub(r"\\(?:text|mathrm)\s*\{[A-Za-z ]*\}", " ", s)  # units: \text{cm}
    s = s.replace("%", "")
    toks = _tokenize(s)
    if not toks:
        raise MathParseError("empty expression")
    try:
        return _Parser(toks).parse()
    except RecursionError:
        raise MathParseError("nesting too deep") from None
