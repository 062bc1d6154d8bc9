"""The reward graders against tests/data/grader_corpus.jsonl: hand-checked verdicts, from math-verify's own
test suite and m2mega's hard cases (see benchmarks/bench_graders.py, which prints the full table)."""

from __future__ import annotations

import gc
import json
import logging
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from m2mega.rewards import RewardConfig, compute_reward, sandbox

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "data" / "grader_corpus.jsonl"
LISTED_FP = ("number:first-number", "math:first-number", "choice")  # the false-positive kinds of issue 13


def _rows() -> list[dict]:
    return [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines()]


def test_corpus_is_well_formed():
    rows = _rows()
    assert len(rows) >= 300
    assert len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        assert r["answer_type"] in ("choice", "number", "text", "math"), r["id"]
        assert isinstance(r["expected"], bool) and r["response"] and r["answer"], r["id"]
    cats = {r["category"] for r in rows}
    for needed in ("number:first-number", "math:first-number", "choice", "text", "math:intervals",
                   "math:named-lhs", "math:several-boxed", "math:lists-sets", "math:matrix", "math:units",
                   "math:expressions", "math:hostile"):  # fmt: skip
        assert needed in cats, needed
    assert sum(r["category"].startswith("mv:") for r in rows) >= 200  # math-verify's own cases
    assert sum(not r["expected"] for r in rows) >= 100  # enough "wrong" rows to catch false positives


def _math_verify_verdict(r: dict) -> bool:
    from math_verify import parse, verify

    from m2mega.rewards.extract import extract_tag_block

    def delimit(s: str) -> str:  # as benchmarks/bench_graders.py: bare answers get $...$
        return s if any(d in s for d in ("$", "\\(", "\\[", "\\boxed")) else f"${s}$"

    text = extract_tag_block(r["response"], "answer")
    pred = r["response"] if text is None else delimit(text)
    try:
        return bool(verify(parse(delimit(r["answer"]), parsing_timeout=1), parse(pred, parsing_timeout=1),
                           timeout_seconds=1))
    except Exception:  # noqa: BLE001 - an error is a wrong verdict for the reference too
        return False


def _timed_verdicts(rows: list[dict]) -> tuple[list[bool], float]:
    """Verdicts of every row and the p99 latency (seconds) of the rows that are not hostile, with fresh,
    warmed-up grader workers (as the trainer and eval.bench start them). This process's own heap (pytest,
    torch, sympy imported by other tests) is frozen meanwhile so that its garbage-collector pauses are not
    counted as grader time."""
    sandbox.shutdown()
    sandbox.warm_up()
    cfg = RewardConfig()
    verdicts, times = [], []
    gc.collect()
    gc.freeze()
    try:
        for r in rows:
            t0 = time.perf_counter()
            verdicts.append(compute_reward(r["response"], r["answer"], "general", r["answer_type"], cfg).correct)
            if not r["category"].endswith("hostile"):
                times.append(time.perf_counter() - t0)
    finally:
        gc.unfreeze()
    times.sort()
    return verdicts, times[round(0.99 * (len(times) - 1))]


@pytest.mark.slow
def test_agreement_beats_math_verify_with_no_listed_false_positive_and_p99_under_100ms():
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    rows = _rows()
    verdicts, p99 = _timed_verdicts(rows)
    if p99 > 0.1:  # a busy moment on a shared machine: measure once more, with fresh workers
        verdicts, p99 = _timed_verdicts(rows)
    ok_now, ok_mv = defaultdict(list), defaultdict(list)
    false_pos = []
    for r, got in zip(rows, verdicts):
        for key in ("all", r["answer_type"], "mv" if r["id"].startswith("mv") else "own"):
            ok_now[key].append(got == r["expected"])
        if got and not r["expected"] and r["category"].startswith(LISTED_FP):
            false_pos.append(r["id"])
        if not r["category"].endswith("hostile"):  # math-verify's own timeout is seconds, signals only
            ok_mv["all"].append(_math_verify_verdict(r) == r["expected"])
    rate = {k: sum(v) / len(v) for k, v in ok_now.items()}
    assert false_pos == []
    # No verdict may get lost: the rows missed today are math-verify extraction corners (docs/rewards.md).
    wrong = {r["id"] for r, got in zip(rows, verdicts) if got != r["expected"]}
    assert wrong <= {"mv062", "mv104", "mv131", "mv172", "mv197", "mv258"}, sorted(wrong)
    # Measured 98.7% overall (math-verify 80.3%), 97.6% on math-verify's own cases (its own score 98.8%).
    assert rate["all"] >= 0.97, rate
    assert rate["choice"] == 1.0 and rate["text"] == 1.0 and rate["number"] >= 0.98, rate
    assert rate["math"] >= 0.96 and rate["mv"] >= 0.95, rate
    assert rate["all"] >= sum(ok_mv["all"]) / len(ok_mv["all"]), rate
    # Measured 63-69 ms on a 2-core machine with other jobs running (docs/rewards.md); 100 ms is the target.
    assert p99 <= 0.1, f"grader p99 latency {1e3 * p99:.0f} ms > 100 ms"


@pytest.mark.parametrize("answer_type", ["number", "math"])
@pytest.mark.parametrize("pred, gt", [("3 or 4", "3"), ("10 - 3", "10"), ("2x", "2"), ("4\\sqrt{2}", "4"),
                                      ("2^3 + 1", "8"), ("12,\\!000", "12"), ("1 000", "1"), ("2e-9", "5e-9"),
                                      ("6.63\\times10^{-34}", "1.0\\times10^{-34}")])  # fmt: skip
def test_issue_false_positives_are_wrong(answer_type, pred, gt):
    r = compute_reward(f"<think>t</think><answer>{pred}</answer>", gt, "general", answer_type)
    assert not r.correct and r.accuracy == 0.0


@pytest.mark.parametrize("pred", ["(A) or (B)", "A. 5 B. 6 C. 7 D. 8", "A or B", "(A) left (B) right"])
def test_issue_choice_lists_are_wrong(pred):
    assert not compute_reward(f"<answer>{pred}</answer>", "A", "general", "choice").correct


def test_ednm_reads_expressions_not_first_numbers():
    cfg = RewardConfig.from_dict({"spatial": {"numeric": "ednm"}})
    r = compute_reward("<answer>4\\sqrt{2}</answer>", "5.656854", "spatial", "number", cfg)
    assert r.correct and r.accuracy == pytest.approx(1.0, abs=1e-6)
    assert compute_reward("<answer>3 or 4</answer>", "3", "spatial", "number", cfg).accuracy == 0.0


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
