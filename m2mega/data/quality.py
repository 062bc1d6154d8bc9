"""Reasoning-trajectory quality on the paper's three axes (Sec. 2.1.1), by transparent rules.

Every rule gives a number in [0, 1]; an axis is a weighted mean of its rules; ``total`` is a weighted mean
of the axes (0.4 / 0.3 / 0.3 by default), forced to 0 when the tag structure is broken
(``gate_on_format``: SFT data that breaks the format would teach the format wrong). All thresholds live in
:class:`QualityConfig`.

**Structural correctness** (``structural``)
  * ``tags`` (0.4): 1 for exactly ``<think>…</think><answer>…</answer>``; 0.5 when both blocks exist and
    close but there is extra text, repetition or a wrong order; else 0.
  * ``answer_extractable`` (0.2): the answer block yields an answer (and, when ``answer_type`` is given,
    one of that type: an option letter / a number).
  * ``step_order`` (0.2): explicitly numbered steps ("Step 1", "1.", "1)") count up 1, 2, 3…: the share of
    consecutive pairs that do; 1 when steps are not numbered.
  * ``conclusion`` (0.2): the reasoning ends where the answer says it does: the final answer appears in the
    last step (or last 300 characters) of the think block.

**Cognitive load management** (``cognitive``)
  * ``step_count`` (1/3): number of steps within ``[min_steps, max_steps]`` where
    ``max_steps = base_max_steps + steps_per_complexity * complexity`` and complexity grows with the
    answer (0 for a choice/yes-no, 1 for a number or word, 1 + operators/3 for a math expression). Outside
    the range the score decays as ``steps/min`` or ``max/steps``. Steps are the numbered steps if there are
    two or more, else paragraphs if two or more, else sentences.
  * ``length`` (1/3): mean words per step within ``[min_words_per_step, max_words_per_step]`` and the whole
    think block under ``max_think_words``; the same ratio decay outside.
  * ``no_repetition`` (1/3): 1 up to an n-gram repetition rate of ``rep_ok``, falling linearly to 0 at
    ``rep_bad``; 0 for a loop (one block repeated back-to-back >= 3 times over >= 20% of the text).

**Verification richness** (``verification``)
  * ``check_markers`` (0.5): distinct self-check phrases ("verify", "double-check", "substitute back",
    "sanity check", "let me re-", "alternatively", "验证", … see ``VERIFY_PATTERNS``) over
    ``target_checks``, capped at 1.
  * ``late_check`` (0.25): a check phrase comes after the answer was first reached (checking a result,
    not "let me check the image"); without the answer in the text, one in the second half counts.
  * ``rederived`` (0.25): the final answer is reached twice or more in the think block (1), once (0.5).

``correct`` (not an axis) is filled when a ground truth is given: whether the answer is right by
:func:`m2mega.rewards.compute_reward`. Run as a filter::

    python -m m2mega.data.quality --input sft.jsonl --output sft.q.jsonl --min-quality 0.6 [--require-correct]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

from m2mega.rewards import (
    RewardConfig,
    compute_reward,
    extract_answer,
    extract_tag_block,
    is_well_formed,
    normalize_text,
    parse_choice,
    parse_number,
    repetition_stats,
)

__all__ = ["QualityConfig", "QualityScore", "score_trajectory", "score_row", "split_steps", "VERIFY_PATTERNS"]

VERIFY_PATTERNS: dict[str, str] = {
    "verify": r"\bverif(?:y|ies|ied|ying|ication)\b",
    "check": r"\b(?:double[- ]?check|re-?check|cross[- ]?check|sanity[- ]check|check(?:s|ed|ing)?)\b",
    "confirm": r"\bconfirm(?:s|ed|ing|ation)?\b",
    "substitute": r"\b(?:substitut(?:e|ing|ion)|plug(?:ging)?)\b[^.]{0,40}\bback\b",
    "recompute": r"\b(?:re-?calculat\w*|re-?comput\w*|re-?deriv\w*|re-?examin\w*|re-?evaluat\w*|let me re-?\w+)",
    "alternative": r"\b(?:alternatively|another (?:way|approach|method))\b",
    "wait": r"\bwait\b",
    "consistent": r"\bconsistent with\b|\bmatches (?:the|our)\b",
    "zh": r"验证|检查|核对|确认|再算|复核",
}
_VERIFY_RE = {k: re.compile(v, re.IGNORECASE) for k, v in VERIFY_PATTERNS.items()}
_STEP_MARK = re.compile(r"(?im)^\s*(?:\*\*|#+\s*)?(?:step\s*(\d+)|(\d+)\s*[.)、:](?!\d))")
_SENT_SPLIT = re.compile(r"(?<=[.!?。！？])\s+|(?<=[。！？])")
_WORD = re.compile(r"\w+")
_PLAIN_NUM = re.compile(r"^\s*[-+−]?\d[\d,]*(?:\.\d+)?\s*%?\s*$")


@dataclass(frozen=True)
class QualityConfig:
    """Thresholds and weights of the rules (see the module docstring)."""

    min_steps: int = 2
    base_max_steps: int = 12
    steps_per_complexity: float = 4.0
    min_words_per_step: float = 3.0
    max_words_per_step: float = 150.0
    max_think_words: int = 4000
    rep_ok: float = 0.25
    rep_bad: float = 0.6
    rep_ngram: int = 4
    target_checks: int = 2
    axis_weights: tuple[float, float, float] = (0.4, 0.3, 0.3)
    gate_on_format: bool = True


@dataclass
class QualityScore:
    """Axis scores in [0, 1], their weighted ``total`` (the filter value) and every rule's value."""

    structural: float
    cognitive: float
    verification: float
    total: float
    rules: dict[str, float] = field(default_factory=dict)
    n_steps: int = 0
    correct: bool | None = None

    @property
    def combined(self) -> float:
        return self.total


def split_steps(think: str) -> tuple[list[str], list[int]]:
    """Steps of a think block and the explicit step numbers found (empty when not numbered).

    Numbered steps if there are two or more markers, else blank-line paragraphs if two or more, else
    sentences.
    """
    marks = list(_STEP_MARK.finditer(think))
    if len(marks) >= 2:
        bounds = [m.start() for m in marks] + [len(think)]
        steps = [think[a:b].strip() for a, b in zip(bounds, bounds[1:])]
        head = think[: bounds[0]].strip()
        if head:
            steps.insert(0, head)
        nums = [int(m.group(1) or m.group(2)) for m in marks]
        return [s for s in steps if s], nums
    paras = [p.strip() for p in re.split(r"\n\s*\n", think) if p.strip()]
    if len(paras) >= 2:
        return paras, []
    return [s.strip() for s in _SENT_SPLIT.split(think) if s.strip()], []


def _ratio_in_range(x: float, lo: float, hi: float) -> float:
    if x < lo:
        return max(0.0, x / lo) if lo > 0 else 1.0
    if x > hi:
        return hi / x
    return 1.0


def _complexity(answer: str | None, answer_type: str | None) -> float:
    if not answer:
        return 1.0
    if answer_type == "choice" or normalize_text(answer) in ("yes", "no", "true", "false"):
        return 0.0
    if answer_type in ("number", "text") or _PLAIN_NUM.match(answer):
        return 1.0
    ops = len(re.findall(r"[-+*/^=]|\\[A-Za-z]+", answer))
    return 1.0 + ops / 3.0


def _answer_kind(answer: str, answer_type: str | None) -> str:
    if answer_type:
        return answer_type
    if len(answer.strip()) <= 4 and parse_choice(answer) is not None:
        return "choice"
    if _PLAIN_NUM.match(answer):
        return "number"
    return "math" if re.search(r"[\\^_{}=+*/]", answer) else "text"


def _occurrences(answer: str, text: str, answer_type: str | None) -> list[int]:
    """Character offsets in ``text`` where the final ``answer`` is stated."""
    kind = _answer_kind(answer, answer_type)
    if kind == "choice":
        letter = parse_choice(answer)
        if letter is None:
            return []
        return [m.start() for m in re.finditer(rf"(?<![A-Za-z])\(?{letter}\)?(?![A-Za-z])", text)]
    if kind == "number":
        num = parse_number(answer)
        if num is None:
            return []
        out = []
        for m in re.finditer(r"[-−]?\d[\d,]*(?:\.\d+)?", text):
            p = parse_number(m.group(0))
            if p is not None and abs(p.value - num.value) <= 1e-3 * max(1.0, abs(num.value)):
                out.append(m.start())
        return out
    if kind == "math":  # match with whitespace and $ removed, keeping a map back to offsets in text
        key = re.sub(r"[\s$]+", "", answer)
        keep = [i for i, c in enumerate(text) if not (c.isspace() or c == "$")]
        squeezed = "".join(text[i] for i in keep)
        hits, i = [], squeezed.find(key) if key else -1
        while i >= 0:
            hits.append(keep[i])
            i = squeezed.find(key, i + 1)
        return hits
    key = normalize_text(answer)
    return [m.start() for m in re.finditer(re.escape(key), text.lower())] if key else []


def score_trajectory(
    response: str,
    answer: str | None = None,
    answer_type: str | None = None,
    task: str = "default",
    config: QualityConfig | None = None,
    reward_config: RewardConfig | None = None,
) -> QualityScore:
    """Score one ``<think>…</think><answer>…</answer>`` trajectory (see the module docstring).

    ``answer``/``answer_type`` (the ground truth) sharpen the answer-dependent rules and fill ``correct``;
    without them the trajectory's own answer is used. Never raises on the trajectory text.
    """
    cfg = config or QualityConfig()
    text = response if isinstance(response, str) else ""
    rules: dict[str, float] = {}

    # ---- structural
    think = extract_tag_block(text, "think") or ""
    has_answer_block = extract_tag_block(text, "answer") is not None
    if is_well_formed(text):
        rules["tags"] = 1.0
    elif think.strip() and has_answer_block:
        rules["tags"] = 0.5
    else:
        rules["tags"] = 0.0
    final = extract_answer(text)
    if final is None:
        rules["answer_extractable"] = 0.0
    elif answer_type == "choice":
        rules["answer_extractable"] = float(parse_choice(final) is not None)
    elif answer_type == "number":
        rules["answer_extractable"] = float(parse_number(final) is not None)
    else:
        rules["answer_extractable"] = 1.0
    steps, nums = split_steps(think)
    if len(nums) >= 2:
        ok = sum(1 for a, b in zip(nums, nums[1:]) if b == a + 1) + (nums[0] in (0, 1))
        rules["step_order"] = ok / len(nums)
    else:
        rules["step_order"] = 1.0
    hits = _occurrences(final, think, answer_type) if final else []
    tail_start = min(len(think) - len(steps[-1]) if steps else len(think), max(0, len(think) - 300))
    rules["conclusion"] = float(any(h >= tail_start for h in hits))
    structural = 0.4 * rules["tags"] + 0.2 * (rules["answer_extractable"] + rules["step_order"] + rules["conclusion"])

    # ---- cognitive load
    cx = _complexity(answer if answer is not None else final, answer_type)
    max_steps = cfg.base_max_steps + cfg.steps_per_complexity * cx
    rules["step_count"] = _ratio_in_range(len(steps), cfg.min_steps, max_steps) if steps else 0.0
    n_words = len(_WORD.findall(think))
    wps = n_words / len(steps) if steps else 0.0
    rules["length"] = (
        min(_ratio_in_range(wps, cfg.min_words_per_step, cfg.max_words_per_step), _ratio_in_range(n_words, 0, cfg.max_think_words))
        if steps
        else 0.0
    )
    rep = repetition_stats(think or text, n=cfg.rep_ngram)
    rules["repetition_rate"] = rep.ngram_rate  # informational, not averaged
    rules["loop_fraction"] = rep.loop_fraction  # informational, not averaged
    if rep.looping or not think.strip():
        rules["no_repetition"] = 0.0
    else:
        span = max(1e-9, cfg.rep_bad - cfg.rep_ok)
        rules["no_repetition"] = min(1.0, max(0.0, 1.0 - (rep.ngram_rate - cfg.rep_ok) / span))
    cognitive = (rules["step_count"] + rules["length"] + rules["no_repetition"]) / 3.0

    # ---- verification richness
    found = {k: [m.start() for m in r.finditer(think)] for k, r in _VERIFY_RE.items()}
    kinds = [k for k, v in found.items() if v]
    rules["check_markers"] = min(1.0, len(kinds) / max(1, cfg.target_checks))
    positions = [p for v in found.values() for p in v]
    pivot = hits[0] if hits else len(think) // 2
    rules["late_check"] = float(any(p > pivot for p in positions))
    rules["rederived"] = 1.0 if len(hits) >= 2 else (0.5 if hits else 0.0)
    verification = 0.5 * rules["check_markers"] + 0.25 * (rules["late_check"] + rules["rederived"])

    w = cfg.axis_weights
    total = (w[0] * structural + w[1] * cognitive + w[2] * verification) / sum(w)
    if cfg.gate_on_format and rules["tags"] < 1.0:
        total = 0.0
    correct = None
    if answer is not None and answer_type is not None:
        correct = compute_reward(text, answer, task, answer_type, reward_config).correct
    return QualityScore(structural, cognitive, verification, total, rules, len(steps), correct)


def _assistant_text(row: dict) -> str | None:
    if isinstance(row.get("response"), str):
        return row["response"]
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs or not isinstance(msgs[-1], dict):
        return None
    last = msgs[-1]
    if last.get("role") != "assistant":
        return None
    c = last.get("content")
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        return "".join(p.get("text", "") for p in c if isinstance(p, dict) and p.get("type") == "text")
    return None


def score_row(row: dict, config: QualityConfig | None = None, reward_config: RewardConfig | None = None) -> QualityScore:
    """Score a JSONL row: its ``response`` field or final assistant message, against its ``answer``.

    Raises ``ValueError`` when the row has no trajectory (it ends at a user turn: an RL row)."""
    text = _assistant_text(row)
    if text is None:
        raise ValueError("row has no trajectory (no 'response' and no final assistant message)")
    ans, atype = row.get("answer"), row.get("answer_type")
    if not (isinstance(ans, str) and ans.strip() and isinstance(atype, str)):
        ans, atype = None, None
    return score_trajectory(text, ans, atype, str(row.get("task", "default")), config, reward_config)


# --------------------------------------------------------------------------- CLI


def _iter_jsonl(path: str) -> Iterator[tuple[int, Any]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({e})") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Score reasoning trajectories and filter by quality.")
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--min-quality", type=float, default=None, help="drop rows whose total is below this")
    ap.add_argument("--require-correct", action="store_true", help="drop rows whose answer is wrong")
    ap.add_argument("--detail", action="store_true", help="also write 'quality_detail' (axes and rules)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    from tqdm import tqdm

    counts = {"read": 0, "written": 0, "low_quality": 0, "wrong_answer": 0, "no_trajectory": 0, "bad_row": 0}
    examples: dict[str, list[str]] = {}
    with open(args.output, "w", encoding="utf-8") as out:
        for lineno, row in tqdm(_iter_jsonl(args.input), disable=args.no_progress, unit="rows"):
            counts["read"] += 1
            where = f"{args.input}:{lineno}" + (f" (id {row.get('id')})" if isinstance(row, dict) else "")
            if not isinstance(row, dict):
                counts["bad_row"] += 1
                examples.setdefault("bad_row", []).append(where)
                continue
            try:
                q = score_row(row)
            except ValueError as e:
                key = "no_trajectory" if "no trajectory" in str(e) else "bad_row"
                counts[key] += 1
                examples.setdefault(key, []).append(f"{where}: {e}")
                continue
            if args.min_quality is not None and q.total < args.min_quality:
                counts["low_quality"] += 1
                continue
            if args.require_correct and q.correct is False:
                counts["wrong_answer"] += 1
                continue
            row["quality"] = round(q.total, 6)
            if args.detail:
                d = asdict(q)
                row["quality_detail"] = {k: d[k] for k in ("structural", "cognitive", "verification", "rules", "n_steps")}
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            counts["written"] += 1
    report = {"counts": counts, "examples": {k: v[:5] for k, v in examples.items()}}
    print(json.dumps(report, indent=1), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
