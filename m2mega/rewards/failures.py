"""Reward failures per training step, for the training log.

Rewards never raise because of model output: a custom reward function that raises, hangs or returns a
non-number, and a math comparison that runs into its hard time limit, score 0 for that sample and are
counted (:func:`m2mega.rewards.custom.custom_failures`, :func:`m2mega.rewards.sandbox.outcome_counts`).
:class:`RewardFailureMeter` turns those process-wide totals into per-step counts::

    meter = RewardFailureMeter()          # once, before training
    ...score a step's rollouts...
    metrics.update(meter.step())          # {"custom_reward_failures": 3.0, "grader_timeouts": 0.0, ...}

A step's counts are what failed since the previous ``step()`` call in this process (so rewards computed
for validation between two steps count towards the next one). Counts are this process's: each rank
scores its own rollouts.
"""

from __future__ import annotations

from .custom import custom_failures
from .sandbox import outcome_counts

__all__ = ["FAILURE_KINDS", "RewardFailureMeter", "reward_failure_totals"]

FAILURE_KINDS = ("custom_reward_failures", "grader_timeouts", "grader_errors")
_GRADER_OPS = ("math_equal", "math_value")  # custom functions' timeouts count as custom failures


def reward_failure_totals() -> dict[str, int]:
    """Totals so far in this process: ``custom_reward_failures`` (exceptions, timeouts, bad returns of
    custom reward functions), ``grader_timeouts`` (math/expression comparisons cut off by the time limit,
    scored wrong) and ``grader_errors`` (grader workers that died mid-call)."""
    sandbox = outcome_counts()
    return {
        "custom_reward_failures": sum(custom_failures().values()),
        "grader_timeouts": sum(sandbox.get((op, "timeout"), 0) for op in _GRADER_OPS),
        "grader_errors": sum(sandbox.get((op, "error"), 0) for op in _GRADER_OPS),
    }


class RewardFailureMeter:
    """Per-step deltas of :func:`reward_failure_totals` (see the module docstring)."""

    def __init__(self) -> None:
        self._last = reward_failure_totals()

    def step(self) -> dict[str, float]:
        """Failures since the previous call (or since this meter was made), as float metrics."""
        now = reward_failure_totals()
        out = {k: float(now[k] - self._last.get(k, 0)) for k in FAILURE_KINDS}
        self._last = now
        return out
