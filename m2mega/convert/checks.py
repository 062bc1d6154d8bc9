"""Checks run *before* any weights are loaded: checkpoint tensors vs the architecture config (HF side and
megatron side), and guards on the pickles megatron's checkpoint format contains (``.metadata``, ``common.pt``)
plus size checks of its ``*.distcp`` files.

Every failure is a ``ValueError`` that names the offending tensors (missing, unexpected, wrong shape) or
file (:class:`UnsafeCheckpoint`, :class:`CorruptCheckpoint`).
"""

from __future__ import annotations

import os
import pickle
from typing import Mapping

import torch

from m2mega.models.qwen25vl.config import Qwen25VLConfig
from m2mega.runtime.cli import RunFailed, UsageError

__all__ = [
    "expected_hf_shapes",
    "check_hf_tensors",
    "check_mcore_tensors",
    "verify_dcp_metadata",
    "verify_dcp_checkpoint",
    "read_dcp_metadata",
    "safe_torch_load",
    "CheckpointMismatch",
    "UnsafeCheckpoint",
    "CorruptCheckpoint",
]

_MAX_LISTED = 20


class CheckpointMismatch(UsageError):
    """A checkpoint's tensors do not match the model config (the message lists them)."""


def expected_hf_shapes(cfg: Qwen25VLConfig) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """HF hub-name -> shape for this architecture, and the names that may be absent (a tied ``lm_head``)."""
    t, v = cfg.text, cfg.vision
    H, V, I = t.hidden_size, t.vocab_size, t.intermediate_size
    q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    vh, vi, m = v.hidden_size, v.intermediate_size, v.merger_hidden_size
    out: dict[str, tuple[int, ...]] = {
        "visual.patch_embed.proj.weight": (vh, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size),
    }
    for i in range(v.depth):
        b = f"visual.blocks.{i}."
        out.update({
            b + "norm1.weight": (vh,), b + "norm2.weight": (vh,),
            b + "attn.qkv.weight": (3 * vh, vh), b + "attn.qkv.bias": (3 * vh,),
            b + "attn.proj.weight": (vh, vh), b + "attn.proj.bias": (vh,),
            b + "mlp.gate_proj.weight": (vi, vh), b + "mlp.gate_proj.bias": (vi,),
            b + "mlp.up_proj.weight": (vi, vh), b + "mlp.up_proj.bias": (vi,),
            b + "mlp.down_proj.weight": (vh, vi), b + "mlp.down_proj.bias": (vh,),
        })
    out.update({
        "visual.merger.ln_q.weight": (vh,),
        "visual.merger.mlp.0.weight": (m, m), "visual.merger.mlp.0.bias": (m,),
        "visual.merger.mlp.2.weight": (v.out_hidden_size, m), "visual.merger.mlp.2.bias": (v.out_hidden_size,),
        "model.embed_tokens.weight": (V, H),
    })
    for i in range(t.num_layers):
        b = f"model.layers.{i}."
        out.update({
            b + "input_layernorm.weight": (H,), b + "post_attention_layernorm.weight": (H,),
            b + "self_attn.q_proj.weight": (q, H), b + "self_attn.q_proj.bias": (q,),
            b + "self_attn.k_proj.weight": (kv, H), b + "self_attn.k_proj.bias": (kv,),
            b + "self_attn.v_proj.weight": (kv, H), b + "self_attn.v_proj.bias": (kv,),
            b + "self_attn.o_proj.weight": (H, q),
            b + "mlp.gate_proj.weight": (I, H), b + "mlp.up_proj.weight": (I, H), b + "mlp.down_proj.weight": (H, I),
        })
    out["model.norm.weight"] = (H,)
    out["lm_head.weight"] = (V, H)
    optional = {"lm_head.weight"} if t.tie_word_embeddings else set()
    return out, optional


def _listing(items: list[str]) -> str:
    more = f" ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return "; ".join(items[:_MAX_LISTED]) + more


def check_hf_tensors(shapes: Mapping[str, tuple[int, ...]], cfg: Qwen25VLConfig, where: str) -> None:
    """``shapes``: hub-name -> shape of an HF checkpoint. Raises :class:`CheckpointMismatch` listing every
    missing, unexpected or wrongly shaped tensor."""
    want, optional = expected_hf_shapes(cfg)
    problems = [f"tensor {k!r} has shape {tuple(shapes[k])} but the config needs {want[k]}"
                for k in sorted(set(want) & set(shapes)) if tuple(shapes[k]) != want[k]]
    missing = sorted(set(want) - set(shapes) - optional)
    unexpected = sorted(set(shapes) - set(want))
    if missing:
        problems.append(f"missing tensors {missing[:_MAX_LISTED]}" + (" ..." if len(missing) > _MAX_LISTED else ""))
    if unexpected:
        problems.append(
            f"unexpected tensors {unexpected[:_MAX_LISTED]}" + (" ..." if len(unexpected) > _MAX_LISTED else "")
        )
    if problems:
        raise CheckpointMismatch(f"{where} does not match Qwen2.5-VL config {cfg.name!r}: {_listing(problems)}")


def check_mcore_tensors(
    saved: Mapping[str, tuple[tuple[int, ...], bool]],
    expected: Mapping[str, tuple[tuple[int, ...], bool]],
    cfg: Qwen25VLConfig,
    where: str,
) -> None:
    """``saved`` / ``expected``: checkpoint key -> (global shape, allow_shape_mismatch) of a megatron
    distributed checkpoint and of the model about to load it. Vocabulary tensors (allow_shape_mismatch:
    padded per TP) may differ in rows as long as the real vocabulary fits."""
    problems = []
    for k in sorted(set(saved) & set(expected)):
        (got, _), (want, flexible) = saved[k], expected[k]
        if tuple(got) == tuple(want):
            continue
        if flexible and len(got) == len(want) and tuple(got[1:]) == tuple(want[1:]) and got[0] >= cfg.text.vocab_size:
            continue
        problems.append(f"tensor {k!r} has global shape {tuple(got)} but the model needs {tuple(want)}")
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    if missing:
        problems.append(f"missing tensors {missing[:_MAX_LISTED]}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:_MAX_LISTED]}")
    if problems:
        raise CheckpointMismatch(f"{where} does not match Qwen2.5-VL config {cfg.name!r}: {_listing(problems)}")


# ----------------------------------------------------------------------------- DCP metadata pickle guard

# torch.distributed.checkpoint stores its global metadata (``.metadata``) as a pickle, and megatron's format
# is built on it. Before megatron unpickles it, we unpickle it ourselves with only the metadata dataclasses
# (and torch.Size / dtypes) allowed, so a tampered checkpoint cannot run code.
_ALLOWED_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.planner",
    "torch.distributed.checkpoint.filesystem",
    "torch.distributed.checkpoint._extension",
    "megatron.core.dist_checkpointing.strategies.torch",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
)
_ALLOWED_NAMES = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                  ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice")}


class UnsafeCheckpoint(RunFailed, ValueError):
    """A checkpoint file references code outside the allow-list: refused before anything is unpickled."""


class CorruptCheckpoint(RunFailed, ValueError):
    """A checkpoint file is missing, truncated or unreadable. ``path`` names the file."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path


class _Refused(pickle.UnpicklingError):
    pass


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        import importlib

        if (module, name) in _ALLOWED_NAMES:
            return getattr(importlib.import_module(module), name)
        if module == "torch":
            obj = getattr(torch, name, None)
            if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
                return obj
        if module in _ALLOWED_MODULES:
            obj = getattr(importlib.import_module(module), name, None)
            if isinstance(obj, type):  # classes (dataclasses, enums), never functions
                return obj
        raise _Refused(f"refusing to unpickle {module}.{name}")


def read_dcp_metadata(ckpt_dir: str | os.PathLike):
    """``ckpt_dir/.metadata`` unpickled with only checkpoint-metadata classes allowed (torch DCP itself uses
    plain ``pickle.load``). Raises :class:`UnsafeCheckpoint` or :class:`CorruptCheckpoint` naming the file."""
    path = os.path.join(os.fspath(ckpt_dir), ".metadata")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{ckpt_dir} is not a megatron distributed checkpoint (no .metadata file)")
    with open(path, "rb") as f:
        try:
            md = _MetadataUnpickler(f).load()
        except _Refused as e:
            raise UnsafeCheckpoint(f"{path}: unsafe checkpoint metadata: {e}") from None
        except Exception as e:  # truncated or garbled pickle: EOFError, UnpicklingError, ValueError, ...
            raise CorruptCheckpoint(path, f"unreadable checkpoint metadata ({type(e).__name__}: {e})") from None
    if not hasattr(md, "state_dict_metadata") or not isinstance(getattr(md, "storage_data", None), dict):
        raise CorruptCheckpoint(path, f"not torch.distributed.checkpoint metadata ({type(md).__name__})")
    return md


def verify_dcp_metadata(ckpt_dir: str | os.PathLike) -> None:
    """Raise ``ValueError`` unless ``ckpt_dir/.metadata`` references only checkpoint-metadata classes."""
    read_dcp_metadata(ckpt_dir)


def safe_torch_load(path: str, data=None):
    """``torch.load(weights_only=True)`` (torch's allow-list unpickler: tensors, containers, primitives) of a
    file or of ``data`` (bytes read from ``path``), errors naming ``path``."""
    import io

    try:
        return torch.load(io.BytesIO(data) if data is not None else path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        why = next((ln.split(":", 1)[1].split(" was not")[0].strip() for ln in lines if "WeightsUnpickler error" in ln),
                   lines[0] if lines else repr(e))
        raise UnsafeCheckpoint(f"{path}: refusing to unpickle a non-allow-listed object ({why})") from None
    except FileNotFoundError:
        raise
    except Exception as e:  # a truncated zip archive, bad magic, ...
        raise CorruptCheckpoint(path, f"unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def verify_dcp_checkpoint(ckpt_dir: str | os.PathLike):
    """Everything a megatron ``torch_dist`` checkpoint load will read, checked before it reads it:
    ``.metadata`` (allow-list unpickler), every ``*.distcp`` file the metadata points into (present, plain
    name, long enough: a truncated file is caught here rather than as a bare ``EOFError`` mid-load) and
    ``common.pt`` (weights-only unpickler). Returns the metadata. Objects stored inside ``*.distcp`` are
    unpickled during the load itself, by :mod:`m2mega.convert.safe_dcp`'s weights-only planner."""
    ckpt_dir = os.fspath(ckpt_dir)
    md = read_dcp_metadata(ckpt_dir)
    need: dict[str, int] = {}
    for info in md.storage_data.values():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or os.path.basename(rel) != rel or rel in ("", ".", ".."):
            raise UnsafeCheckpoint(f"{ckpt_dir}/.metadata: storage file {rel!r} is not a plain file name")
        need[rel] = max(need.get(rel, 0), int(info.offset) + int(info.length))
    for rel, end in sorted(need.items()):
        path = os.path.join(ckpt_dir, rel)
        if not os.path.isfile(path):
            raise CorruptCheckpoint(path, "missing (the checkpoint metadata references it)")
        size = os.path.getsize(path)
        if size < end:
            raise CorruptCheckpoint(path, f"truncated: {size} bytes, the checkpoint metadata needs {end}")
    common = os.path.join(ckpt_dir, "common.pt")
    if os.path.isfile(common):
        safe_torch_load(common)
    return md
