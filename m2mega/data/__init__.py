"""Data: JSONL schema, tokenizer + chat template, preprocessing to indexed datasets, THD packing loader.

Modules (see docs/data.md):

* :mod:`.schema` - input row validation with reject reasons
* :mod:`.tokenizer` / :mod:`.chat_template` - Qwen2.5-VL tokenizers and template, loss-mask segments
* :mod:`.images` - decode + smart resize, exactly as HF's Qwen2-VL processor
* :mod:`.indexed` - megatron-core ``IndexedDataset`` (multimodal) writer/reader and the sidecar
* :mod:`.preprocess` - the engine of ``tools/preprocess_data.py``
* :mod:`.ordering` / :mod:`.packing` / :mod:`.loader` - curriculum/shuffles, pack plans, micro-batches
* :mod:`.quality` - trajectory quality scores (separate owner)

Common names are importable from here lazily (``from m2mega.data import PackedTHDDataset``) so that
``import m2mega.data`` stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "build_tokenizer": "tokenizer",
    "build_tiny_qwen_tokenizer": "tokenizer",
    "M2Tokenizer": "tokenizer",
    "render_segments": "chat_template",
    "DEFAULT_SYSTEM_PROMPT": "chat_template",
    "parse_row": "schema",
    "RejectError": "schema",
    "IndexedSamples": "indexed",
    "SampleInfo": "indexed",
    "PreprocessConfig": "preprocess",
    "PackedTHDDataset": "loader",
    "THDLoader": "loader",
    "MicroBatch": "loader",
    "PromptDataset": "loader",
    "RLPrompt": "loader",
    "PackPlan": "packing",
    "PromptPlan": "packing",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
