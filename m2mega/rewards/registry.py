"""Per-task reward configuration and the reward entry point the GRPO trainer calls.

    total = accuracy_weight * accuracy + format_weight * format - repetition penalty

* ``accuracy`` is 0/1 from rule-based matching, except for numeric answers of tasks configured with
  ``numeric="ednm"``, where it is the EDNM value in [0, gamma]. ``correct`` is always a binary flag (for
  accuracy statistics and difficulty scoring): exact/tolerance match, or for EDNM a relative error at most
  ``ednm_correct_rel_tol``.
* ``format`` is 1 for ``<think>…</think><answer>…</answer>`` (see :mod:`m2mega.rewards.format`).
* the repetition penalty (off by default) is ``repetition_weight * max(0, rate - threshold)/(1 - threshold)``
  with ``rate`` the n-gram repetition rate of the whole response.

A config is a dict of task name -> overrides of :class:`TaskRewardConfig`, e.g.::

    {"default": {"format_weight": 0.1},
     "spatial": {"numeric": "ednm", "ednm_lambda": 2.0},
     "math":    {"repetition_penalty": True, "repetition_weight": 0.5}}

Tasks without an entry use ``"default"`` (itself defaulting to :class:`TaskRewardConfig`'s values);
``RewardConfig.from_dict(..., strict_tasks=True)`` makes an unknown task an error instead. Unknown keys,
bad values, an unknown ``answer_type`` and a ground truth that does not parse as its ``answer_type``
raise ``ValueError`` (configuration/data errors). Model output never raises: unreadable answers score 0.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from .custom import call_custom_function, check_custom_function
from .ednm import ednm_reward, relative_error
from .extract import extract_answer
from .format import format_reward
from .match import ParsedNumber, choice_match, parse_choice, parse_number, parsed_numbers_match, text_match
from .math_equiv import DEFAULT_MATH_TIMEOUT_S, math_equal, math_value
from .repetition import ngram_repetition_rate, repetition_penalty

__all__ = ["ANSWER_TYPES", "TaskRewardConfig", "RewardConfig", "RewardResult", "compute_reward", "compute_rewards"]

ANSWER_TYPES = ("choice", "number", "text", "math")
NUMERIC_MODES = ("binary", "ednm")


@dataclass(frozen=True)
class TaskRewardConfig:
    """Reward settings for one task. Each field is a switch for one of the paper's ablations."""

    numeric: str = "binary"  # "binary": tolerance match is 1/0; "ednm": smooth EDNM reward (paper Eq. 9)
    accuracy_weight: float = 1.0
    format_weight: float = 0.1
    require_format: bool = False  # accuracy counts only for well-formed responses (strict R1-style)
    rel_tol: float = 1e-4  # binary numeric match
    abs_tol: float = 1e-8
    math_rel_tol: float = 1e-6  # numeric tolerance inside math equivalence
    math_timeout_s: float = DEFAULT_MATH_TIMEOUT_S  # hard limit per math/expression/custom call (worker process)
    ednm_gamma: float = 1.0
    ednm_lambda: float = 2.0
    ednm_eps: float = 1e-6
    ednm_correct_rel_tol: float = 0.1  # EDNM answers within 10% count as `correct`
    repetition_penalty: bool = False
    repetition_weight: float = 0.5
    repetition_threshold: float = 0.3
    repetition_ngram: int = 4
    think_prefilled: bool = False  # the prompt already ends in "<think>"
    allow_unclosed_answer: bool = False  # read an <answer> that never closes (stop-string generation)
    custom_function: str | None = None  # "path/to/file.py:fn" replaces rule-based accuracy (m2mega.rewards.custom)

    def __post_init__(self) -> None:
        if self.numeric not in NUMERIC_MODES:
            raise ValueError(f"numeric must be one of {NUMERIC_MODES}, got {self.numeric!r}")
        for name in ("accuracy_weight", "format_weight", "rel_tol", "abs_tol", "math_rel_tol", "ednm_gamma",
                     "ednm_lambda", "ednm_eps", "ednm_correct_rel_tol", "repetition_weight"):  # fmt: skip
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if not (isinstance(self.math_timeout_s, (int, float)) and 0 < self.math_timeout_s <= 600):
            raise ValueError(f"math_timeout_s must be in (0, 600] seconds, got {self.math_timeout_s!r}")
        if self.custom_function is not None:
            object.__setattr__(self, "custom_function", check_custom_function(self.custom_function))
        if not 0.0 <= self.repetition_threshold < 1.0:
            raise ValueError(f"repetition_threshold must be in [0, 1), got {self.repetition_threshold!r}")
        if not (isinstance(self.repetition_ngram, int) and self.repetition_ngram >= 1):
            raise ValueError(f"repetition_ngram must be an int >= 1, got {self.repetition_ngram!r}")


_FIELDS = {f.name for f in dataclasses.fields(TaskRewardConfig)}


def _task_config(task: str, overrides: Mapping[str, Any], base: TaskRewardConfig) -> TaskRewardConfig:
    if not isinstance(overrides, Mapping):
        raise ValueError(f"reward config for task {task!r} must be a mapping, got {type(overrides).__name__}")
    unknown = sorted(set(overrides) - _FIELDS)
    if unknown:
        raise ValueError(f"unknown reward config key(s) {unknown} for task {task!r}; known: {sorted(_FIELDS)}")
    try:
        return dataclasses.replace(base, **overrides)
    except ValueError as e:
        raise ValueError(f"reward config for task {task!r}: {e}") from None


@dataclass(frozen=True)
class RewardConfig:
    """Per-task reward settings; ``default`` (``None`` = unknown tasks are an error) covers the rest."""

    tasks: Mapping[str, TaskRewardConfig] = field(default_factory=dict)
    default: TaskRewardConfig | None = field(default_factory=TaskRewardConfig)

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any] | None, strict_tasks: bool = False) -> "RewardConfig":
        """Build from ``{"default": {...}, "<task>": {...}}``; task entries override the default entry."""
        cfg = dict(cfg or {})
        default = _task_config("default", cfg.pop("default", {}) or {}, TaskRewardConfig())
        tasks = {str(t): _task_config(str(t), o, default) for t, o in cfg.items()}
        return cls(tasks=tasks, default=None if strict_tasks else default)

    def for_task(self, task: str) -> TaskRewardConfig:
        if task in self.tasks:
            return self.tasks[task]
        if self.default is None:
            raise ValueError(f"no reward config for task {task!r} (configured: {sorted(self.tasks)})")
        return self.default


@dataclass
class RewardResult:
    """One response's reward. ``accuracy`` is 0/1, or the EDNM value for EDNM-scored numbers."""

    total: float
    accuracy: float
    correct: bool
    format: float
    repetition_rate: float
    parts: dict[str, float] = field(default_factory=dict)
    extracted: str | None = None


def _validate_gt(answer: str, answer_type: str) -> None:
    """Ground truths are data: a bad one is an error naming it, not a silent zero for every rollout."""
    if answer_type == "choice" and parse_choice(answer) is None:
        raise ValueError(f"ground-truth answer {answer!r} is not an option letter (answer_type='choice')")
    if answer_type == "number" and parse_number(answer) is None:
        raise ValueError(f"ground-truth answer {answer!r} is not a number (answer_type='number')")


def _read_number(pred: str, cfg: TaskRewardConfig) -> ParsedNumber | None:
    """A plain number in-process; an expression (``4\\sqrt{2}``, ``10 - 3``) evaluated by the bounded math
    grader. ``"3 or 4"``, ``"2x"`` read as nothing: never as their first number."""
    p = parse_number(pred)
    if p is not None:
        return p
    v = math_value(pred, timeout_s=cfg.math_timeout_s)
    return None if v is None else ParsedNumber(v)


def _accuracy(pred: str | None, answer: str, answer_type: str, cfg: TaskRewardConfig) -> tuple[float, bool]:
    if pred is None:
        return 0.0, False
    if answer_type == "choice":
        ok = choice_match(pred, answer)
        return float(ok), ok
    if answer_type == "number":
        p, g = _read_number(pred, cfg), parse_number(answer)
        if p is None or g is None:
            return 0.0, False
        if cfg.numeric == "ednm":
            val = ednm_reward(p.value, g.value, cfg.ednm_gamma, cfg.ednm_lambda, cfg.ednm_eps)
            return val, relative_error(p.value, g.value, cfg.ednm_eps) <= cfg.ednm_correct_rel_tol
        ok = parsed_numbers_match(p, g, cfg.rel_tol, cfg.abs_tol)
        return float(ok), ok
    if answer_type == "math":
        ok = math_equal(pred, answer, rel_tol=cfg.math_rel_tol, timeout_s=cfg.math_timeout_s)
        return float(ok), ok
    ok = text_match(pred, answer)
    return float(ok), ok


def compute_reward(
    response: str,
    answer: str,
    task: str,
    answer_type: str,
    config: RewardConfig | None = None,
    extra: Mapping[str, Any] | None = None,
) -> RewardResult:
    """Reward of one ``response`` against the ground truth ``answer`` (see the module docstring).

    ``answer_type`` is one of ``"choice"``, ``"number"``, ``"text"``, ``"math"``. Raises ``ValueError`` for
    an unknown answer_type, a task missing from a strict config, or a ground truth that does not parse as
    its answer_type. Never raises because of ``response``: malformed output scores 0. A task with a
    ``custom_function`` takes any answer_type and gets its accuracy from that function, called with the
    whole response and ``extra`` (the record's other fields).
    """
    cfg = (config or RewardConfig()).for_task(task)
    if not isinstance(answer, str):
        raise ValueError(f"ground-truth answer must be a string, got {type(answer).__name__}")
    text = response if isinstance(response, str) else ""
    fmt = format_reward(text, cfg.think_prefilled)
    if cfg.custom_function is not None:
        pred = extract_answer(text, allow_unclosed=cfg.allow_unclosed_answer)
        acc, correct = call_custom_function(cfg.custom_function, text, answer, task, extra, cfg.math_timeout_s)
    else:
        if answer_type not in ANSWER_TYPES:
            raise ValueError(f"unknown answer_type {answer_type!r}; expected one of {ANSWER_TYPES}")
        _validate_gt(answer, answer_type)
        # Math answers may list several boxed values ("\\boxed{1} and \\boxed{2}"): read them all.
        pred = extract_answer(text, allow_unclosed=cfg.allow_unclosed_answer, all_boxed=answer_type == "math")
        acc, correct = _accuracy(pred, answer, answer_type, cfg)
    if cfg.require_format and fmt == 0.0:
        acc, correct = 0.0, False
    rate = ngram_repetition_rate(text, cfg.repetition_ngram)
    penalty = (
        repetition_penalty(rate, cfg.repetition_weight, cfg.repetition_threshold) if cfg.repetition_penalty else 0.0
    )
    total = cfg.accuracy_weight * acc + cfg.format_weight * fmt - penalty
    return RewardResult(
        total=total,
        accuracy=acc,
        correct=bool(correct),
        format=fmt,
        repetition_rate=rate,
        parts={
            "accuracy": cfg.accuracy_weight * acc,
            "format": cfg.format_weight * fmt,
            "repetition_penalty": -penalty if penalty else 0.0,
        },
        extracted=pred,
    )


def compute_rewards(
    responses: Sequence[str],
    answers: Sequence[str] | str,
    tasks: Sequence[str] | str,
    answer_types: Sequence[str] | str,
    config: RewardConfig | None = None,
    extras: Sequence[Mapping[str, Any] | None] | None = None,
) -> list[RewardResult]:
    """:func:`compute_reward` over a batch. ``answers``/``tasks``/``answer_types`` are per-response lists, or
    one string shared by all responses (the G rollouts of one prompt); ``extras`` one record-field mapping
    per response (for custom functions). Errors name the batch index."""
    n = len(responses)

    def _col(v: Sequence[str] | str, name: str) -> Sequence[str]:
        if isinstance(v, str):
            return [v] * n
        if len(v) != n:
            raise ValueError(f"{name} has {len(v)} entries for {n} responses")
        return v

    ans, tsk, typ = _col(answers, "answers"), _col(tasks, "tasks"), _col(answer_types, "answer_types")
    if extras is not None and len(extras) != n:
        raise ValueError(f"extras has {len(extras)} entries for {n} responses")
    config = config or RewardConfig()
    out = []
    for i in range(n):
        try:
            ext = extras[i] if extras is not None else None
            out.append(compute_reward(responses[i], ans[i], tsk[i], typ[i], config, ext))
        except ValueError as e:
            raise ValueError(f"batch index {i}: {e}") from None
    return out
