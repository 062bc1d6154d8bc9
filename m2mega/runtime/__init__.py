"""Process-group + megatron parallel-state initialisation, the same call on GPU (NCCL) and CPU (gloo).

``init()`` is the single entry point every launcher, test and tool uses. On a CUDA machine it binds the
local GPU and uses NCCL; without CUDA it activates :mod:`m2mega.runtime.cpu` (the only module that maps
megatron-core's hard-coded CUDA calls to CPU) and uses gloo. ``shutdown()`` undoes all of it.

The names load on first use (PEP 562): :mod:`m2mega.runtime.cli` (every command line's error reporting)
and :mod:`.optional_libs` live in this package and are imported by ``--help`` paths, which must not pay
for ``import torch`` (1-2 s) and megatron (5-10 s on a small machine) just to print usage.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from . import cpu
    from .process_groups import RuntimeInfo, device, init, init_from_config, seed_everything, shutdown

__all__ = ["init", "init_from_config", "seed_everything", "shutdown", "RuntimeInfo", "device", "cpu"]

_LAZY = {name: ".process_groups" for name in ("init", "init_from_config", "seed_everything", "shutdown",
                                              "RuntimeInfo", "device")}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    if name == "cpu":
        return importlib.import_module(".cpu", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
