"""Reward functions on adversarial strings; exact EDNM values; per-task mixing and config errors."""

import math
import random
import string
import time

import pytest
import torch

from m2mega.rewards import (
    RewardConfig,
    compute_reward,
    compute_rewards,
    ednm_reward,
    ednm_reward_tensor,
    extract_answer,
    format_reward,
    longest_loop,
    math_equal,
    ngram_repetition_rate,
    numeric_match,
    parse_choice,
    parse_number,
    repetition_penalty,
    repetition_stats,
    text_match,
)

WELL = "<think>{t}</think><answer>{a}</answer>"


def resp(a: str, t: str = "Reasoning about the figure step by step.") -> str:
    return WELL.format(t=t, a=a)


def _garbage(n: int, seed: int) -> str:
    rng = random.Random(seed)
    alphabet = string.printable + "<>{}\\$−–√π∞中文ß\u200b\x00"
    return "".join(rng.choice(alphabet) for _ in range(n))


# --------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    "text, expected",
    [
        (resp("42"), "42"),
        ("<answer>1</answer> then <answer>2</answer>", "2"),  # last block wins
        ("<answer><answer>5</answer></answer>", "5"),  # nested: innermost closing block
        ("<answer>5", None),  # unclosed: not read by default
        ("<answer>5</answer", None),
        ("</answer>5<answer>", None),  # tags in the wrong order
        ("\\boxed{1} and finally \\boxed{2}", "2"),  # multiple boxed: last
        (resp("\\boxed{\\frac{1}{2}}"), "\\frac{1}{2}"),  # nested braces inside boxed
        ("\\boxed{\\frac{1}{2}", None),  # unbalanced boxed
        ("text \\boxed 7", "7"),
        (resp("$3.5$."), "3.5"),
        (resp("   "), None),  # empty answer block
        ("", None),
        ("no tags at all, the answer is 5", None),
        ("<answer>\\fbox{B}</answer>", "B"),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_unclosed_opt_in():
    assert extract_answer("<think>x</think><answer> 12 ", allow_unclosed=True) == "12"
    assert extract_answer(None) is None  # type: ignore[arg-type]


# --------------------------------------------------------------------------- choice


@pytest.mark.parametrize(
    "text, expected",
    [
        ("A", "A"),
        ("a", "A"),
        ("A.", "A"),
        ("(A)", "A"),
        ("[c]", "C"),
        ("answer: a", "A"),
        ("Answer: (D)", "D"),
        ("The answer is (C).", "C"),
        ("B. three metres", "B"),
        ("(B) left of the chair", "B"),
        ("\\text{B}", "B"),
        ("**B**", "B"),
        ("I think it is B", "B"),
        ("A or B", None),  # several options: never guessed
        ("A B C D", None),
        ("a cat", None),
        ("left", None),
        ("", None),
        ("Ｂ", None),  # full-width letter is not ASCII option text: no match rather than a guess
    ],
)
def test_parse_choice(text, expected):
    assert parse_choice(text) == expected


def test_parse_choice_respects_option_count():
    assert parse_choice("E", n_options=4) is None
    assert parse_choice("D", n_options=4) == "D"


# --------------------------------------------------------------------------- numbers


@pytest.mark.parametrize(
    "text, value, percent",
    [
        ("−3.5", -3.5, False),  # unicode minus
        ("– 2", -2.0, False),  # en dash with a space
        ("1,234,567", 1234567.0, False),  # thousands separators
        ("1{,}000", 1000.0, False),
        ("50%", 50.0, True),
        ("12.5\\%", 12.5, True),
        ("1.5e3", 1500.0, False),
        ("2E-2", 0.02, False),
        ("1.5 \\times 10^{3}", 1500.0, False),
        ("1.5×10^-3", 0.0015, False),
        ("\\frac{1}{2}", 0.5, False),
        ("-\\dfrac{3}{4}", -0.75, False),
        ("3/4", 0.75, False),
        ("x = 5", 5.0, False),
        ("approximately 2.5 meters", 2.5, False),
        ("3.5 m^2", 3.5, False),
        ("10²", 100.0, False),
        ("½", 0.5, False),
        ("five", 5.0, False),
        ("$12.$", 12.0, False),
        ("12345678901234567890", 12345678901234567890.0, False),
    ],
)
def test_parse_number(text, value, percent):
    p = parse_number(text)
    assert p is not None and p.value == pytest.approx(value, rel=1e-12) and p.percent is percent


@pytest.mark.parametrize("text", ["", "abc", "1e999", "9" * 5000, "1/0", "\\frac{1}{0}", "10^{99999}", None])
def test_parse_number_rejects(text):
    assert parse_number(text) is None


def test_numeric_match_tolerance_and_percent():
    assert numeric_match("3.14159", "3.1416", rel_tol=1e-4)
    assert not numeric_match("3.2", "3.1416", rel_tol=1e-4)
    assert numeric_match("0.5", "50%") and numeric_match("50%", "0.5") and numeric_match("50 %", "50%")
    assert not numeric_match("0.5", "50")  # leniency only when exactly one side has a % sign
    assert numeric_match("1,000", "1000") and numeric_match("1e3", "1000")
    assert numeric_match("0", "0") and not numeric_match("1e-7", "0", abs_tol=1e-8)
    with pytest.raises(ValueError, match="not a number"):
        numeric_match("1", "many")


def test_text_match():
    assert text_match("The Red Cube.", "red cube")
    assert not text_match("", "")
    assert not text_match("red", "red cube")


# --------------------------------------------------------------------------- math


@pytest.mark.parametrize(
    "pred, gt",
    [
        ("\\frac{1}{2}", "0.5"),
        ("\\frac12", "1/2"),
        ("\\dfrac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}"),
        ("2\\sqrt{2}", "\\sqrt{8}"),
        ("x = 5", "5"),
        ("2x+1", "1 + 2 x"),
        ("(x-1)(x+1)", "x^2-1"),
        ("\\sin^2 x+\\cos^2 x", "1"),
        ("\\log_2 8", "3"),
        ("\\sqrt[3]{27}", "3"),
        ("-\\frac{1}{3}", "−1/3"),
        ("2^{-1}", "0.5"),
        ("1,000", "1000"),
        ("50\\%", "0.5"),
        ("(1, 2]", "(1,2]"),
        ("\\{1, 2, 3\\}", "\\{3, 1, 2\\}"),
        ("\\pi r^2", "r^2\\pi"),
        ("90^\\circ", "90"),
        ("3!", "6"),
    ],
)
def test_math_equal_true(pred, gt):
    assert math_equal(pred, gt)


@pytest.mark.parametrize(
    "pred, gt",
    [
        ("x^2", "x^3"),
        ("(1,2)", "[1,2]"),  # interval brackets matter
        ("0.33", "1/3"),
        ("2x", "2y"),
        ("", "1"),
        ("1", ""),
        ("9**9**9**9", "1"),  # refused (would need ~10^8 digits), never hangs
        ("10^{100000}", "1"),
        ("__import__('os').system('true')", "0"),  # not code: a parse error, never evaluated
        ("lambda: 2", "1"),  # ("lambda: 1" reads as the labelled answer 1, like "x: 1"; code safety below)
        ("((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((1", "1"),
    ],
)
def test_math_equal_false(pred, gt):
    assert not math_equal(pred, gt)


def test_math_equal_hostile_inputs_are_fast():
    hostile = ["9**9**9**9", "(" * 5000 + "1" + ")" * 5000, "2^" * 3000 + "2", "x" * 10000, _garbage(10_000, 1),
               "9" * 10000, "\\frac{" * 500, "!" * 1000, "3" + "!" * 50]  # fmt: skip
    t0 = time.perf_counter()
    for h in hostile:
        assert not math_equal(h, "1")
        assert not math_equal("1", h)
    assert time.perf_counter() - t0 < 5.0


def test_math_equal_never_runs_model_text(tmp_path):
    planted = tmp_path / "pwned"
    for code in (f"__import__('pathlib').Path('{planted}').touch()", f"(lambda: open('{planted}', 'w'))()"):
        assert not math_equal(code, "1")
        assert math_equal(code, "1", timeout_s=0.5) is False
    assert not planted.exists()


def test_math_equal_bounded_on_any_thread():
    """The limit is a worker process, not SIGALRM: it holds off the main thread, and an outer timer of the
    caller (a watchdog, pytest-timeout) is never touched."""
    import signal
    import threading

    fired = []

    def mine(*a):
        fired.append(1)

    prev_handler = signal.signal(signal.SIGALRM, mine)
    prev_timer = signal.setitimer(signal.ITIMER_REAL, 30.0)
    try:
        out = []

        def work():
            t0 = time.perf_counter()
            out.append((math_equal("(1+10^{-40})^{10^{40}}", "1", timeout_s=1.0), math_equal("2x", "x+x"),
                        time.perf_counter() - t0))  # fmt: skip

        th = threading.Thread(target=work)
        th.start()
        th.join(30)
        assert out and out[0][0] is False and out[0][1] is True
        left = signal.getitimer(signal.ITIMER_REAL)[0]
        assert 20.0 < left < 30.0 and not fired and signal.getsignal(signal.SIGALRM) is mine
    finally:
        signal.setitimer(signal.ITIMER_REAL, *prev_timer)
        signal.signal(signal.SIGALRM, prev_handler)


# --------------------------------------------------------------------------- EDNM


def test_ednm_exact_values():
    # R = gamma * exp(-lambda * |x - gt| / (|gt| + eps)), gamma=1, lambda=2, eps=1e-6
    assert ednm_reward(10.0, 10.0) == 1.0
    assert ednm_reward(3.0, 4.0) == pytest.approx(math.exp(-2 * 1.0 / (4.0 + 1e-6)), rel=1e-15)
    assert ednm_reward(3.0, 4.0) == pytest.approx(0.6065307, abs=1e-7)  # exp(-0.5)
    assert ednm_reward(0.0, 5.0) == pytest.approx(math.exp(-2.0), abs=1e-6)  # 100% error
    assert ednm_reward(15.0, 10.0, gamma=0.5, lam=1.0) == pytest.approx(0.5 * math.exp(-0.5), rel=1e-6)
    assert ednm_reward(-2.0, -4.0) == pytest.approx(math.exp(-1.0), rel=1e-6)  # |gt| in the denominator
    assert ednm_reward(1e-6, 0.0) == pytest.approx(math.exp(-2.0), rel=1e-9)  # gt = 0 is defined via eps
    assert ednm_reward(None, 3.0) == 0.0
    assert ednm_reward(float("nan"), 3.0) == 0.0 and ednm_reward(float("inf"), 3.0) == 0.0
    with pytest.raises(ValueError):
        ednm_reward(1.0, 1.0, lam=-1.0)


def test_ednm_tensor_matches_scalar():
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(37, generator=g, dtype=torch.float64) * 20 - 10
    pred = gt + torch.randn(37, generator=g, dtype=torch.float64) * 3
    pred[3] = float("nan")
    out = ednm_reward_tensor(pred, gt, gamma=1.0, lam=2.0)
    ref = torch.tensor([ednm_reward(float(p), float(t)) for p, t in zip(pred, gt)], dtype=torch.float64)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=0)


def test_ednm_monotone_in_error_and_lambda():
    vals = [ednm_reward(10.0 + d, 10.0) for d in (0, 1, 2, 5, 10, 100)]
    assert all(a > b for a, b in zip(vals, vals[1:]))
    assert ednm_reward(12.0, 10.0, lam=1.0) > ednm_reward(12.0, 10.0, lam=2.0) > ednm_reward(12.0, 10.0, lam=5.0)


# --------------------------------------------------------------------------- format


@pytest.mark.parametrize(
    "text, ok",
    [
        ("<think>r</think><answer>a</answer>", True),
        ("  <think>\nr\n</think>\n\n<answer> a </answer>\n", True),
        ("<think>r</think>x<answer>a</answer>", False),  # text between blocks
        ("pre<think>r</think><answer>a</answer>", False),
        ("<think>r</think><answer>a</answer>post", False),
        ("<think>r</think><answer>a</answer><answer>b</answer>", False),  # two answers
        ("<think>r<think>s</think></think><answer>a</answer>", False),  # nested think
        ("<think>r</think><answer><answer>a</answer></answer>", False),
        ("<answer>a</answer><think>r</think>", False),  # order
        ("<think>r</think><answer>a", False),  # unclosed
        ("<think></think><answer>a</answer>", False),  # empty think
        ("<think>r</think><answer> </answer>", False),  # empty answer
        ("<think>r<answer>a</answer></think>", False),
        ("", False),
    ],
)
def test_format_reward(text, ok):
    assert format_reward(text) == (1.0 if ok else 0.0)


def test_format_reward_prefilled_think():
    assert format_reward("r</think><answer>a</answer>", think_prefilled=True) == 1.0
    assert format_reward("<think>r</think><answer>a</answer>", think_prefilled=True) == 0.0


# --------------------------------------------------------------------------- repetition


def test_ngram_repetition_rate_values():
    assert ngram_repetition_rate("one two three four five six", n=2) == 0.0
    # 8 tokens "a b a b a b a b": 7 bigrams, 2 unique -> 1 - 2/7
    assert ngram_repetition_rate("a b a b a b a b", n=2) == pytest.approx(1 - 2 / 7)
    assert ngram_repetition_rate([1, 2, 3, 1, 2, 3], n=3) == pytest.approx(1 - 3 / 4)
    assert ngram_repetition_rate("", n=4) == 0.0
    with pytest.raises(ValueError):
        ngram_repetition_rate("x", n=0)


def test_longest_loop_finds_planted_loop():
    rng = random.Random(0)
    prefix = [rng.randrange(10_000) for _ in range(301)]
    block = [rng.randrange(10_000, 20_000) for _ in range(17)]
    seq = prefix + block * 9 + [5, 6, 7]
    loop = longest_loop(seq, max_period=64)
    assert loop is not None and loop.period == 17 and loop.start == 301 and loop.span == 17 * 9
    st = repetition_stats(seq, max_period=64)
    assert st.loop_fraction == pytest.approx(17 * 9 / len(seq)) and st.looping
    # A phrase said twice is not a loop; random text has none.
    assert repetition_stats("we check it . we check it . then done", min_repeats=3).loop_fraction == 0.0
    assert repetition_stats(prefix).loop_fraction == 0.0
    assert longest_loop("中文中文中文").period == 2  # CJK: one token per character


def test_repetition_penalty_threshold():
    assert repetition_penalty(0.1, weight=1.0, threshold=0.3) == 0.0
    assert repetition_penalty(0.65, weight=1.0, threshold=0.3) == pytest.approx(0.5)
    assert repetition_penalty(1.0, weight=0.4, threshold=0.3) == pytest.approx(0.4)


# --------------------------------------------------------------------------- compute_reward


def test_compute_reward_choice_number_text_math():
    cfg = RewardConfig()
    r = compute_reward(resp("(B)"), "B", "general", "choice", cfg)
    assert (r.accuracy, r.correct, r.format) == (1.0, True, 1.0) and r.total == pytest.approx(1.1)
    r = compute_reward(resp("C"), "B", "general", "choice", cfg)
    assert (r.accuracy, r.correct, r.total) == (0.0, False, pytest.approx(0.1))
    assert compute_reward(resp("1,200"), "1200", "general", "number", cfg).correct
    assert compute_reward(resp("Left"), "left", "general", "text", cfg).correct
    assert compute_reward(resp("\\boxed{\\frac{1}{2}}"), "0.5", "general", "math", cfg).correct
    # No tags but a boxed answer: accuracy counts, format does not (unless require_format).
    r = compute_reward("so \\boxed{7}", "7", "general", "number", cfg)
    assert (r.accuracy, r.format) == (1.0, 0.0)
    strict = RewardConfig.from_dict({"default": {"require_format": True}})
    assert compute_reward("so \\boxed{7}", "7", "general", "number", strict).accuracy == 0.0


def test_compute_reward_ednm_vs_binary_switch():
    cfg = RewardConfig.from_dict({"spatial": {"numeric": "ednm", "ednm_lambda": 2.0, "format_weight": 0.0}})
    r = compute_reward(resp("3"), "4", "spatial", "number", cfg)
    assert r.accuracy == pytest.approx(math.exp(-2 * 1 / (4 + 1e-6)), rel=1e-12)
    assert r.total == pytest.approx(r.accuracy) and not r.correct  # 25% off > 10% correct tolerance
    assert compute_reward(resp("4.3"), "4", "spatial", "number", cfg).correct  # 7.5% off
    # Same answer, binary task: 0.
    assert compute_reward(resp("3"), "4", "general", "number", cfg).accuracy == 0.0
    lam5 = RewardConfig.from_dict({"spatial": {"numeric": "ednm", "ednm_lambda": 5.0}})
    assert compute_reward(resp("3"), "4", "spatial", "number", lam5).accuracy == pytest.approx(math.exp(-1.25), rel=1e-5)
    # EDNM applies to numeric answers only: spatial multiple choice stays binary.
    assert compute_reward(resp("A"), "A", "spatial", "choice", cfg).accuracy == 1.0


def test_compute_reward_repetition_penalty_switch():
    loop = "<think>" + "the cube is left of the ball . " * 40 + "</think><answer>A</answer>"
    off = compute_reward(loop, "A", "t", "choice", RewardConfig())
    on = compute_reward(loop, "A", "t", "choice", RewardConfig.from_dict({"t": {"repetition_penalty": True}}))
    assert off.repetition_rate > 0.8 and off.parts["repetition_penalty"] == 0.0
    expected = 0.5 * (off.repetition_rate - 0.3) / 0.7
    assert on.parts["repetition_penalty"] == pytest.approx(-expected)
    assert on.total == pytest.approx(off.total - expected)


ADVERSARIAL = [
    "",
    " ",
    "<answer>",
    "</answer>",
    "<answer></answer>",
    "<think><think><think>",
    "<answer><answer>",
    "\\boxed{",
    "\\boxed{}}}}",
    "\\boxed{\\boxed{\\boxed{",
    "<answer>" + "9" * 10000 + "</answer>",
    "<answer>9**9**9**9</answer>",
    "<answer>1e99999</answer>",
    "<answer>" + "(" * 3000 + "</answer>",
    "<answer>\x00\x01\x02</answer>",
    "<answer>−∞</answer>",
    "<answer>NaN</answer>",
    "<answer>inf</answer>",
    _garbage(10_000, 0),
]


@pytest.mark.parametrize("answer_type, gt", [("choice", "B"), ("number", "3.5"), ("text", "left"), ("math", "\\frac{1}{2}")])
def test_adversarial_responses_score_zero_and_never_raise(answer_type, gt):
    cfg = RewardConfig.from_dict({"spatial": {"numeric": "ednm", "repetition_penalty": True}})
    t0 = time.perf_counter()
    for task in ("general", "spatial"):
        for s in ADVERSARIAL + [None, 123]:
            r = compute_reward(s, gt, task, answer_type, cfg)  # type: ignore[arg-type]
            assert r.accuracy == 0.0 and not r.correct and r.format == 0.0, repr(s)[:80]
            assert math.isfinite(r.total) and r.total <= 0.0
        # Garbage inside well-formed tags: the format is right, the answer is not.
        g = "<think>" + _garbage(10_000, 2) + "</think><answer>" + _garbage(500, 3) + "</answer>"
        r = compute_reward(g, gt, task, answer_type, cfg)
        assert (r.accuracy, r.correct, r.format) == (0.0, False, 1.0)
    assert time.perf_counter() - t0 < 10.0


def test_config_errors():
    with pytest.raises(ValueError, match="answer_type"):
        compute_reward(resp("1"), "1", "t", "integer", RewardConfig())
    with pytest.raises(ValueError, match="unknown reward config key"):
        RewardConfig.from_dict({"spatial": {"numerik": "ednm"}})
    with pytest.raises(ValueError, match="numeric must be"):
        RewardConfig.from_dict({"spatial": {"numeric": "smooth"}})
    with pytest.raises(ValueError, match="format_weight"):
        RewardConfig.from_dict({"default": {"format_weight": -1}})
    strict = RewardConfig.from_dict({"spatial": {}}, strict_tasks=True)
    with pytest.raises(ValueError, match="no reward config for task 'math'"):
        compute_reward(resp("1"), "1", "math", "number", strict)
    with pytest.raises(ValueError, match="not an option letter"):
        compute_reward(resp("A"), "the red one", "t", "choice")
    with pytest.raises(ValueError, match="not a number"):
        compute_reward(resp("1"), "several", "t", "number")


def test_task_overrides_inherit_default():
    cfg = RewardConfig.from_dict({"default": {"format_weight": 0.5}, "spatial": {"numeric": "ednm"}})
    assert cfg.for_task("spatial").format_weight == 0.5 and cfg.for_task("other").numeric == "binary"


def test_compute_rewards_batch():
    out = compute_rewards([resp("A"), resp("B"), "junk"], "A", "general", "choice")
    assert [r.correct for r in out] == [True, False, False]
    out = compute_rewards([resp("2"), resp("x")], ["2", "x"], ["g", "g"], ["number", "text"])
    assert [r.correct for r in out] == [True, True]
    with pytest.raises(ValueError, match="answers has 1 entries for 2"):
        compute_rewards([resp("A"), resp("B")], ["A"], "g", "choice")
    with pytest.raises(ValueError, match="batch index 1"):
        compute_rewards([resp("A"), resp("B")], ["A", "none"], "g", "choice")


# --------------------------------------------------------------------------- eval metrics (scoring functions)


def _official_mra(pred, target, start=0.5, end=0.95, interval=0.05):
    # VSI-Bench's published formula, re-typed: num_pts = int((end - start) / interval + 2) -> 10 points.
    import numpy as np

    conf = np.linspace(start, end, int((end - start) / interval + 2))
    return float((abs(pred - target) / target <= 1 - conf).mean())


def test_mra_matches_official_formula_and_known_points():
    from m2mega.eval import MRA_THRESHOLDS, mean_relative_accuracy

    assert len(MRA_THRESHOLDS) == 10 and MRA_THRESHOLDS[0] == 0.5 and MRA_THRESHOLDS[-1] == 0.95
    assert mean_relative_accuracy(10.0, 10.0) == 1.0
    assert mean_relative_accuracy(6.0, 10.0) == pytest.approx(0.3)  # rel 0.4: thresholds 0.50, 0.55, 0.60
    assert mean_relative_accuracy(5.0, 10.0) == pytest.approx(0.1)
    assert mean_relative_accuracy(4.9, 10.0) == 0.0
    assert mean_relative_accuracy(None, 3.0) == 0.0 and mean_relative_accuracy(float("nan"), 3.0) == 0.0
    assert mean_relative_accuracy(0.0, 0.0) == 1.0 and mean_relative_accuracy(0.1, 0.0) == 0.0
    rng = random.Random(0)
    for _ in range(500):
        t = rng.uniform(0.1, 50)
        p = t * rng.uniform(0.3, 1.7)
        assert mean_relative_accuracy(p, t) == _official_mra(p, t)
    for t, p in [(10.0, 9.0), (10.0, 11.0), (20.0, 19.0), (4.0, 3.8)]:  # boundary cases: same float behaviour
        assert mean_relative_accuracy(p, t) == _official_mra(p, t)


def test_mra_from_text_and_aggregation():
    from m2mega.eval import accuracy, aggregate, benchmark_averages, format_table, mra_from_text

    assert mra_from_text(resp("about 9 meters"), "10") == pytest.approx(0.9)
    assert mra_from_text("3.0", 3.0) == 1.0 and mra_from_text("no number", "3") == 0.0
    with pytest.raises(ValueError):
        mra_from_text("1", "n/a")
    assert accuracy([True, False, 1.0, 0.0]) == 0.5 and math.isnan(accuracy([]))
    recs = [
        {"task": "spatial", "reward": 1.0, "correct": True, "response_length": 10},
        {"task": "spatial", "reward": 0.5, "correct": False, "response_length": 30},
        {"task": "math", "reward": 0.0, "correct": False, "response_length": None},
    ]
    t = aggregate(recs)
    assert list(t) == ["math", "spatial", "all"]
    assert t["spatial"] == {"n": 2, "reward": 0.75, "correct": 0.5, "response_length": 20.0}
    assert t["all"]["response_length"] == 20.0 and t["all"]["n_response_length"] == 2 and t["all"]["n"] == 3
    md = format_table(t, ["reward", "correct"])
    assert md.splitlines()[0] == "| group | n | reward | correct |" and "| spatial | 2 | 0.7500 | 0.5000 |" in md
    with pytest.raises(ValueError, match="'task'"):
        aggregate([{"reward": 1.0}])
    avg = benchmark_averages({"CV-Bench": 80.0, "VSI-Bench": 40.0}, {"spatial": ["CV-Bench", "VSI-Bench"]})
    assert avg == {"spatial": 60.0}
    with pytest.raises(ValueError, match="MathVista"):
        benchmark_averages({}, {"general": ["MathVista"]})


def _naive_longest_loop(seq, max_period):
    best = None  # (span, period, start), longest span, then shortest period, then earliest start
    n = len(seq)
    for p in range(1, min(max_period, n // 2) + 1):
        i = 0
        while i + p < n:
            j = i
            while j + p < n and seq[j] == seq[j + p]:
                j += 1
            run = j - i
            if run >= p and (best is None or run + p > best[0]):
                best = (run + p, p, i)
            i = j + 1 if j > i else i + 1
    return best


def test_longest_loop_matches_naive_reference():
    rng = random.Random(1)
    for trial in range(150):
        n = rng.randrange(2, 70)
        vocab = rng.choice([2, 3, 5, 20])
        seq = [rng.randrange(vocab) for _ in range(n)]
        if trial % 3 == 0:  # plant a loop
            blk = [rng.randrange(vocab) for _ in range(rng.randrange(1, 6))]
            at = rng.randrange(0, n)
            seq = seq[:at] + blk * rng.randrange(2, 6) + seq[at:]
        maxp = rng.choice([3, 8, 64])
        ref = _naive_longest_loop(seq, maxp)
        got = longest_loop(seq, max_period=maxp)
        if ref is None:
            assert got is None
        else:
            assert (got.span, got.period) == ref[:2], (seq, maxp)
            blk = seq[got.start : got.start + got.period]
            assert seq[got.start : got.start + got.span] == (blk * (got.span // got.period + 1))[: got.span]
    # token-id tensors and arrays take the same path as lists
    ids = torch.tensor([7, 8, 9] * 5 + [1])
    assert longest_loop(ids).span == longest_loop(ids.tolist()).span == 15
