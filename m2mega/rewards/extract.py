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

__all__ = ["extract_answer", "extract_boxed", "extract_tag_block", "strip_answer"]

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*")


def _balanced(text: str, open_idx: int) -> tuple[str, int] | None:
    """Content of the brace group opening at ``text[open_idx] == '{'`` and the index after it."""
    depth = 0
    for i in range(open_idx, len(text)):
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[open_idx + 1 : i], i + 1
    return None  # unbalanced: the group never closes


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, or ``\\boxed 5``) in ``text``."""
    if not text or "\\" not in text:
        return None
    found: str | None = None
    for m in _BOX_RE.finditer(text):
        j = m.end()
        if j < len(text) and text[j] == "{":
            grp = _balanced(text, j)
            if grp is not None:
                found = grp[0]
        elif m.group(0).endswith((" ", "\t")) and j < len(text):
            # "\boxed 5": TeX takes the next token. Only a space-separated form counts, so that
            # "\boxedx" is not read as the answer "x".
            tok = re.match(r"[^\s$<]+", text[j:])
            if tok:
                found = tok.group(0)
    return found


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
        if len(s) >= 2 and s.startswith("$") and s.endswith("$"):
            s = s.strip("$").strip()
        for lo, hi in (("\\(", "\\)"), ("\\[", "\\]")):
            if s.startswith(lo) and s.endswith(hi) and len(s) >= 4:
                s = s[2:-2].strip()
        if (s.endswith(".") and not s.endswith("..")) or s.endswith("。"):
            s = s[:-1].rstrip()
        if s == before:
            break
    return s


def extract_answer(response: str | None, allow_unclosed: bool = False, use_boxed: bool = True) -> str | None:
    """The final answer string of ``response`` (see the module docstring for the rules), or ``None``.

    Never raises: ``None``/non-string input gives ``None``.
    """
    if not isinstance(response, str) or not response:
        return None
    block = extract_tag_block(response, "answer", allow_unclosed=allow_unclosed)
    if block is not None:
        if use_boxed:
            boxed = extract_boxed(block)
            if boxed is not None:
                block = boxed
        out = strip_answer(block)
        return out if out else None
    if use_boxed:
        boxed = extract_boxed(response)
        if boxed is not None:
            out = strip_answer(boxed)
            return out if out else None
    return None
