"""Pull the final answer out of a model response.

Rules (applied in order, first hit wins):

1. The **last** complete ``<answer>…</answer>`` block. With nested or repeated opening tags
   (``<answer><answer>5</answer>``) the innermost block that closes is used, i.e. the text between the
   last ``<answer>`` before the closing tag and that closing tag.
2. Inside that block (or, when there is no block, in the whole response) the **last** ``\\boxed{…}`` /
   ``\\fbox{…}`` with balanced braces, if any: models often write ``<answer>\\boxed{3}</answer>``.
3. ``allow_unclosed=True`` only: an ``<answer>`` that is never closed (generation stopped on the closing
   tag as a stop string, or ran out of tokens) yields the text after it.

Anything else gives ``None``; the reward for it is 0. Nothing here raises on any string, and every scan is
linear in the response length (no backtracking regexes), so 10k-character garbage is cheap.
"""

from __future__ import annotations

import re

__all__ = ["extract_all_boxed", "extract_answer", "extract_boxed", "extract_tag_block", "strip_answer"]

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*")
_TEX_TOKEN = re.compile(r"[^\s$<]+")
_BRACE = re.compile(r"[{}]")


def _brace_partners(text: str) -> dict[int, int]:
    """``{open index: close index}`` of every balanced brace pair, in one left-to-right pass.

    Scanning forward from each ``\\boxed{`` separately is quadratic on adversarial text (thousands of
    unclosed ``\\boxed{``); one stack pass over the whole string keeps extraction linear.
    """
    partners: dict[int, int] = {}
    stack: list[int] = []
    for m in _BRACE.finditer(text):  # the regex engine skips the text between braces at C speed
        i = m.start()
        if text[i] == "{":
            stack.append(i)
        elif stack:
            partners[stack.pop()] = i
    return partners


def extract_all_boxed(text: str) -> list[str]:
    """Contents of every ``\\boxed{...}`` / ``\\fbox{...}`` / ``\\boxed 5`` in ``text``, in order.

    Boxes nested inside another box are not listed separately. Linear in ``len(text)``.
    """
    if not text or "\\" not in text:
        return []
    partners: dict[int, int] | None = None
    found: list[str] = []
    covered = -1  # end of the last box taken: boxes inside it are part of its content
    for m in _BOX_RE.finditer(text):
        if m.start() < covered:
            continue
        j = m.end()
        if j < len(text) and text[j] == "{":
            if partners is None:
                partners = _brace_partners(text)
            close = partners.get(j)
            if close is not None:
                found.append(text[j + 1 : close])
                covered = close + 1
        elif m.group(0).endswith((" ", "\t")) and j < len(text):
            # "\boxed 5": TeX takes the next token. Only a space-separated form counts, so that
            # "\boxedx" is not read as the answer "x".
            tok = _TEX_TOKEN.match(text, j)
            if tok:
                found.append(tok.group(0))
                covered = tok.end()
    return found


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, or ``\\boxed 5``) in ``text``."""
    boxes = extract_all_boxed(text)
    return boxes[-1] if boxes else None


def extract_tag_block(text: str, tag: str, allow_unclosed: bool = False) -> str | None:
    """Content of the last complete ``<tag>…</tag>`` block (innermost when opening tags repeat)."""
    if not text:
        return None
    open_t, close_t = f"<{tag}>", f"</{tag}>"
    close = text.rfind(close_t)
    if close >= 0:
        start = text.rfind(open_t, 0, close)
        if start >= 0:
            # First close after that opening: the innermost block when tags nest.
            end = text.find(close_t, start)
            return text[start + len(open_t) : end]
    if allow_unclosed:
        start = text.rfind(open_t)
        if start >= 0 and close < start:
            return text[start + len(open_t) :]
    return None


def strip_answer(ans: str) -> str:
    """Trim whitespace, surrounding ``$…$`` / ``\\(…\\)`` / ``\\[…\\]`` math delimiters and a final period."""
    s = ans.strip()
    for _ in range(3):  # a few layers at most: "$\(x\)$." is rare but cheap to handle
        before = s
        if len(s) >= 2 and s.startswith("$") and s.endswith("$") and s.strip("$").count("$") == 0:
            s = s.strip("$").strip()  # one formula; "$1$ and $2$" is prose with several
        for lo, hi in (("\\(", "\\)"), ("\\[", "\\]")):
            if s.startswith(lo) and s.endswith(hi) and len(s) >= 4:
                s = s[2:-2].strip()
        if (s.endswith(".") and not s.endswith("..")) or s.endswith("。"):
            s = s[:-1].rstrip()
        if s == before:
            break
    return s


def _boxed_answer(text: str, all_boxed: bool) -> str | None:
    boxes = extract_all_boxed(text)
    if not boxes:
        return None
    if not all_boxed:
        return boxes[-1]
    # Several boxes ("\\boxed{1} and \\boxed{2}") are one answer listing several values; the same box
    # repeated is one value.
    uniq = list(dict.fromkeys(b.strip() for b in boxes if b.strip()))
    return ", ".join(uniq) if uniq else boxes[-1]


def extract_answer(
    response: str | None, allow_unclosed: bool = False, use_boxed: bool = True, all_boxed: bool = False
) -> str | None:
    """The final answer string of ``response`` (see the module docstring for the rules), or ``None``.

    ``all_boxed=True`` (math answers): every distinct box in scope, joined by ``", "``, instead of the last
    one. Never raises: ``None``/non-string input gives ``None``.
    """
    if not isinstance(response, str) or not response:
        return None
    block = extract_tag_block(response, "answer", allow_unclosed=allow_unclosed)
    if block is not None:
        if use_boxed:
            boxed = _boxed_answer(block, all_boxed)
            if boxed is not None:
                block = boxed
        out = strip_answer(block)
        return out if out else None
    if use_boxed:
        boxed = _boxed_answer(response, all_boxed)
        if boxed is not None:
            out = strip_answer(boxed)
            return out if out else None
    return None
