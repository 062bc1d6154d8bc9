"""Everything GRPO-specific that is not the optimizer step: rollouts (:mod:`.rollout`), scoring with the
verifiable rewards and per-task metrics (:mod:`.scoring`), group advantages, Eq. 6 weights and dynamic
sampling (:mod:`.advantages`), the Eq. 7 KL schedule (:mod:`.schedules`), the prompts a policy is rolled out
on (:mod:`.prompts`), and held-out evaluation of a policy (:mod:`.validation`, tables in :mod:`.tables`).
The loss itself lives in the fused GRPO kernel (``m2mega.kernels``), the update in
``m2mega.train.grpo_update``, and curriculum vs shuffled order in :mod:`m2mega.data.ordering`.

Names load on first use (PEP 562): :mod:`.tables` is imported by command lines' ``--help`` paths, which must
not pay for ``import torch``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .advantages import (DynamicSampler, FillResult, dynamic_weights, group_advantages, group_weights,
                             weighted_group_advantages, zero_variance_mask)
    from .schedules import KLSchedule, cosine_kl_beta, static_kl_beta

_LAZY = {
    **{n: ".advantages" for n in ("DynamicSampler", "FillResult", "dynamic_weights", "group_advantages",
                                  "group_weights", "weighted_group_advantages", "zero_variance_mask")},
    **{n: ".schedules" for n in ("KLSchedule", "cosine_kl_beta", "static_kl_beta")},
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
