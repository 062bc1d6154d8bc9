"""A preprocessed dataset's ``PREFIX.meta.json`` and the tokenizer it was built with.

The tokenizer is recorded twice: as the absolute path the user gave and relative to the meta file, so a
dataset moved together with its tokenizer (or a tokenizer kept beside the data) still resolves. A tokenizer
moved elsewhere is named with ``data.tokenizer`` (a checkpoint written by m2mega carries its tokenizer
files, so its directory works too). Whatever path is used, its special-token ids and vocabulary must be the
ones the data was tokenized with: token ids of another tokenizer would train silently on garbage.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

__all__ = ["read_dataset_meta", "dataset_tokenizer_path", "dataset_tokenizer", "tokenizer_record"]


def read_dataset_meta(prefix: str) -> dict[str, Any]:
    path = prefix + ".meta.json"
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except OSError as e:
        raise FileNotFoundError(f"{path}: cannot read the dataset's metadata ({e.strerror}); run "
                                f"tools/preprocess_data.py") from None
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return meta


def tokenizer_record(tokenizer_model: str, meta_path: str) -> dict[str, str]:
    """The ``tokenizer_model`` fields preprocessing writes: absolute, and relative to the meta file."""
    absolute = os.path.abspath(tokenizer_model)
    return {"tokenizer_model": absolute,
            "tokenizer_model_relpath": os.path.relpath(absolute, os.path.dirname(os.path.abspath(meta_path)))}


def dataset_tokenizer_path(prefix: str, meta: Optional[dict] = None, override: Optional[str] = None) -> str:
    """Where the dataset's tokenizer is now: ``override`` (``data.tokenizer``), else the recorded path
    relative to the meta file, else the recorded absolute path."""
    meta = read_dataset_meta(prefix) if meta is None else meta
    if override:
        if not os.path.exists(override):
            raise FileNotFoundError(f"data.tokenizer {override} does not exist")
        return override
    if not meta.get("tokenizer_model"):
        raise ValueError(f"{prefix}.meta.json records no tokenizer_model")
    candidates = []
    if meta.get("tokenizer_model_relpath"):
        candidates.append(os.path.join(os.path.dirname(os.path.abspath(prefix + ".meta.json")),
                                       meta["tokenizer_model_relpath"]))
    candidates.append(meta["tokenizer_model"])
    for c in candidates:
        if os.path.exists(c):
            return os.path.normpath(c)
    raise FileNotFoundError(
        f"{prefix}.meta.json: the tokenizer it was preprocessed with is gone ({meta['tokenizer_model']}); set "
        f"data.tokenizer to where it is now (a checkpoint directory written by m2mega holds a copy)")


def dataset_tokenizer(prefix: str, override: Optional[str] = None):
    """The dataset's tokenizer (``m2mega.data.tokenizer.M2Tokenizer``), checked against the special-token
    ids and vocabulary size the data was tokenized with."""
    from .tokenizer import build_tokenizer

    meta = read_dataset_meta(prefix)
    path = dataset_tokenizer_path(prefix, meta, override)
    tok = build_tokenizer(meta.get("tokenizer_type", "HuggingFaceTokenizer"), path)
    want = meta.get("tokenizer") or {}
    have = tok.special_token_ids()
    diff = {k: (v, have.get(k)) for k, v in want.items() if have.get(k) != v}
    if diff:
        listing = ", ".join(f"{k}: data {a}, tokenizer {b}" for k, (a, b) in sorted(diff.items()))
        raise ValueError(f"tokenizer {path} is not the one {prefix} was preprocessed with ({listing})")
    return tok
