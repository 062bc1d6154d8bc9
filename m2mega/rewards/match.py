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
    "join_digit_groups",
    "parse_choice",
    "choice_match",
    "parse_number",
    "numbers_close",
    "numeric_match",
    "parsed_numbers_match",
    "plain_numbers_equal",
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
# Option labels anywhere in the answer: "(B)", "[B]", "B." / "B)" / "B:" followed by option text, and
# letters joined by or/and/,// ("A or B"). Two different labels mean the answer lists several options.
_CHOICE_LABELS = re.compile(
    r"[\(\[]\s*([A-Za-z])\s*[\)\]]|(?<![^\s(])([A-Z])\s*[.:：)](?=\s+\S)"
    r"|(?<![A-Za-z'])([A-Z])\s*(?:,|/|&|\bor\b|\band\b)\s*[\(\[]?([A-Z])(?![A-Za-z'])"
)


def _option_labels(s: str) -> set[str]:
    return {c.upper() for groups in _CHOICE_LABELS.findall(s) for c in groups if c}


def parse_choice(text: str | None, n_options: int | None = None) -> str | None:
    """The option letter (upper case) that ``text`` names, or ``None`` if it names none or several.

    Accepted: ``"A"``, ``"a"``, ``"A."``, ``"(A)"``, ``"[A]"``, ``"A) left"``, ``"B. three metres"``,
    ``"answer: a"``, ``"The answer is (C)."``, ``"\\text{B}"``. ``"A or B"``, ``"A B C D"``, ``"(A) or (B)"``,
    ``"A. 5 B. 6 C. 7 D. 8"`` name several options and give ``None``. A lone upper-case ``I`` next to another
    letter is read as the pronoun.
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
    if _option_labels(s) - {letter}:
        return None  # "(A) or (B)", "A. 5 B. 6 C. 7": a list of options is not an answer
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
# "1 000 000": a 1-3 digit group then groups of exactly three digits separated by (thin) spaces.
_DIGIT_GROUPS = re.compile(r"(?<![\d.,])\d{1,3}(?:[ \u00a0\u202f]\d{3})+(?![\d.,])")
_PERCENT_WORD = re.compile(r"\b(?:percent(?:age)?|pct)\b", re.I)  # no leading \s*: quadratic on spaces
# Strict reading: words may lead ("There are", "Answer:") and unit words may trail ("3 cm", "5 apples"),
# but nothing else: "3 or 4", "10 - 3", "2x", "4\\sqrt{2}", "2^3 + 1" are not one number.
_LEAD_OK = re.compile(r"(?:[^\W\d_]+[.:：,]?\s+|[:：]\s*)*")
# One unit word ("m^2", "m/s", "cm²"); words are separated by whitespace, so the regex cannot split a word
# in two different ways (no exponential backtracking on a long run of letters).
_UNIT_WORD = r"[^\W\d_]+(?:/[^\W\d_]+)*(?:\s*(?:\^\s*\{?\s*[23]\s*\}?|[²³]))?"
_TAIL_OK = re.compile(rf"\s*(?:{_UNIT_WORD}(?:\s+{_UNIT_WORD})*)?\s*\.?")
# Words that make a lead/tail more than decoration: negations, alternatives, ranges, operators, constants.
_NOT_DECORATION = frozenset(
    "not no never neither nor except without or and to between from either plus minus times over divided "
    "squared cubed sqrt root pi e i inf infinity log ln sin cos tan exp".split()
)
# Single letters after a number are variables ("2x"), except these unit symbols.
_UNIT_LETTERS = frozenset("mgsLlKhAVWJNC")
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
    s = join_digit_groups(s)
    s = re.sub(r"\\[,;:> ]|\\quad|\\qquad|~", " ", s)
    s = re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)(?![A-Za-z])", "", s)
    s = re.sub(r"\\(?:text|textbf|mathrm|mathbf|operatorname)\s*\{([^{}]*)\}", r" \1 ", s)
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree", "", s)
    s = _PERCENT_WORD.sub("%", s)
    return " ".join(s.split())


def join_digit_groups(s: str) -> str:
    """``12,\\!000`` -> ``12,000``; ``1 000 000`` / ``12\\,000`` (SI thin-space groups) -> ``1000000`` /
    ``12000``. A negative thin space ``\\!`` joins what it sits between; other text is left alone."""
    s = re.sub(r",\s*\\!\s*(?=\d{3})", ",", s).replace("\\!", "")
    s = re.sub(r"(?<=\d)\\,(?=\d{3}(?!\d))", " ", s)
    return _DIGIT_GROUPS.sub(lambda m: re.sub(r"[ \u00a0\u202f]", "", m.group(0)), s)


def _to_float(num: str) -> float:
    return float(num.replace(",", ""))


def _decoration_only(text: str, lead: bool) -> bool:
    """Whether ``text`` around a number is only words (a lead) or unit words (a tail), see ``_LEAD_OK``."""
    if not (_LEAD_OK if lead else _TAIL_OK).fullmatch(text):
        return False
    words = re.findall(r"[^\W\d_]+", text)
    if any(w.lower() in _NOT_DECORATION for w in words):
        return False
    return lead or not any(len(w) == 1 and w not in _UNIT_LETTERS for w in words)


def parse_number(text: str | None, strict: bool = True, words: bool = True) -> ParsedNumber | None:
    """Read one number from a short answer, or ``None``.

    Rules: take the right-hand side of the last ``=`` (``"x = 5"``); drop a leading "approximately"/"≈";
    then read the number: plain (``-3.5``, ``.5``), thousands groups (``1,234,567``, ``1{,}000``,
    ``12,\\!000``, ``1 000``), scientific (``1.5e3``, ``1.5\\times10^{3}``, ``1.5×10^3``), a power
    (``2^{10}``), a fraction (``3/4``, ``\\frac{3}{4}``, ``-\\dfrac{1}{2}``) and a trailing ``%``/"percent".
    A whole-string number word (``"five"``) also counts. Non-finite results (``1e999``, a 10,000-digit
    integer) give ``None``.

    ``strict`` (the default, what rewards use): the number must be the whole answer up to leading words
    ("There are 5") and trailing unit words ("3 cm", "5 apples"); ``"3 or 4"``, ``"10 - 3"``, ``"2x"``,
    ``"4\\sqrt{2}"``, ``"2^3 + 1"``, ``"not 5"`` give ``None`` (expressions are the math grader's job).
    ``strict=False`` reads the first number anywhere (for loose evaluation-time parsing).
    ``words=False`` (math answers) allows no words around the number at all, nor a left-hand side
    (``"a + 3z = 0"`` is an equation, not the number 0).
    """
    if not isinstance(text, str):
        return None
    s = text.strip()
    if not s or len(s) > MAX_ANSWER_CHARS:
        return None
    s = clean_math_text(s)
    if words and "=" in s:
        s = s.rsplit("=", 1)[1].strip()
    for sep in ("\\approx", "≈"):
        if sep in s:
            # "1/3 ≈ 0.33": the exact value when there is one, else the approximation ("≈ 3.5 m").
            exact, approx = s.rsplit(sep, 1)
            first = parse_number(exact, strict, words) if exact.strip() else None
            return first if first is not None else parse_number(approx, strict, words)
    s = _LEAD_WORDS.sub("", s).strip()
    w = s.lower().rstrip(".")
    if w in _WORD_NUMBERS:
        return ParsedNumber(float(_WORD_NUMBERS[w]))
    m = _NUMBER_RE.search(s)
    if m is None:
        return None
    if strict:
        lead_end = m.start() + len(m.group(0)) - len(m.group(0).lstrip())  # the sign group eats spaces
        lead, tail = s[:lead_end], s[m.end() :]
        if not words and (lead.strip() or tail.strip(" .")):
            return None
        if not (_decoration_only(lead, lead=True) and _decoration_only(tail, lead=False)):
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
    """``a`` (prediction) within ``rel_tol`` of ``b`` (ground truth), relative to ``b``'s size.

    ``abs_tol`` applies only when ``b == 0``: an absolute tolerance elsewhere would make every pair of
    small numbers equal (``2e-9`` and ``5e-9``, ``6.63e-34`` and ``1e-34``).
    """
    if not (math.isfinite(a) and math.isfinite(b)):
        return False
    if b == 0.0:
        return abs(a) <= abs_tol
    return abs(a - b) <= rel_tol * max(abs(a), abs(b))


def numeric_match(pred: str | None, gt: str, rel_tol: float = 1e-4, abs_tol: float = 1e-8) -> bool:
    """True when ``pred`` reads as the ground-truth number within tolerance.

    When exactly one side carries a ``%`` sign, ``50%`` and ``0.5`` are also accepted as equal. Raises
    ``ValueError`` when ``gt`` is not a number (a data error, not a model error).
    """
    g = parse_number(gt)
    if g is None:
        raise ValueError(f"ground-truth answer {gt!r} is not a number (answer_type='number')")
    p = parse_number(pred)
    return p is not None and parsed_numbers_match(p, g, rel_tol, abs_tol)


def parsed_numbers_match(p: ParsedNumber, g: ParsedNumber, rel_tol: float, abs_tol: float) -> bool:
    """:func:`numbers_close`, and when exactly one side carries ``%``, ``50%`` equals ``0.5`` too."""
    cands = [p.value] if p.percent == g.percent else [p.value, p.value * 100.0, p.value / 100.0]
    return any(numbers_close(c, g.value, rel_tol, abs_tol) for c in cands)


def plain_numbers_equal(pred: str, gt: str, rel_tol: float) -> bool | None:
    """For math answers: the verdict when both sides are one plain number and nothing else (relative
    tolerance), ``None`` when either is more than a number (then it is the math grader's call)."""
    p, g = parse_number(pred, words=False), parse_number(gt, words=False)
    if p is None or g is None:
        return None
    return parsed_numbers_match(p, g, rel_tol, abs_tol=1e-12)


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
