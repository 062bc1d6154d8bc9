"""GRPO group maths: group-relative advantages, zero-variance groups, the paper's dynamic advantage weights
(Eq. 6) and dynamic sampling (refill a batch when too many groups carry no signal).

Shapes: ``rewards`` and ``acc`` are ``[n_groups, G]`` (G rollouts of one prompt per row). A group is
*degenerate* (zero variance) when ``max - min <= tol`` over its rewards: every rollout scored the same, so
its advantages are all 0 and it only contributes the KL term.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Sequence, TypeVar

import torch

__all__ = [
    "zero_variance_mask",
    "group_advantages",
    "dynamic_weights",
    "group_weights",
    "weighted_group_advantages",
    "FillResult",
    "DynamicSampler",
]

T = TypeVar("T")


def _check_groups(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor [n_groups, G], got {getattr(x, 'shape', type(x))}")
    if x.shape[1] < 2:
        raise ValueError(f"{name} needs G >= 2 rollouts per group for a group baseline, got G={x.shape[1]}")
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).nonzero()[0].tolist()
        raise ValueError(f"{name} has a non-finite value at [group {bad[0]}, rollout {bad[1]}]")


def zero_variance_mask(rewards: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """``[n_groups]`` bool: True where every rollout of the group has the same reward (within ``tol``)."""
    _check_groups(rewards, "rewards")
    return (rewards.amax(dim=1) - rewards.amin(dim=1)) <= tol


def group_advantages(
    rewards: torch.Tensor,
    eps: float = 1e-6,
    drop_zero_variance: bool = True,
    unbiased: bool = True,
    zero_var_tol: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO advantages ``A = (r - mean_g(r)) / (std_g(r) + eps)`` per group, and a keep mask.

    Returns ``(adv [n_groups, G], keep [n_groups] bool)``. Zero-variance groups (see
    :func:`zero_variance_mask`) get advantage 0 either way; with ``drop_zero_variance=True`` their ``keep``
    is False so the trainer can leave them out of the batch (they would only add KL and dilute the
    per-token mean), with False they stay in. ``unbiased`` selects the sample std (``N - 1``, as TRL and
    verl compute it) or the population std. Computed in float64, returned in the input's float dtype.
    """
    _check_groups(rewards, "rewards")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    r = rewards.to(torch.float64)
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True, unbiased=unbiased)
    degenerate = zero_variance_mask(rewards, zero_var_tol)
    adv = (r - mean) / (std + eps)
    adv = torch.where(degenerate[:, None], torch.zeros_like(adv), adv)
    keep = ~degenerate if drop_zero_variance else torch.ones_like(degenerate)
    return adv.to(out_dtype), keep


def dynamic_weights(acc: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Paper Eq. 6: ``w = sigma * mean(acc) * (1 - mean(acc))`` per group, ``[n_groups]``.

    ``acc`` is the per-rollout accuracy reward in [0, 1] (binary, or EDNM values). The weight peaks at
    ``sigma / 4`` for groups at mean accuracy 0.5 (moderate difficulty, the most informative) and is 0 for
    groups that are always right or always wrong; ``sigma = 4`` makes the peak weight 1.
    """
    _check_groups(acc, "acc")
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if (acc < 0).any() or (acc > 1).any():
        raise ValueError("acc must lie in [0, 1] (the accuracy part of the reward, not the total)")
    m = acc.to(torch.float64).mean(dim=1)
    w = sigma * m * (1.0 - m)
    return w.to(acc.dtype if acc.is_floating_point() else torch.float32)


def group_weights(acc: torch.Tensor, mode: str = "dynamic", sigma: float = 1.0) -> torch.Tensor:
    """``"dynamic"``: Eq. 6 weights; ``"static"``: all ones (the ablation baseline)."""
    if mode == "dynamic":
        return dynamic_weights(acc, sigma)
    if mode == "static":
        _check_groups(acc, "acc")
        return torch.ones(acc.shape[0], dtype=acc.dtype if acc.is_floating_point() else torch.float32)
    raise ValueError(f"weighting mode must be 'dynamic' or 'static', got {mode!r}")


def weighted_group_advantages(
    rewards: torch.Tensor,
    acc: torch.Tensor,
    mode: str = "dynamic",
    sigma: float = 1.0,
    eps: float = 1e-6,
    drop_zero_variance: bool = True,
    unbiased: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Advantages scaled by the group weights: ``(adv * w[:, None], keep, w)``."""
    if rewards.shape != acc.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and acc {tuple(acc.shape)} must have the same shape")
    adv, keep = group_advantages(rewards, eps=eps, drop_zero_variance=drop_zero_variance, unbiased=unbiased)
    w = group_weights(acc, mode, sigma).to(adv.dtype)
    return adv * w[:, None], keep, w


# --------------------------------------------------------------------------- dynamic sampling


@dataclass
class FillResult(Generic[T]):
    """One filled batch and what it took: generation rounds, groups generated, groups filtered out as
    degenerate, degenerate groups used as padding, and informative groups generated beyond the batch."""

    groups: list[T]
    rounds: int
    generated: int
    filtered: int
    padded: int
    surplus: int
    target: int

    @property
    def short(self) -> bool:
        """True when the batch has fewer groups than asked for (rounds or data ran out, no padding)."""
        return len(self.groups) < self.target


def _default_rewards_of(group: Any) -> Any:
    return getattr(group, "rewards", group)


@dataclass
class DynamicSampler(Generic[T]):
    """Fill a batch with informative (non-degenerate) groups, generating extra rounds when needed.

    ``fill(generate)`` calls ``generate(k)`` to roll out ``k`` new prompts (returning up to ``k`` scored
    groups; fewer means the data ran out), keeps the groups whose rewards vary, and repeats for the
    shortfall up to ``max_extra_rounds`` extra times. If the batch is still short it is padded with
    filtered groups when ``pad_with_degenerate`` (their advantages are 0: they add only KL), else returned
    short. ``oversample`` > 1 asks for more prompts per extra round than the shortfall, since a fraction of
    them will be degenerate again. ``rewards_of(group)`` gives a group's ``[G]`` rewards (default: its
    ``.rewards`` attribute, or the group itself). Running totals are kept in ``totals`` for logging.
    """

    batch_groups: int
    max_extra_rounds: int = 2
    tol: float = 1e-6
    pad_with_degenerate: bool = True
    oversample: float = 1.0
    rewards_of: Callable[[Any], Any] = _default_rewards_of
    totals: dict[str, int] = field(default_factory=lambda: {"generated": 0, "filtered": 0, "padded": 0, "rounds": 0})

    def __post_init__(self) -> None:
        if self.batch_groups < 1:
            raise ValueError(f"batch_groups must be >= 1, got {self.batch_groups}")
        if self.max_extra_rounds < 0:
            raise ValueError(f"max_extra_rounds must be >= 0, got {self.max_extra_rounds}")
        if self.oversample < 1.0:
            raise ValueError(f"oversample must be >= 1, got {self.oversample}")

    def is_degenerate(self, group: T) -> bool:
        r = torch.as_tensor(self.rewards_of(group), dtype=torch.float64).reshape(-1)
        if r.numel() == 0 or not torch.isfinite(r).all():
            raise ValueError(f"group has empty or non-finite rewards: {r.tolist()}")
        return bool((r.max() - r.min()) <= self.tol)

    def fill(self, generate: Callable[[int], Sequence[T]]) -> FillResult[T]:
        kept: list[T] = []
        dropped: list[T] = []
        generated = rounds = surplus = 0
        want = self.batch_groups
        while rounds <= self.max_extra_rounds and len(kept) < self.batch_groups:
            batch = list(generate(want))
            rounds += 1
            generated += len(batch)
            for g in batch:
                if self.is_degenerate(g):
                    dropped.append(g)
                elif len(kept) < self.batch_groups:
                    kept.append(g)
                else:
                    surplus += 1
            if not batch:  # the data source is exhausted
                break
            short = self.batch_groups - len(kept)
            want = math.ceil(short * self.oversample)
        filtered = len(dropped)
        padded = 0
        if self.pad_with_degenerate and len(kept) < self.batch_groups:
            padded = min(self.batch_groups - len(kept), len(dropped))
            kept.extend(dropped[:padded])
            filtered -= padded
        for k, v in (("generated", generated), ("filtered", filtered), ("padded", padded), ("rounds", rounds)):
            self.totals[k] += v
        return FillResult(kept, rounds, generated, filtered, padded, surplus, self.batch_groups)
