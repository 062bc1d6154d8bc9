"""Checkpoint conversion between HF Qwen2.5-VL safetensors and megatron-core distributed checkpoints.
See docs/convert.md and ``tools/convert_checkpoint.py``.

Importing this package is cheap (no megatron, no transformers) so the CLI's spawned helper processes start fast.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "convert_hf_to_mcore": ".hf_mcore",
    "convert_mcore_to_hf": ".hf_mcore",
    "load_mcore_checkpoint": ".hf_mcore",
    "check_hf_checkpoint": ".hf_mcore",
    "save_hf_as_mcore_rank": ".hf_mcore",
    "CheckpointMismatch": ".checks",
    "expected_hf_shapes": ".checks",
    "verify_dcp_metadata": ".checks",
    "save_hf_sharded": ".hf_io",
    "hf_weight_files": ".hf_io",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
