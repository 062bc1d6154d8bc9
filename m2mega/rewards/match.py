"""Rule-based answer matching: multiple-choice letters, numbers with tolerance, normalised free text.

Every parser here returns ``None`` for input it cannot read and never raises on model output. Rules are
deliberately conservative: an answer that names several different options, or no number, is wrong rather
than guessed at, so a policy cannot farm reward by listing candidates.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass

__all__ = [
    "ParsedNumber",
    "clean_math_text",
    "parse_choice",
    "choice_match",
    "parse_number",
    "numbers_close",
    "numeric_match",
    "normalize_text",
    "text_match",
]

# Characters models emit for "minus" (U+2212 minus sign, dashes, full-width/small hyphen-minus).
_MINUS = str.maketrans({"\u2212": "-", "\u2012": "-", "\u2013": "-", "\u2014": "-", "\ufe63": "-", "\uff0d": "-"})
# Longest input we try to interpret; beyond this a "short answer" is garbage and reading it is wasted work.
MAX_ANSWER_CHARS = 2000


# --------------------------------------------------------------------------- multiple choice

_CHOICE_FULL = re.compile(
    r"^(?:(?:the\s+)?(?:final\s+)?(?:correct\s+)?(?:answer|option|choice)\s*(?:is|:|：)?\s*:?\s*)?"
    r"[\(\[\{]?\s*([A-Za-z])\s*[\)\]\}]?\s*[.:：)]?$",
    re.IGNORECASE,
)
# "B. three metres", "(B) three metres", "B) three", "B: three": a letter label leading option text.
_CHOICE_LEAD = re.compile(r"^[\(\[]\s*([A-Za-z])\s*[\)\]]|^([A-Z])\s*[.:：)]\s+\S")
# "...the answer is (C)..." / "answer: c"
_CHOICE_PHRASE = re.compile(
    r"(?:answer|option|choice)\s*(?:is|:|：)\s*:?\s*[\(\[]?\s*([A-Za-z])\s*[\)\]]?(?![A-Za-z])", re.IGNORECASE
)
_CHOICE_TOKEN = re.compile(r"\(([A-Za-z])\)|(?<![A-Za-z'])([A-Z])(?![A-Za-z'])")


def parse_choice(text: str | None, n_options: int | None = None) -> str | None:
    """The option letter (upper case) that ``text`` names, or ``None`` if it names none or several.

    Accepted: ``"A"``, ``"a"``, ``"A."``, ``"(A)"``, ``"[A]"``, ``"A) left"``, ``"B. three metres"``,
    ``"answer: a"``, ``"The answer is (C)."``, ``"\\text{B}"``. ``"A or B"``, ``"A B C D"`` name several
    options and give ``None``. A lone upper-case ``I`` next to another letter is read as the pronoun.
    ``n_options`` (when known) rejects letters beyond the last option.
    """
    if not isinstance(text, str):
        return None
    s = text.strip()
    if not s or len(s) > MAX_ANSWER_CHARS:
        return None
    s = re.sub(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}", r"\1", s).strip().strip("$*").strip()
    letter: str | None = None
    m = _CHOICE_FULL.match(s)
    if m:
        letter = m.group(1)
    if letter is None:
        m = _CHOICE_LEAD.match(s)
        if m:
            letter = m.group(1) or m.group(2)
    if letter is None:
        hits = {h.upper() for h in _CHOICE_PHRASE.findall(s)}
        if len(hits) == 1:
            letter = hits.pop()
    if letter is None:
        toks = {a or b for a, b in _CHOICE_TOKEN.findall(s)}
        toks = {t.upper() for t in toks}
        if len(toks) > 1:
            toks.discard("I")
        if len(toks) == 1:
            letter = toks.pop()
    if letter is None:
        return None
    letter = letter.upper()
    if n_options is not None and not (0 <= ord(letter) - ord("A") < n_options):
        return None
    return letter


def choice_match(pred: str | None, gt: str, n_options: int | None = None) -> bool:
    """True when ``pred`` names the ground-truth option. Raises ``ValueError`` if ``gt`` names no option."""
    g = parse_choice(gt, n_options)
    if g is None:
        raise ValueError(f"ground-truth answer {gt!r} is not an option letter (answer_type='choice')")
    return parse_choice(pred, n_options) == g


# --------------------------------------------------------------------------- numbers


@dataclass(frozen=True)
class ParsedNumber:
    """A number read from text; ``percent`` is True when it was written with a ``%`` sign."""

    value: float
    percent: bool = False


_NUM = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d*)?|\.\d+"
_NUMBER_RE = re.compile(
    rf"""
    (?P<sign>[-+])?\s*
    (?:
        \\[dt]?frac\s*\{{\s*(?P<fn>[-+]?(?:{_NUM}))\s*\}}\s*\{{\s*(?P<fd>[-+]?(?:{_NUM}))\s*\}}
      |
        (?P<mant>{_NUM})(?P<exp>[eE][-+]?\d{{1,5}})?
        (?:\s*(?:\^|\*\*)\s*\{{?\s*(?P<pow>[-+]?\d{{1,5}})\s*\}}?)?
        (?:\s*(?:\\times|×|\*|·|\\cdot|x)\s*10\s*(?:\^|\*\*)\s*\{{?\s*(?P<sci>[-+]?\d{{1,5}})\s*\}}?)?
        (?:\s*/\s*(?P<den>{_NUM}))?
    )
    (?P<pct>\s*%)?
    """,
    re.VERBOSE,
)
_WORD_NUMBERS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen twenty".split()
    )
}
_SUPERSCRIPTS = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹⁻⁺", "0123456789-+")
_SUPERSCRIPT_RUN = re.compile("[⁰¹²³⁴⁵⁶⁷⁸⁹⁻⁺]+")
_LEAD_WORDS = re.compile(r"^(?:approximately|approx\.?|about|around|roughly|nearly|~|≈|\\approx|\\sim)\s*", re.I)


def clean_math_text(text: str) -> str:
    """Normalise the notation noise around a short math/number answer (no semantic change).

    Unicode minus signs and full-width forms, ``$`` delimiters, LaTeX spacing (``\\,``, ``\\!``, ``\\ ``,
    ``~``), ``\\left``/``\\right``, ``\\%``, ``{,}`` thousands groups, ``\\text{…}`` wrappers and degree
    marks are rewritten or dropped.
    """
    # Superscripts first: NFKC would turn "10²" into "102".
    s = _SUPERSCRIPT_RUN.sub(lambda m: "^{" + m.group(0).translate(_SUPERSCRIPTS) + "}", text)
    s = unicodedata.normalize("NFKC", s).translate(_MINUS).replace("\u2044", "/")
    s = s.replace("\\%", "%").replace("{,}", ",").replace("\\$", "").replace("$", "")
    s = re.sub(r"\\[,!;:> ]|\\quad|\\qquad", " ", s)
    s = re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)(?![A-Za-z])", "", s)
    s = re.sub(r"\\(?:text|textbf|mathrm|mathbf|operatorname)\s*\{([^{}]*)\}", r" \1 ", s)
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree", "", s)
    return " ".join(s.split())


def _to_float(num: str) -> float:
    return float(num.replace(",", ""))


def parse_number(text: str | None) -> ParsedNumber | None:
    """Read one number from a short answer, or ``None``.

    Rules: take the right-hand side of the last ``=`` (``"x = 5"``); drop a leading "approximately"/"≈";
    then read the *first* number: plain (``-3.5``, ``.5``), thousands groups (``1,234,567``, ``1{,}000``),
    scientific (``1.5e3``, ``1.5\\times10^{3}``, ``1.5×10^3``), a power (``2^{10}``), a fraction
    (``3/4``, ``\\frac{3}{4}``, ``-\\dfrac{1}{2}``) and a trailing ``%``. A whole-string number word
    (``"five"``) also counts. Non-finite results (``1e999``, a 10,000-digit integer) give ``None``.
    """
    if not isinstance(text, str):
        return None
    s = text.strip()
    if not s or len(s) > MAX_ANSWER_CHARS:
        return None
    s = clean_math_text(s)
    for sep in ("=", "\\approx", "≈"):
        if sep in s:
            s = s.rsplit(sep, 1)[1].strip()
    s = _LEAD_WORDS.sub("", s).strip()
    w = s.lower().rstrip(".")
    if w in _WORD_NUMBERS:
        return ParsedNumber(float(_WORD_NUMBERS[w]))
    m = _NUMBER_RE.search(s)
    if m is None:
        return None
    try:
        if m.group("fn") is not None:
            val = _to_float(m.group("fn")) / _to_float(m.group("fd"))
        else:
            mant = m.group("mant") + (m.group("exp") or "")
            val = _to_float(mant)
            if m.group("pow") is not None:
                val = val ** int(m.group("pow"))
            if m.group("sci") is not None:
                val = val * 10.0 ** int(m.group("sci"))
            if m.group("den") is not None:
                val = val / _to_float(m.group("den"))
    except (OverflowError, ZeroDivisionError, ValueError):
        return None
    if isinstance(val, complex) or not math.isfinite(val):
        return None
    if m.group("sign") == "-":
        val = -val
    return ParsedNumber(float(val), percent=m.group("pct") is not None)


def numbers_close(a: float, b: float, rel_tol: float = 1e-4, abs_tol: float = 1e-8) -> bool:
    """``math.isclose`` with the project's defaults (relative 1e-4, absolute 1e-8)."""
    return math.isclose(a, b, rel_tol=rel_tol, abs_tol=abs_tol)


def numeric_match(pred: str | None, gt: str, rel_tol: float = 1e-4, abs_tol: float = 1e-8) -> bool:
    """True when ``pred`` reads as the ground-truth number within tolerance.

    When exactly one side carries a ``%`` sign, ``50%`` and ``0.5`` are also accepted as equal. Raises
    ``ValueError`` when ``gt`` is not a number (a data error, not a model error).
    """
    g = parse_number(gt)
    if g is None:
        raise ValueError(f"ground-truth answer {gt!r} is not a number (answer_type='number')")
    p = parse_number(pred)
    if p is None:
        return False
    cands = [p.value]
    if p.percent != g.percent:
        cands += [p.value * 100.0, p.value / 100.0]
    return any(numbers_close(c, g.value, rel_tol, abs_tol) for c in cands)


# --------------------------------------------------------------------------- free text

_ARTICLES = re.compile(r"^(?:a|an|the)\s+")


def normalize_text(text: str | None) -> str:
    """Case-folded, NFKC, LaTeX text wrappers dropped, punctuation at the ends and a leading article removed,
    whitespace collapsed. ``"The Red cube."`` -> ``"red cube"``."""
    if not isinstance(text, str):
        return ""
    s = unicodedata.normalize("NFKC", text[:MAX_ANSWER_CHARS])
    s = re.sub(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}", r"\1", s).replace("$", "")
    s = " ".join(s.casefold().split())
    s = s.strip(" .,;:!?'\"`*()[]{}。，！？")
    return _ARTICLES.sub("", s)


def text_match(pred: str | None, gt: str) -> bool:
    """Normalised exact match (see :func:`normalize_text`); an empty prediction never matches."""
    p = normalize_text(pred)
    return bool(p) and p == normalize_text(gt)
