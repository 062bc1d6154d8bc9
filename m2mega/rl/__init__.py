"""GRPO algorithm maths shared by the trainer: advantages, Eq. 6 weights, dynamic sampling and the Eq. 7
KL schedule. Pure torch/Python; the loss itself lives in the fused GRPO kernel, and the curriculum vs
shuffled sample order in :mod:`m2mega.data.ordering`."""

from .advantages import (
    DynamicSampler,
    FillResult,
    dynamic_weights,
    group_advantages,
    group_weights,
    weighted_group_advantages,
    zero_variance_mask,
)
from .schedules import KLSchedule, cosine_kl_beta, static_kl_beta

__all__ = [
    "DynamicSampler",
    "FillResult",
    "KLSchedule",
    "cosine_kl_beta",
    "dynamic_weights",
    "group_advantages",
    "group_weights",
    "static_kl_beta",
    "weighted_group_advantages",
    "zero_variance_mask",
]
