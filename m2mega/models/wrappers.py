"""The bare model inside megatron's training wrappers (``DistributedDataParallel``, ``Float16Module``).

Checkpoints hold the bare model's state, and generation needs the bare Qwen2.5-VL model's config and
language model; both strip wrappers here, the one place that knows what wraps a model.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from megatron.core.distributed import DistributedDataParallel
from megatron.core.transformer.module import Float16Module

__all__ = ["unwrap_model", "unwrap_vlm"]


def unwrap_model(model: Union[torch.nn.Module, Sequence[torch.nn.Module]]) -> torch.nn.Module:
    """Strip megatron's DDP and Float16Module wrappers; a one-chunk list (no virtual pipeline) is its chunk."""
    if isinstance(model, (list, tuple)):
        if len(model) != 1:
            raise NotImplementedError(f"expected one model chunk, got {len(model)} (virtual pipeline stages)")
        model = model[0]
    while isinstance(model, (DistributedDataParallel, Float16Module)):
        model = model.module
    return model


def unwrap_vlm(model: Union[torch.nn.Module, Sequence[torch.nn.Module]]) -> torch.nn.Module:
    """:func:`unwrap_model`, checked to be an m2mega Qwen2.5-VL model (what generation drives)."""
    inner = unwrap_model(model)
    if not hasattr(inner, "language_model"):
        raise TypeError(f"{type(inner).__name__} is not an m2mega Qwen2.5-VL model (no .language_model)")
    return inner
