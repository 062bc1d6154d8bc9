"""Registry of trainable model families (``model.family`` in the config).

Kept in its own module so that ``python -m m2mega.train.sft`` (where sft.py runs as ``__main__``) and
library imports share one registry. The built-in families register lazily on first lookup.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

__all__ = ["ModelFamily", "register_model_family", "get_model_family"]


@dataclass(frozen=True)
class ModelFamily:
    """provider(cfg): this rank's model stage. flops_per_token(cfg): training FLOPs per token (MFU).
    validate(cfg): the family's shape rules (TP/PP divisibility, sequence length), raising ConfigError;
    the family owns them because only it knows its real architecture."""

    provider: Callable[[Any], Any]
    flops_per_token: Optional[Callable[[Any], float]] = None
    validate: Optional[Callable[[Any], None]] = None


_FAMILIES: dict[str, ModelFamily] = {}
# family -> module whose import registers it
_BUILTIN = {"gpt": "m2mega.train.sft", "qwen25vl": "m2mega.train.vlm"}


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
