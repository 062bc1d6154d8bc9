"""HF checkpoint files: read safetensors lazily (one tensor at a time, headers without data) and write
sharded safetensors with ``model.safetensors.index.json`` exactly as transformers' ``save_pretrained`` does.

Only safetensors are read: a directory holding only pickled weights (``*.bin``, ``*.pt``) is refused, so
converting an untrusted download never unpickles anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import Tensor

__all__ = [
    "image_processor_config",
    "INDEX_NAME",
    "SINGLE_NAME",
    "hf_weight_files",
    "read_hf_headers",
    "load_hf_tensors",
    "save_hf_sharded",
    "copy_sidecar_files",
    "SIDECAR_SUFFIXES",
]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# Non-weight files worth carrying along: configs, tokenizer, chat template, processor settings.
SIDECAR_SUFFIXES = (".json", ".txt", ".jinja", ".model", ".tiktoken")
# A megatron checkpoint directory's own files (and the layout record m2mega adds): never HF sidecars.
MCORE_OWN_FILES = frozenset({"metadata.json", "common.pt", ".metadata", "m2mega_checkpoint.json"})
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@contextlib.contextmanager
def _open_shard(path: str, **kwargs) -> Iterator:
    """``safe_open`` whose errors (a truncated shard, a bad header, a failed read) name the shard: the
    library's own messages ("invalid header", "incomplete metadata") do not say which file of many."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt", **kwargs) as f:
            yield f
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"safetensors shard {path}: {type(e).__name__}: {e}") from None


def hf_weight_files(hf_dir: str | os.PathLike) -> dict[str, str]:
    """Tensor name -> safetensors file path, from the index json (sharded) or the single file."""
    hf_dir = os.fspath(hf_dir)
    if not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"HF checkpoint directory {hf_dir!r} does not exist")
    index = os.path.join(hf_dir, INDEX_NAME)
    if os.path.isfile(index):
        with open(index) as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index}: not a safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
        for fn in files:
            if os.path.basename(fn) != fn or not fn.endswith(".safetensors"):
                raise ValueError(f"{index}: weight file {fn!r} is not a plain *.safetensors name in the directory")
            if not os.path.isfile(os.path.join(hf_dir, fn)):
                raise FileNotFoundError(f"{index} lists {fn!r}, which is missing from {hf_dir}")
        return {k: os.path.join(hf_dir, v) for k, v in weight_map.items()}
    single = os.path.join(hf_dir, SINGLE_NAME)
    if os.path.isfile(single):
        with _open_shard(single) as f:
            return {k: single for k in f.keys()}
    pickled = sorted(fn for fn in os.listdir(hf_dir) if fn.endswith(_PICKLE_SUFFIXES))
    if pickled:
        raise ValueError(
            f"{hf_dir} holds only pickled weights ({pickled[:3]}); m2mega reads safetensors only, never pickles. "
            "Convert them with a trusted tool first (e.g. transformers save_pretrained(safe_serialization=True))."
        )
    raise FileNotFoundError(f"{hf_dir} has neither {INDEX_NAME} nor {SINGLE_NAME}")


def read_hf_headers(files: Mapping[str, str]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of every tensor from the safetensors headers, reading no tensor data. Checks that each
    file really holds the tensors the index assigns to it."""
    by_file: dict[str, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    out = {}
    for path, names in by_file.items():
        with _open_shard(path) as f:
            present = set(f.keys())
            for name in names:
                if name not in present:
                    raise ValueError(f"the index maps tensor {name!r} to {path}, which does not contain it")
                sl = f.get_slice(name)
                dt = sl.get_dtype()
                if dt not in _ST_DTYPES:
                    raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {dt}")
                out[name] = (tuple(int(x) for x in sl.get_shape()), _ST_DTYPES[dt])
    return out


def load_hf_tensors(files: Mapping[str, str], names: Iterable[str]) -> dict[str, Tensor]:
    """Read just ``names`` (each file opened once, memory-mapped)."""
    by_file: dict[str, list[str]] = {}
    for n in names:
        by_file.setdefault(files[n], []).append(n)
    out = {}
    for path, ns in by_file.items():
        with _open_shard(path, device="cpu") as f:
            for n in ns:
                out[n] = f.get_tensor(n)
    return out


def save_hf_sharded(state_dict: Mapping[str, Tensor], out_dir: str | os.PathLike,
                    max_shard_size: int | str = "5GB") -> dict | None:
    """Write ``state_dict`` as transformers' ``save_pretrained(safe_serialization=True)`` does: tensors in
    name order, split greedily by huggingface_hub at ``max_shard_size`` into ``model-0000i-of-0000n
    .safetensors`` (or one ``model.safetensors``), ``{"format": "pt"}`` file metadata, and the index json
    (``total_parameters``, ``total_size``, ``weight_map``; 2-space indent, sorted keys). Returns the index
    (None when unsharded)."""
    from huggingface_hub import split_state_dict_into_shards_factory
    from safetensors.torch import save_file

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    ordered = {k: state_dict[k] for k in sorted(state_dict)}
    split = split_state_dict_into_shards_factory(
        ordered,
        get_storage_size=lambda t: t.numel() * t.element_size(),
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=max_shard_size,
    )
    for filename, names in split.filename_to_tensors.items():
        save_file({n: ordered[n].contiguous() for n in names}, os.path.join(out_dir, filename),
                  metadata={"format": "pt"})
    if not split.is_sharded:
        return None
    index = {
        "metadata": {"total_parameters": sum(t.numel() for t in ordered.values()), **split.metadata},
        "weight_map": split.tensor_to_filename,
    }
    with open(os.path.join(out_dir, INDEX_NAME), "w", encoding="utf-8") as f:
        f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return index


def copy_sidecar_files(src: str | os.PathLike, dst: str | os.PathLike, *, exclude: Iterable[str] = (),
                       only: Iterable[str] | None = None) -> list[str]:
    """Copy config / tokenizer / template files (not weights, not the weight index, never a megatron
    checkpoint's own files) from ``src`` to ``dst``; ``only``: just these names."""
    skip = {INDEX_NAME, *MCORE_OWN_FILES, *exclude}
    keep = None if only is None else set(only)
    copied = []
    for fn in sorted(os.listdir(src)):
        path = os.path.join(src, fn)
        if fn in skip or not os.path.isfile(path) or not fn.endswith(SIDECAR_SUFFIXES):
            continue
        if keep is not None and fn not in keep:
            continue
        shutil.copyfile(path, os.path.join(dst, fn))
        copied.append(fn)
    return copied


def image_processor_config(min_pixels: int, max_pixels: int, patch_size: int = 14, merge_size: int = 2,
                           temporal_patch_size: int = 2) -> dict[str, Any]:
    """transformers' ``Qwen2VLImageProcessor`` settings for m2mega's packing (CLIP statistics, bicubic)."""
    from m2mega.ops.vision_pack import CLIP_MEAN, CLIP_STD

    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
        "do_resize": True, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "do_convert_rgb": True,
        "min_pixels": int(min_pixels), "max_pixels": int(max_pixels),
        "size": {"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)},
        "patch_size": patch_size, "temporal_patch_size": temporal_patch_size, "merge_size": merge_size,
    }
