"""Qwen2.5-VL on megatron-core (see docs/model.md).

Importing this package does not import megatron; the model pieces load on first attribute access so the
data loader can use :mod:`.rope_index` and :mod:`.config` cheaply.
"""

from __future__ import annotations

import importlib

from .config import PRESETS, Qwen25VLConfig, TextArch, VisionArch, preset
from .rope_index import get_rope_index, get_rope_index_batch, get_rope_index_packed

_LAZY = {
    "Qwen25VLModel": ".model",
    "build_model": ".model",
    "VisionTransformer": ".vision",
    "vision_metadata": ".vision",
    "PackedAttention": ".attention",
    "WindowedPackedSeqParams": ".attention",
    "packed_seq_params_from_lengths": ".attention",
    "hf_to_mcore": ".sharding",
    "mcore_to_hf": ".sharding",
    "shard_for_rank": ".sharding",
    "merge_shards": ".sharding",
    "load_hf_into_model": ".sharding",
    "load_full_into_model": ".sharding",
}

__all__ = [
    "PRESETS", "Qwen25VLConfig", "TextArch", "VisionArch", "preset",
    "get_rope_index", "get_rope_index_batch", "get_rope_index_packed", *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
