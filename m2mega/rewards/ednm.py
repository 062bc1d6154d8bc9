"""Exponential Decay Numeric Matching (EDNM), the paper's smooth reward for spatial numeric answers.

    R(x) = gamma * exp(-lambda * |x - x_gt| / (|x_gt| + eps))        (paper Sec. 3.2, Eq. 9)

with gamma = 1, lambda = 2 in the paper. The relative error makes the reward scale-free (a 10 cm miss on a
30 cm object costs as much as 1 m on 3 m), and the exponential keeps a non-zero gradient signal for far-off
guesses, unlike an exact-match reward. The paper prints the denominator as ``|x_gt| + eps`` loosely; we
follow the issue's reading ``(|x_gt| + eps)``, which also makes ``x_gt = 0`` well defined.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported lazily: the data tools use the scalar reward without it
    import torch

__all__ = ["ednm_reward", "ednm_reward_tensor", "relative_error"]


def relative_error(pred: float, gt: float, eps: float = 1e-6) -> float:
    """``|pred - gt| / (|gt| + eps)``; ``inf`` for a non-finite prediction."""
    if not (math.isfinite(pred) and math.isfinite(gt)):
        return math.inf
    return abs(pred - gt) / (abs(gt) + eps)


def ednm_reward(pred: float | None, gt: float, gamma: float = 1.0, lam: float = 2.0, eps: float = 1e-6) -> float:
    """EDNM reward of one prediction; ``None``/NaN/inf predictions score 0.

    >>> round(ednm_reward(3.0, 4.0), 6)  # relative error 0.25 -> exp(-0.5)
    0.606531
    """
    if lam < 0 or gamma < 0 or eps < 0:
        raise ValueError(f"EDNM needs gamma, lambda, eps >= 0, got gamma={gamma}, lambda={lam}, eps={eps}")
    if pred is None or not math.isfinite(gt):
        return 0.0
    err = relative_error(float(pred), float(gt), eps)
    if not math.isfinite(err):
        return 0.0
    return gamma * math.exp(-lam * err)


def ednm_reward_tensor(
    pred: "torch.Tensor", gt: "torch.Tensor", gamma: float = 1.0, lam: float = 2.0, eps: float = 1e-6
) -> "torch.Tensor":
    """Element-wise EDNM on tensors (broadcasting); NaN/inf predictions score 0. Computed in float64."""
    import torch

    p = pred.to(torch.float64)
    g = gt.to(torch.float64)
    err = (p - g).abs() / (g.abs() + eps)
    r = gamma * torch.exp(-lam * err)
    return torch.where(torch.isfinite(p) & torch.isfinite(g), r, torch.zeros_like(r))
