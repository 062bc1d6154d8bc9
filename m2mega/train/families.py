"""Registries of trainable model families (``model.family``) and SFT data sources (``data.source``).

Kept in their own module so that ``python -m m2mega.train.sft`` (where sft.py runs as ``__main__``) and
library imports share one registry. The built-in entries live in modules that register themselves on import;
they are imported on first lookup (importing the Qwen2.5-VL model costs megatron and seconds, and the test
stand-ins ``gpt``/``synthetic`` of :mod:`m2mega.testing.tiny_gpt` are only loaded by configs that name them).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

from m2mega.runtime import seed_everything

from .checkpoint import load_model_weights

__all__ = ["ModelFamily", "register_model_family", "get_model_family", "register_data_source",
           "get_data_source", "load_policy"]


@dataclass(frozen=True)
class ModelFamily:
    """provider(cfg): this rank's model stage. flops_per_token(cfg): training FLOPs per token (MFU).
    validate(cfg): the family's shape rules (TP/PP divisibility, sequence length), raising ConfigError;
    the family owns them because only it knows its real architecture."""

    provider: Callable[[Any], Any]
    flops_per_token: Optional[Callable[[Any], float]] = None
    validate: Optional[Callable[[Any], None]] = None


_FAMILIES: dict[str, ModelFamily] = {}
# name -> the module whose import registers it
_BUILTIN = {"gpt": "m2mega.testing.tiny_gpt", "qwen25vl": "m2mega.train.vlm"}
_BUILTIN_SOURCES = {"synthetic": "m2mega.testing.tiny_gpt"}
# data_source(cfg, split, dp_rank, dp_size) -> this rank's loader of split ("train" | "valid"), or None
_SOURCES: dict[str, Callable[[Any, str, int, int], Any]] = {}


def register_model_family(name: str, provider: Callable[[Any], Any],
                          flops_per_token: Optional[Callable[[Any], float]] = None,
                          validate: Optional[Callable[[Any], None]] = None) -> None:
    _FAMILIES[name] = ModelFamily(provider, flops_per_token, validate)


def get_model_family(name: str) -> ModelFamily:
    if name not in _FAMILIES and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    if name not in _FAMILIES:
        raise ValueError(f"unknown model.family {name!r}; known: {sorted(set(_FAMILIES) | set(_BUILTIN))}")
    return _FAMILIES[name]


def register_data_source(name: str, factory: Callable[[Any, str, int, int], Any]) -> None:
    _SOURCES[name] = factory


def get_data_source(name: str) -> Callable[[Any, str, int, int], Any]:
    if name not in _SOURCES and name in _BUILTIN_SOURCES:
        importlib.import_module(_BUILTIN_SOURCES[name])
    if name not in _SOURCES:
        raise ValueError(f"unknown data.source {name!r}; known: {sorted({'packed', *_SOURCES, *_BUILTIN_SOURCES})}")
    return _SOURCES[name]


def load_policy(cfg, checkpoint: Optional[str]):
    """This rank's stage of ``cfg``'s model family with ``checkpoint``'s weights (a checkpoint or a save
    root; None: the same seeded init as training's, the "before training" baseline)."""
    seed_everything(cfg.seed)
    model = get_model_family(cfg.model.family).provider(cfg)
    if checkpoint:
        load_model_weights(checkpoint, [model])
    return model
