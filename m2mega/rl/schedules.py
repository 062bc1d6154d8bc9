"""KL-coefficient schedules: the paper's cosine annealing (Eq. 7) and a static beta (the ablation baseline).

    beta_t = beta_min + 0.5 * (beta_max - beta_min) * (1 + cos(pi * t / T))      (paper Eq. 7)

beta starts at beta_max (keep the policy close to the ref_policy while rewards are noisy) and decays to
beta_min at t = T (let it explore once it has learnt the format). Steps outside [0, T] are clamped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["cosine_kl_beta", "static_kl_beta", "KLSchedule"]


def cosine_kl_beta(step: int | float, total_steps: int | float, beta_min: float, beta_max: float) -> float:
    """Eq. 7 at ``step`` (clamped to ``[0, total_steps]``)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if beta_min < 0 or beta_max < beta_min:
        raise ValueError(f"need 0 <= beta_min <= beta_max, got beta_min={beta_min}, beta_max={beta_max}")
    t = min(max(float(step), 0.0), float(total_steps))
    return beta_min + 0.5 * (beta_max - beta_min) * (1.0 + math.cos(math.pi * t / total_steps))


def static_kl_beta(step: int | float, total_steps: int | float, beta: float) -> float:
    """A constant ``beta`` (same signature as :func:`cosine_kl_beta` minus the range, for switching)."""
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    return float(beta)


@dataclass(frozen=True)
class KLSchedule:
    """``KLSchedule("cosine", total_steps=T, beta_min=..., beta_max=...)(step)`` or
    ``KLSchedule("static", beta=...)(step)`` (``"constant"`` is accepted as a synonym of ``"static"``)."""

    kind: str = "cosine"
    total_steps: int = 1
    beta_min: float = 0.0
    beta_max: float = 0.04
    beta: float = 0.04

    def __post_init__(self) -> None:
        if self.kind not in ("cosine", "static", "constant"):
            raise ValueError(f"KL schedule kind must be 'cosine' or 'static'/'constant', got {self.kind!r}")
        self(0)  # validates the numbers once, at construction

    def __call__(self, step: int | float) -> float:
        if self.kind in ("static", "constant"):
            return static_kl_beta(step, self.total_steps, self.beta)
        return cosine_kl_beta(step, self.total_steps, self.beta_min, self.beta_max)
