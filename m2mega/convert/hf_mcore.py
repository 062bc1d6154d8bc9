"""HF Qwen2.5-VL safetensors <-> megatron-core distributed checkpoints of m2mega's model.

- :func:`convert_hf_to_mcore`: every rank of a TP x PP layout builds its model stage, reads only its
  stage's tensors from the HF safetensors (headers are validated against the config first), loads them
  and calls ``megatron.core.dist_checkpointing.save``. The HF ``config.json`` and tokenizer files are
  copied next to the checkpoint, plus ``m2mega_checkpoint.json`` (the layout it was written with).
- :func:`load_mcore_checkpoint`: load such a checkpoint into a model of *any* TP x PP layout
  (``dist_checkpointing.load`` reshards), after checking the saved tensors against the model.
- :func:`convert_mcore_to_hf`: load at TP1/PP1 in this process, map names back and write sharded
  safetensors + ``model.safetensors.index.json`` exactly as transformers' ``save_pretrained`` does.

HF -> mcore -> HF is bit-exact when no ``dtype`` cast is asked for. Name mapping and TP/PP slicing are
the model's (:mod:`m2mega.models.qwen25vl.sharding`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories
from megatron.core.dist_checkpointing.validation import StrictHandling

from m2mega.models.qwen25vl.config import Qwen25VLConfig
from m2mega.runtime.multiproc import free_port, run_ranks

from .checks import (
    CheckpointMismatch,
    check_hf_tensors,
    check_mcore_tensors,
    verify_dcp_metadata,
)
from .hf_io import (
    MCORE_OWN_FILES,
    copy_sidecar_files,
    hf_weight_files,
    image_processor_config,
    load_hf_tensors,
    read_hf_headers,
    save_hf_sharded,
)
from .layout import resolve_checkpoint

__all__ = [
    "convert_hf_to_mcore",
    "convert_mcore_to_hf",
    "load_mcore_checkpoint",
    "check_hf_checkpoint",
    "resolve_export_source",
    "save_hf_as_mcore_rank",
    "LAYOUT_FILE",
]

LAYOUT_FILE = "m2mega_checkpoint.json"
# Files megatron's checkpoint directory owns; HF sidecars must not overwrite them and are not copied back.
_MCORE_OWN = MCORE_OWN_FILES
assert LAYOUT_FILE in _MCORE_OWN
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_TRAINING_STATE_PREFIXES = ("optimizer.", "rng_state")


def _dtype(d: str | torch.dtype | None) -> Optional[torch.dtype]:
    if d is None or isinstance(d, torch.dtype):
        return d
    try:
        return _DTYPES[d.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {d!r}; use one of {sorted(_DTYPES)}") from None


# ----------------------------------------------------------------------------- HF side


def _hub_names(files: dict[str, str]) -> dict[str, str]:
    """hub name -> name in the file (checkpoints may use transformers>=5 module names)."""
    from m2mega.models.qwen25vl.sharding import normalize_hf_names

    hub = normalize_hf_names({k: k for k in files})  # values: original names
    if len(hub) != len(files):
        raise ValueError("the HF checkpoint holds the same tensor under both hub and transformers names")
    return hub


def check_hf_checkpoint(hf_dir: str | os.PathLike, cfg: Qwen25VLConfig | None = None,
                        dtype: str | torch.dtype | None = None) -> tuple[Qwen25VLConfig, torch.dtype]:
    """Validate an HF directory (config.json + safetensors) without reading tensor data. Returns the config
    and the dtype the model will be built in (the checkpoint's, which must be uniform, unless ``dtype``)."""
    hf_dir = os.fspath(hf_dir)
    cfg = cfg or Qwen25VLConfig.from_hf(hf_dir)
    files = hf_weight_files(hf_dir)
    headers = read_hf_headers(files)
    hub = _hub_names(files)
    check_hf_tensors({h: headers[orig][0] for h, orig in hub.items()}, cfg, f"HF checkpoint {hf_dir}")
    want = _dtype(dtype)
    if want is None:
        dtypes = sorted({str(dt) for _, dt in headers.values()})
        if len(dtypes) != 1:
            raise ValueError(f"{hf_dir} mixes dtypes {dtypes}; pass dtype= to pick the model dtype")
        want = next(iter(headers.values()))[1]
    return cfg, want


def _stage_hf_names(hub_names, cfg: Qwen25VLConfig, pp_rank: int, pp: int, first_stage_layers) -> set[str]:
    """The HF tensors PP stage ``pp_rank`` holds (as hub names)."""
    stages = cfg.lm_layers_per_stage(pp, first_stage_layers)
    start = sum(stages[:pp_rank])
    mine = range(start, start + stages[pp_rank])
    first, last = pp_rank == 0, pp_rank == pp - 1
    need = set()
    for n in hub_names:
        m = _HF_LAYER.match(n)
        if m:
            keep = int(m.group(1)) in mine
        elif n.startswith("visual.") or n == "model.embed_tokens.weight":
            # A tied head on a last stage without the embedding is a copy of the embedding.
            keep = first or (n == "model.embed_tokens.weight" and last and cfg.text.tie_word_embeddings)
        else:  # model.norm, lm_head
            keep = last
        if keep:
            need.add(n)
    return need


def _no_init(extra: dict | None = None) -> dict:
    # Weights are loaded right after: skip megatron's random init (slow for big models).
    return {"perform_initialization": False, **(extra or {})}


def save_hf_as_mcore_rank(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                          first_stage_layers: int | None = None, dtype: str | torch.dtype | None = None) -> dict:
    """This rank's part of :func:`convert_hf_to_mcore`; ``m2mega.runtime.init(tp, pp)`` must have run.
    Every rank of the layout calls it. Returns a summary (layout, tensors read by this rank)."""

    from m2mega.models.qwen25vl.model import build_model
    from m2mega.models.qwen25vl.sharding import hf_to_mcore, load_full_into_model

    hf_dir, out_dir = os.fspath(hf_dir), os.fspath(out_dir)
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    pp_rank = ps.get_pipeline_model_parallel_rank()
    cfg, model_dtype = check_hf_checkpoint(hf_dir, dtype=dtype)
    files = hf_weight_files(hf_dir)
    headers = read_hf_headers(files)
    hub = _hub_names(files)
    need = _stage_hf_names(hub, cfg, pp_rank, pp, first_stage_layers)
    real = load_hf_tensors(files, [hub[n] for n in need])
    # Tensors of other stages stand in as meta tensors (shape only) so the name mapping sees a whole model;
    # loading one into this stage would fail loudly (copy from meta).
    tensors = {}
    for h, orig in hub.items():
        if h in need:
            x = real.pop(orig)
            tensors[h] = x if x.dtype == model_dtype else x.to(model_dtype)
        else:
            shape, _ = headers[orig]
            tensors[h] = torch.empty(shape, dtype=model_dtype, device="meta")
    full = hf_to_mcore(tensors, cfg)
    del tensors
    model = build_model(cfg, model_dtype, first_stage_layers=first_stage_layers,
                        language_overrides=_no_init(), vision_overrides=_no_init())
    load_full_into_model(model, full, cfg, first_stage_layers)
    del full
    os.makedirs(out_dir, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), out_dir)
    dist.barrier()
    if dist.get_rank() == 0:
        copied = copy_sidecar_files(hf_dir, out_dir, exclude=_MCORE_OWN)
        if "preprocessor_config.json" not in copied:
            # A model saved alone (save_pretrained) has none: record the processor defaults so the
            # checkpoint still describes how its images are to be preprocessed.
            from m2mega.data.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS

            with open(os.path.join(out_dir, "preprocessor_config.json"), "w", encoding="utf-8") as f:
                json.dump(image_processor_config(DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS), f, indent=2)
            copied.append("preprocessor_config.json")
        with open(os.path.join(out_dir, LAYOUT_FILE), "w") as f:
            json.dump({"format": "megatron-core torch_dist", "model": "qwen2_5_vl", "saved_tp": tp, "saved_pp": pp,
                       "first_stage_layers": first_stage_layers, "dtype": str(model_dtype).replace("torch.", ""),
                       "source": os.path.abspath(hf_dir), "sidecar_files": copied}, f, indent=2)
    dist.barrier()
    return {"tp": tp, "pp": pp, "pp_rank": pp_rank, "tp_rank": ps.get_tensor_model_parallel_rank(),
            "hf_tensors_read": len(need)}


def _spawned_rank(tp: int, pp: int, hf_dir: str, out_dir: str, first_stage_layers, dtype) -> dict:
    import m2mega.runtime as rt

    rt.init(tp, pp)
    return save_hf_as_mcore_rank(hf_dir, out_dir, first_stage_layers=first_stage_layers, dtype=dtype)


def _check_out_dir(out_dir: str) -> None:
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"output directory {out_dir} is not empty; refusing to overwrite it")


def convert_hf_to_mcore(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *, tp: int = 1, pp: int = 1,
                        first_stage_layers: int | None = None, dtype: str | torch.dtype | None = None,
                        timeout_s: float = 3600.0) -> list[dict]:
    """Convert an HF Qwen2.5-VL checkpoint directory into a megatron distributed checkpoint saved from a
    TP x PP layout. Inside an initialised job (``m2mega.runtime.init(tp, pp)`` on every rank, e.g. under
    torchrun) each rank does its part; otherwise ``tp * pp`` local ranks are spawned (gloo)."""

    hf_dir, out_dir = os.fspath(hf_dir), os.fspath(out_dir)
    cfg, _ = check_hf_checkpoint(hf_dir, dtype=dtype)  # fail fast, before any process starts
    cfg.language_transformer_config(tp, pp, first_stage_layers=first_stage_layers)  # layout errors, too
    clash = sorted(set(os.listdir(hf_dir)) & _MCORE_OWN)
    if clash:
        raise ValueError(f"{hf_dir} contains {clash}, which would collide with the megatron checkpoint's own files")
    if dist.is_initialized():
        from megatron.core import parallel_state as ps

        have = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size())
        if have != (tp, pp):
            raise ValueError(f"the running job is TP{have[0]} x PP{have[1]}, but tp={tp}, pp={pp} was asked for")
        # Every rank checks before any rank writes: the first write happens after a barrier all ranks reach.
        _check_out_dir(out_dir)
        return [save_hf_as_mcore_rank(hf_dir, out_dir, first_stage_layers=first_stage_layers, dtype=dtype)]
    _check_out_dir(out_dir)
    return run_ranks(_spawned_rank, tp * pp, args=(tp, pp, hf_dir, out_dir, first_stage_layers, dtype),
                     timeout_s=timeout_s)


# ----------------------------------------------------------------------------- megatron side


def _expected_global_shapes(model) -> dict[str, tuple[tuple[int, ...], bool]]:
    """checkpoint key -> (global shape, allow_shape_mismatch) of everything ``model`` would load."""
    sd = model.sharded_state_dict()
    apply_factories(sd)
    out = {}
    for sh in nested_values(sd):
        if isinstance(sh, ShardedTensor):
            out[sh.key] = (tuple(sh.global_shape), bool(sh.allow_shape_mismatch))
    return out


def _saved_global_shapes(ckpt_dir: str) -> dict[str, tuple[tuple[int, ...], bool]]:
    from . import safe_dcp

    verify_dcp_metadata(ckpt_dir)  # (safe_dcp verifies too; kept for the FileNotFoundError on a non-checkpoint)
    meta = safe_dcp.load_tensors_metadata(ckpt_dir)
    return {k: (tuple(sh.global_shape), bool(sh.allow_shape_mismatch)) for k, sh in meta.items()
            if not _is_training_state(k)}


def _is_training_state(key: str) -> bool:
    # A training checkpoint also holds optimizer and RNG state beside the model; only the model converts.
    return key.startswith(_TRAINING_STATE_PREFIXES)


def _has_training_state(ckpt_dir: str) -> bool:
    from .checks import read_dcp_metadata

    # Every saved item, objects (the RNG state) included: load_tensors_metadata lists tensors only.
    return any(_is_training_state(k) for k in read_dcp_metadata(ckpt_dir).state_dict_metadata)


def _saved_ffn_overrides(saved: dict, cfg: Qwen25VLConfig) -> tuple[dict, dict]:
    """FFN sizes the checkpoint was padded to (over its TP), as build_model overrides for TP1 export."""
    lang, vis = {}, {}
    # Only a wider FFN can be padding; a narrower one is a plain mismatch, reported by the shape check.
    k = "language_model.decoder.layers.mlp.linear_fc2.weight"
    if k in saved and saved[k][0][-1] > cfg.lm_ffn_size(1):
        lang["ffn_hidden_size"] = saved[k][0][-1]
    k = "vision_model.decoder.layers.mlp.linear_fc2.weight"
    if k in saved and saved[k][0][-1] > cfg.vision_ffn_size(1):
        vis["ffn_hidden_size"] = saved[k][0][-1]
    return lang, vis


def _check_ffn_padding(local: dict, cfg: Qwen25VLConfig, lang: dict, vis: dict) -> None:
    """A checkpoint FFN wider than the config is only acceptable as TP zero-padding: the extra rows of
    ``linear_fc1`` (both GLU halves) and columns of ``linear_fc2`` must be exactly zero."""
    for prefix, over, real in (("language_model.", lang, cfg.text.intermediate_size),
                               ("vision_model.decoder.", vis, cfg.vision.intermediate_size)):
        if not over:
            continue
        for k, x in local.items():
            if not k.startswith(prefix) or ".mlp." not in k:
                continue
            if ".linear_fc1." in k:
                pad = torch.cat([h[real:] for h in x.chunk(2, 0)])
            elif k.endswith("linear_fc2.weight"):
                pad = x[:, real:]
            else:
                continue
            if pad.numel() and bool(pad.ne(0).any()):
                raise CheckpointMismatch(
                    f"tensor {k!r} has non-zero weights beyond the config's intermediate_size {real} (checkpoint "
                    f"FFN width {over['ffn_hidden_size']}): the checkpoint does not match the config"
                )


def load_mcore_checkpoint(model, ckpt_dir: str | os.PathLike, cfg: Qwen25VLConfig | None = None) -> None:
    """Load a megatron distributed checkpoint into this rank's model stage, at any TP x PP. Checks the
    checkpoint's tensors (names and global shapes) against the model first and lists every mismatch."""

    ckpt_dir = os.fspath(ckpt_dir)
    cfg = cfg or model.cfg
    saved = _saved_global_shapes(ckpt_dir)
    expected = _expected_global_shapes(model)
    try:
        check_mcore_tensors(saved, expected, cfg, f"megatron checkpoint {ckpt_dir}")
    except CheckpointMismatch as e:
        lang, vis = _saved_ffn_overrides(saved, cfg)
        if lang or vis:
            raise CheckpointMismatch(
                f"{e}\n(the checkpoint's FFNs are zero-padded to {lang or ''}{vis or ''} for the TP it was saved "
                "with; load it at a TP that pads them the same way, or export it to HF and re-convert)"
            ) from None
        raise
    from . import safe_dcp  # allow-list unpicklers for .metadata and stored objects (_extra_state)

    # Every model tensor was checked present above; a training checkpoint's optimizer/RNG entries are the only
    # unexpected ones then, and are not read.
    strict = StrictHandling.ASSUME_OK_UNEXPECTED if _has_training_state(ckpt_dir) else StrictHandling.RAISE_ALL
    request = model.sharded_state_dict()
    state = safe_dcp.load(request, ckpt_dir, strict=strict)
    state = {k: v for k, v in state.items() if k in request}  # not a training checkpoint's common state
    model.load_state_dict(state, strict=True)


@contextlib.contextmanager
def _single_rank_runtime():
    """TP1/PP1 on this process: reuse an initialised 1x1 layout, else start (and later stop) one."""
    import m2mega.runtime as rt
    if dist.is_initialized():
        from megatron.core import parallel_state as ps

        if (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()) != (1, 1):
            raise RuntimeError("mcore -> HF export runs at TP1/PP1; call it outside a TP/PP job")
        yield
        return
    rt.init(1, 1, rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}")
    try:
        yield
    finally:
        rt.shutdown()


def resolve_export_source(path: str | os.PathLike) -> str:
    """One checkpoint directory, or a training save root: its newest intact checkpoint."""
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, ".metadata")):
        return path
    return resolve_checkpoint(path)


def _export_dtype(cfg_json: dict, requested: str | torch.dtype | None) -> torch.dtype | None:
    """``--dtype``, else the HF config's ``torch_dtype``/``dtype``; None: keep the checkpoint's (bit-exact)."""
    if requested is not None:
        return _dtype(requested)
    name = cfg_json.get("torch_dtype") or cfg_json.get("dtype") or (cfg_json.get("text_config") or {}).get("dtype")
    try:
        return _dtype(name) if isinstance(name, str) else None
    except ValueError:
        return None


def convert_mcore_to_hf(mcore_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                        max_shard_size: int | str = "5GB", style: str = "hub",
                        dtype: str | torch.dtype | None = None) -> dict[str, Any]:
    """Export a megatron distributed checkpoint to an HF directory: sharded safetensors, the index json,
    config, tokenizer and image-processor files. ``mcore_dir``: a checkpoint written by
    :func:`convert_hf_to_mcore` or by training (weights only are read: optimizer and RNG state are
    ignored), or a training save root (its newest intact checkpoint). Tensors are written in ``dtype``, else
    in the dtype the HF config names. Loads at TP1/PP1 in this process (host memory for the model, about
    twice over)."""
    from m2mega.models.qwen25vl.model import build_model
    from m2mega.models.qwen25vl.sharding import mcore_to_hf, merge_shards

    mcore_dir, out_dir = resolve_export_source(mcore_dir), os.fspath(out_dir)
    if not os.path.isfile(os.path.join(mcore_dir, "config.json")):
        raise FileNotFoundError(f"{mcore_dir} has no config.json (the HF config is needed to rebuild the model; "
                                f"checkpoints written by m2mega carry it)")
    _check_out_dir(out_dir)
    cfg = Qwen25VLConfig.from_hf(mcore_dir)
    with open(os.path.join(mcore_dir, "config.json"), encoding="utf-8") as f:
        out_dtype = _export_dtype(json.load(f), dtype)
    saved = _saved_global_shapes(mcore_dir)
    from . import safe_dcp

    by_dtype: dict[str, list[str]] = {}
    for k, sh in safe_dcp.load_tensors_metadata(mcore_dir).items():
        if not _is_training_state(k):
            by_dtype.setdefault(str(sh.dtype).replace("torch.", ""), []).append(k)
    if len(by_dtype) != 1:
        listing = "; ".join(f"{d}: {ks[:3]}" for d, ks in sorted(by_dtype.items()))
        raise ValueError(f"{mcore_dir}: the model's tensors mix dtypes ({listing})")
    dtype = _dtype(next(iter(by_dtype)))
    lang, vis = _saved_ffn_overrides(saved, cfg)
    with _single_rank_runtime():
        model = build_model(cfg, dtype, language_overrides=_no_init(lang), vision_overrides=_no_init(vis))
        load_mcore_checkpoint(model, mcore_dir, cfg)
        local = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
        del model
    _check_ffn_padding(local, cfg, lang, vis)
    hf = mcore_to_hf(merge_shards({(0, 0): local}, cfg, 1, 1), cfg, style=style)
    del local
    if out_dtype is not None and out_dtype != dtype:
        hf = {k: v.to(out_dtype) if v.is_floating_point() else v for k, v in hf.items()}
    if cfg.text.tie_word_embeddings:
        hf.pop("lm_head.weight")  # transformers does not store the tied head either
    index = save_hf_sharded(hf, out_dir, max_shard_size)
    copied = copy_sidecar_files(mcore_dir, out_dir, exclude=_MCORE_OWN)
    if "config.json" not in copied:
        raise RuntimeError(f"config.json was not copied from {mcore_dir}")
    written = str(out_dtype or dtype).replace("torch.", "")
    with open(os.path.join(out_dir, "config.json"), encoding="utf-8") as f:
        hf_cfg = json.load(f)
    if hf_cfg.get("torch_dtype", hf_cfg.get("dtype")) != written:  # the config names the dtype of the weights
        hf_cfg["torch_dtype"] = written
        hf_cfg.pop("dtype", None)
        with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(hf_cfg, f, indent=2)
    return {"index": index, "sidecar_files": copied, "tensors": len(hf), "dtype": written}
