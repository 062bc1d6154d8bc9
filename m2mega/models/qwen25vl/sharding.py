"""Weights between HF Qwen2.5-VL names and m2mega's megatron model, and between TP x PP layouts.

Three representations of the same weights:

- **HF**: a transformers state dict, hub style (``model.layers.*``, ``visual.*``, ``lm_head.weight``, as in
  the released safetensors) or transformers>=5 module style (``model.language_model.*``, ``model.visual.*``).
- **full mcore**: m2mega's parameter names (``language_model.*``, ``vision_model.*``) with whole, unpadded
  tensors: independent of the parallel layout. QKV is already in megatron's grouped layout and the SwiGLU
  ``linear_fc1`` is ``[gate; up]``.
- **local mcore**: what one (TP rank, PP rank) holds: this stage's layers renumbered from 0, TP slices,
  vocabulary padded to ``cfg.padded_vocab_size(tp)`` and FFNs to a multiple of TP (zero rows: exact).

``hf_to_mcore`` / ``mcore_to_hf`` convert names and layouts; ``shard_for_rank`` / ``merge_shards`` cut and
reassemble. ``load_hf_into_model`` does all of it for the ranks of the current process.

Megatron's QKV layout: for ``ng`` query groups (KV heads) of ``np/ng`` query heads each, rows are
``[q_g0 (np/ng*hn), k_g0 (hn), v_g0 (hn), q_g1, ...]``; TP rank r holds a contiguous 1/TP of those rows.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch
from megatron.core import parallel_state as ps
from torch import Tensor

from .config import Qwen25VLConfig

__all__ = [
    "hf_to_mcore",
    "mcore_to_hf",
    "shard_for_rank",
    "merge_shards",
    "load_hf_into_model",
    "load_full_into_model",
    "name_table",
    "normalize_hf_names",
]

# ----------------------------------------------------------------------------- HF name normalisation

_HF5_TO_HUB = [
    (re.compile(r"^model\.language_model\."), "model."),
    (re.compile(r"^model\.visual\."), "visual."),
]


def normalize_hf_names(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """transformers>=5 module names -> hub names (``model.layers.*``, ``visual.*``, ``lm_head.weight``)."""
    out = {}
    for k, v in sd.items():
        for pat, rep in _HF5_TO_HUB:
            k2 = pat.sub(rep, k)
            if k2 != k:
                k = k2
                break
        out[k] = v
    return out


def _to_hf5(k: str) -> str:
    if k.startswith("visual."):
        return "model." + k
    if k.startswith("model."):
        return "model.language_model." + k[len("model."):]
    return k


# ----------------------------------------------------------------------------- QKV layouts


def _qkv_to_megatron(q: Tensor, k: Tensor, v: Tensor, heads: int, groups: int) -> Tensor:
    hn = q.shape[0] // heads
    rest = q.shape[1:]
    qg = q.reshape(groups, heads // groups * hn, *rest)
    kg = k.reshape(groups, hn, *rest)
    vg = v.reshape(groups, hn, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *rest)


def _qkv_from_megatron(w: Tensor, heads: int, groups: int) -> tuple[Tensor, Tensor, Tensor]:
    per = heads // groups
    hn = w.shape[0] // (groups * (per + 2))
    rest = w.shape[1:]
    g = w.reshape(groups, (per + 2) * hn, *rest)
    q, k, v = torch.split(g, [per * hn, hn, hn], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


# ----------------------------------------------------------------------------- HF <-> full mcore


def name_table(cfg: Qwen25VLConfig) -> list[tuple[str, str, str]]:
    """(m2mega name pattern, HF hub name pattern, transform) rows, for docs and the converter."""
    L, V = "language_model.decoder.layers.{i}.", "vision_model.decoder.layers.{i}."
    rows = [
        ("vision_model.patch_embed.weight", "visual.patch_embed.proj.weight", "reshape [h,C,T,P,P] -> [h, C*T*P*P]"),
        (V + "input_layernorm.weight", "visual.blocks.{i}.norm1.weight", "copy"),
        (V + "self_attention.linear_qkv.weight", "visual.blocks.{i}.attn.qkv.weight", "[q;k;v] -> per-head [q_h,k_h,v_h]"),
        (V + "self_attention.linear_qkv.bias", "visual.blocks.{i}.attn.qkv.bias", "as weight"),
        (V + "self_attention.linear_proj.weight", "visual.blocks.{i}.attn.proj.weight", "copy"),
        (V + "self_attention.linear_proj.bias", "visual.blocks.{i}.attn.proj.bias", "copy"),
        (V + "pre_mlp_layernorm.weight", "visual.blocks.{i}.norm2.weight", "copy"),
        (V + "mlp.linear_fc1.weight", "visual.blocks.{i}.mlp.gate_proj.weight + up_proj.weight", "cat [gate; up]"),
        (V + "mlp.linear_fc1.bias", "visual.blocks.{i}.mlp.gate_proj.bias + up_proj.bias", "cat [gate; up]"),
        (V + "mlp.linear_fc2.weight", "visual.blocks.{i}.mlp.down_proj.weight", "copy"),
        (V + "mlp.linear_fc2.bias", "visual.blocks.{i}.mlp.down_proj.bias", "copy"),
        ("vision_model.merger.ln_q.weight", "visual.merger.ln_q.weight", "copy"),
        ("vision_model.merger.mlp.linear_fc1.weight", "visual.merger.mlp.0.weight", "copy"),
        ("vision_model.merger.mlp.linear_fc1.bias", "visual.merger.mlp.0.bias", "copy"),
        ("vision_model.merger.mlp.linear_fc2.weight", "visual.merger.mlp.2.weight", "copy"),
        ("vision_model.merger.mlp.linear_fc2.bias", "visual.merger.mlp.2.bias", "copy"),
        ("language_model.embedding.word_embeddings.weight", "model.embed_tokens.weight", "copy (padded per TP)"),
        (L + "input_layernorm.weight", "model.layers.{i}.input_layernorm.weight", "copy"),
        (L + "self_attention.linear_qkv.weight", "model.layers.{i}.self_attn.{q,k,v}_proj.weight", "GQA group interleave"),
        (L + "self_attention.linear_qkv.bias", "model.layers.{i}.self_attn.{q,k,v}_proj.bias", "GQA group interleave"),
        (L + "self_attention.linear_proj.weight", "model.layers.{i}.self_attn.o_proj.weight", "copy"),
        (L + "pre_mlp_layernorm.weight", "model.layers.{i}.post_attention_layernorm.weight", "copy"),
        (L + "mlp.linear_fc1.weight", "model.layers.{i}.mlp.gate_proj.weight + up_proj.weight", "cat [gate; up]"),
        (L + "mlp.linear_fc2.weight", "model.layers.{i}.mlp.down_proj.weight", "copy"),
        ("language_model.decoder.final_layernorm.weight", "model.norm.weight", "copy"),
    ]
    if not cfg.text.tie_word_embeddings:
        rows.append(("language_model.output_layer.weight", "lm_head.weight", "copy (padded per TP)"))
    return rows


def hf_to_mcore(hf_sd: Mapping[str, Tensor], cfg: Qwen25VLConfig) -> dict[str, Tensor]:
    """HF state dict (hub or transformers>=5 names) -> full mcore state dict. Missing keys raise."""
    sd = normalize_hf_names(hf_sd)
    t, v = cfg.text, cfg.vision
    used: set[str] = set()

    def get(name: str) -> Tensor:
        if name not in sd:
            raise KeyError(f"HF state dict has no {name!r} (needed for Qwen2.5-VL {cfg.name})")
        used.add(name)
        return sd[name]

    out: dict[str, Tensor] = {}
    pw = get("visual.patch_embed.proj.weight")
    out["vision_model.patch_embed.weight"] = pw.reshape(pw.shape[0], -1)
    for i in range(v.depth):
        h, m = f"visual.blocks.{i}.", f"vision_model.decoder.layers.{i}."
        out[m + "input_layernorm.weight"] = get(h + "norm1.weight")
        out[m + "pre_mlp_layernorm.weight"] = get(h + "norm2.weight")
        for suf in ("weight", "bias"):
            q, k, vv = torch.chunk(get(h + f"attn.qkv.{suf}"), 3, dim=0)
            out[m + f"self_attention.linear_qkv.{suf}"] = _qkv_to_megatron(q, k, vv, v.num_heads, v.num_heads)
            out[m + f"self_attention.linear_proj.{suf}"] = get(h + f"attn.proj.{suf}")
            out[m + f"mlp.linear_fc1.{suf}"] = torch.cat([get(h + f"mlp.gate_proj.{suf}"), get(h + f"mlp.up_proj.{suf}")])
            out[m + f"mlp.linear_fc2.{suf}"] = get(h + f"mlp.down_proj.{suf}")
    out["vision_model.merger.ln_q.weight"] = get("visual.merger.ln_q.weight")
    for hi, mi in (("0", "linear_fc1"), ("2", "linear_fc2")):
        for suf in ("weight", "bias"):
            out[f"vision_model.merger.mlp.{mi}.{suf}"] = get(f"visual.merger.mlp.{hi}.{suf}")

    out["language_model.embedding.word_embeddings.weight"] = get("model.embed_tokens.weight")
    for i in range(t.num_layers):
        h, m = f"model.layers.{i}.", f"language_model.decoder.layers.{i}."
        out[m + "input_layernorm.weight"] = get(h + "input_layernorm.weight")
        out[m + "pre_mlp_layernorm.weight"] = get(h + "post_attention_layernorm.weight")
        for suf in ("weight", "bias"):
            out[m + f"self_attention.linear_qkv.{suf}"] = _qkv_to_megatron(
                get(h + f"self_attn.q_proj.{suf}"), get(h + f"self_attn.k_proj.{suf}"),
                get(h + f"self_attn.v_proj.{suf}"), t.num_attention_heads, t.num_key_value_heads,
            )
        out[m + "self_attention.linear_proj.weight"] = get(h + "self_attn.o_proj.weight")
        out[m + "mlp.linear_fc1.weight"] = torch.cat([get(h + "mlp.gate_proj.weight"), get(h + "mlp.up_proj.weight")])
        out[m + "mlp.linear_fc2.weight"] = get(h + "mlp.down_proj.weight")
    out["language_model.decoder.final_layernorm.weight"] = get("model.norm.weight")
    if not t.tie_word_embeddings:
        out["language_model.output_layer.weight"] = get("lm_head.weight")
    elif "lm_head.weight" in sd:
        used.add("lm_head.weight")  # a tied checkpoint may still store the (identical) head
    extra = sorted(set(sd) - used)
    if extra:
        raise KeyError(f"HF state dict has {len(extra)} unexpected keys for Qwen2.5-VL {cfg.name}: {extra[:5]}")
    return out


def mcore_to_hf(sd: Mapping[str, Tensor], cfg: Qwen25VLConfig, style: str = "hub") -> dict[str, Tensor]:
    """Full mcore state dict -> HF (``style='hub'`` release names or ``'transformers'`` module names)."""
    if style not in ("hub", "transformers"):
        raise ValueError(f"style must be 'hub' or 'transformers', got {style!r}")
    t, v = cfg.text, cfg.vision
    out: dict[str, Tensor] = {}
    pw = sd["vision_model.patch_embed.weight"]
    out["visual.patch_embed.proj.weight"] = pw.reshape(
        pw.shape[0], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size
    )
    for i in range(v.depth):
        h, m = f"visual.blocks.{i}.", f"vision_model.decoder.layers.{i}."
        out[h + "norm1.weight"] = sd[m + "input_layernorm.weight"]
        out[h + "norm2.weight"] = sd[m + "pre_mlp_layernorm.weight"]
        for suf in ("weight", "bias"):
            q, k, vv = _qkv_from_megatron(sd[m + f"self_attention.linear_qkv.{suf}"], v.num_heads, v.num_heads)
            out[h + f"attn.qkv.{suf}"] = torch.cat([q, k, vv])
            out[h + f"attn.proj.{suf}"] = sd[m + f"self_attention.linear_proj.{suf}"]
            gate, up = torch.chunk(sd[m + f"mlp.linear_fc1.{suf}"], 2, dim=0)
            out[h + f"mlp.gate_proj.{suf}"], out[h + f"mlp.up_proj.{suf}"] = gate, up
            out[h + f"mlp.down_proj.{suf}"] = sd[m + f"mlp.linear_fc2.{suf}"]
    out["visual.merger.ln_q.weight"] = sd["vision_model.merger.ln_q.weight"]
    for hi, mi in (("0", "linear_fc1"), ("2", "linear_fc2")):
        for suf in ("weight", "bias"):
            out[f"visual.merger.mlp.{hi}.{suf}"] = sd[f"vision_model.merger.mlp.{mi}.{suf}"]
    out["model.embed_tokens.weight"] = sd["language_model.embedding.word_embeddings.weight"]
    for i in range(t.num_layers):
        h, m = f"model.layers.{i}.", f"language_model.decoder.layers.{i}."
        out[h + "input_layernorm.weight"] = sd[m + "input_layernorm.weight"]
        out[h + "post_attention_layernorm.weight"] = sd[m + "pre_mlp_layernorm.weight"]
        for suf in ("weight", "bias"):
            q, k, vv = _qkv_from_megatron(
                sd[m + f"self_attention.linear_qkv.{suf}"], t.num_attention_heads, t.num_key_value_heads
            )
            out[h + f"self_attn.q_proj.{suf}"], out[h + f"self_attn.k_proj.{suf}"] = q, k
            out[h + f"self_attn.v_proj.{suf}"] = vv
        out[h + "self_attn.o_proj.weight"] = sd[m + "self_attention.linear_proj.weight"]
        gate, up = torch.chunk(sd[m + "mlp.linear_fc1.weight"], 2, dim=0)
        out[h + "mlp.gate_proj.weight"], out[h + "mlp.up_proj.weight"] = gate, up
        out[h + "mlp.down_proj.weight"] = sd[m + "mlp.linear_fc2.weight"]
    out["model.norm.weight"] = sd["language_model.decoder.final_layernorm.weight"]
    out["lm_head.weight"] = (
        out["model.embed_tokens.weight"] if t.tie_word_embeddings else sd["language_model.output_layer.weight"]
    )
    if style == "transformers":
        out = {_to_hf5(k): x for k, x in out.items()}
    return out


# ----------------------------------------------------------------------------- TP / PP slicing

_LAYER = re.compile(r"^(language_model|vision_model)\.decoder\.layers\.(\d+)\.(.*)$")


def _tp_kind(name: str) -> str | None:
    """How a parameter is split over TP: 'col' (dim 0), 'row' (dim 1), 'glu' (gate/up halves, dim 0),
    'vocab' (dim 0, padded rows), or None (replicated)."""
    if name.endswith("word_embeddings.weight") or name.endswith("output_layer.weight"):
        return "vocab"
    if ".mlp.linear_fc1." in name and name.startswith("vision_model.merger"):
        return "col"
    if ".mlp.linear_fc1." in name:
        return "glu"
    if "linear_qkv." in name:
        return "col"
    if name.endswith("linear_proj.weight") or name.endswith("linear_fc2.weight"):
        return "row"
    return None


def _pad_to(x: Tensor, n: int, dim: int) -> Tensor:
    if x.shape[dim] == n:
        return x
    if x.shape[dim] > n:
        raise ValueError(f"cannot pad dim {dim} of {tuple(x.shape)} down to {n}")
    pad_shape = list(x.shape)
    pad_shape[dim] = n - x.shape[dim]
    return torch.cat([x, x.new_zeros(pad_shape)], dim=dim)


def _ffn_sizes(name: str, cfg: Qwen25VLConfig, tp: int) -> tuple[int, int]:
    if name.startswith("vision_model"):
        return cfg.vision.intermediate_size, cfg.vision_ffn_size(tp)
    return cfg.text.intermediate_size, cfg.lm_ffn_size(tp)


def _slice(name: str, x: Tensor, cfg: Qwen25VLConfig, r: int, tp: int) -> Tensor:
    kind = _tp_kind(name)
    if kind is None:
        return x
    if kind == "vocab":
        return _pad_to(x, cfg.padded_vocab_size(tp), 0).chunk(tp, 0)[r]
    if kind == "glu":
        _, padded = _ffn_sizes(name, cfg, tp)
        gate, up = (_pad_to(h, padded, 0) for h in x.chunk(2, 0))
        return torch.cat([gate.chunk(tp, 0)[r], up.chunk(tp, 0)[r]])
    if kind == "row":
        if ".mlp.linear_fc2." in name and not name.startswith("vision_model.merger"):
            x = _pad_to(x, _ffn_sizes(name, cfg, tp)[1], 1)
        return x.chunk(tp, 1)[r]
    if x.shape[0] % tp:
        raise ValueError(f"{name}: {x.shape[0]} rows do not split over TP={tp}")
    return x.chunk(tp, 0)[r]


def _unslice(name: str, parts: list[Tensor], cfg: Qwen25VLConfig) -> Tensor:
    tp = len(parts)
    kind = _tp_kind(name)
    if kind is None:
        return parts[0]
    if kind == "vocab":
        return torch.cat(parts, 0)[: cfg.text.vocab_size]
    if kind == "glu":
        real, _ = _ffn_sizes(name, cfg, tp)
        halves = [p.chunk(2, 0) for p in parts]
        gate = torch.cat([h[0] for h in halves], 0)[:real]
        up = torch.cat([h[1] for h in halves], 0)[:real]
        return torch.cat([gate, up])
    if kind == "row":
        x = torch.cat(parts, 1)
        if ".mlp.linear_fc2." in name and not name.startswith("vision_model.merger"):
            x = x[:, : _ffn_sizes(name, cfg, tp)[0]]
        return x
    return torch.cat(parts, 0)


def _stage_of_layer(cfg: Qwen25VLConfig, pp: int, first_stage_layers: int | None) -> list[tuple[int, int]]:
    """(pp_rank, local index) of each global LM layer."""
    out = []
    for stage, n in enumerate(cfg.lm_layers_per_stage(pp, first_stage_layers)):
        out += [(stage, j) for j in range(n)]
    return out


def _on_stage(name: str, cfg: Qwen25VLConfig, pp_rank: int, pp: int, layer_map) -> str | None:
    """Local name of a full-mcore parameter on ``pp_rank``, or None when that stage does not hold it."""
    first, last = pp_rank == 0, pp_rank == pp - 1
    if name.startswith("vision_model.") or name.startswith("language_model.embedding."):
        return name if first else None
    if name.startswith("language_model.decoder.final_layernorm.") or name.startswith("language_model.output_layer."):
        return name if last else None
    m = _LAYER.match(name)
    if m and m.group(1) == "language_model":
        stage, local = layer_map[int(m.group(2))]
        return f"language_model.decoder.layers.{local}.{m.group(3)}" if stage == pp_rank else None
    return name


def shard_for_rank(
    full: Mapping[str, Tensor],
    cfg: Qwen25VLConfig,
    *,
    tp_rank: int,
    tp_size: int,
    pp_rank: int = 0,
    pp_size: int = 1,
    first_stage_layers: int | None = None,
) -> dict[str, Tensor]:
    """Full mcore state dict -> the local state dict of (tp_rank, pp_rank)."""
    layer_map = _stage_of_layer(cfg, pp_size, first_stage_layers)
    out = {}
    for name, x in full.items():
        local = _on_stage(name, cfg, pp_rank, pp_size, layer_map)
        if local is not None:
            out[local] = _slice(name, x, cfg, tp_rank, tp_size).clone()
    if cfg.text.tie_word_embeddings and pp_rank == pp_size - 1 and pp_rank != 0:
        # Tied head on a last stage without the embedding: megatron keeps a copy as output_layer.weight.
        emb = full["language_model.embedding.word_embeddings.weight"]
        out["language_model.output_layer.weight"] = _slice(
            "language_model.output_layer.weight", emb, cfg, tp_rank, tp_size
        ).clone()
    return out


def merge_shards(
    shards: Mapping[tuple[int, int], Mapping[str, Tensor]],
    cfg: Qwen25VLConfig,
    tp_size: int,
    pp_size: int = 1,
    first_stage_layers: int | None = None,
) -> dict[str, Tensor]:
    """Local state dicts keyed by (tp_rank, pp_rank) -> the full mcore state dict (inverse of sharding)."""
    layer_map = _stage_of_layer(cfg, pp_size, first_stage_layers)
    inverse = {(stage, local): g for g, (stage, local) in enumerate(layer_map)}
    grouped: dict[str, list[Tensor | None]] = {}
    for (tp_rank, pp_rank), local_sd in shards.items():
        for name, x in local_sd.items():
            m = _LAYER.match(name)
            if m and m.group(1) == "language_model":
                name = f"language_model.decoder.layers.{inverse[(pp_rank, int(m.group(2)))]}.{m.group(3)}"
            elif name.startswith("language_model.output_layer.") and cfg.text.tie_word_embeddings:
                continue  # the tied copy; the embedding is the master
            grouped.setdefault(name, [None] * tp_size)[tp_rank] = x
    out = {}
    for name, parts in grouped.items():
        missing = [r for r, p in enumerate(parts) if p is None]
        if missing and _tp_kind(name) is not None:
            raise KeyError(f"{name}: TP ranks {missing} missing from the shards")
        out[name] = _unslice(name, [p for p in parts if p is not None], cfg)
    return out


# ----------------------------------------------------------------------------- loading into a model


def load_full_into_model(model: torch.nn.Module, full: Mapping[str, Tensor], cfg: Qwen25VLConfig,
                         first_stage_layers: int | None = None) -> None:
    """Load a full mcore state dict into this process's (TP, PP) shard of the model (strict)."""
    local = shard_for_rank(
        full, cfg,
        tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(), pp_size=ps.get_pipeline_model_parallel_world_size(),
        first_stage_layers=first_stage_layers,
    )
    # megatron linears add '_extra_state' entries (FP8 metadata slots, None here): not weights.
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    missing, unexpected = sorted(set(own) - set(local)), sorted(set(local) - set(own))
    if missing or unexpected:
        raise KeyError(f"state dict does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, x in local.items():
        if own[k].shape != x.shape:
            raise ValueError(f"{k}: checkpoint slice {tuple(x.shape)} vs model {tuple(own[k].shape)}")
    result = model.load_state_dict({k: x.to(own[k].dtype) for k, x in local.items()}, strict=False)
    bad = [k for k in result.missing_keys if not k.endswith("_extra_state")] + list(result.unexpected_keys)
    if bad:
        raise KeyError(f"loading left keys unmatched: {bad[:5]}")


def load_hf_into_model(model: torch.nn.Module, hf_sd: Mapping[str, Tensor], cfg: Qwen25VLConfig,
                       first_stage_layers: int | None = None) -> None:
    """Load an HF Qwen2.5-VL state dict into this process's shard of the model."""
    load_full_into_model(model, hf_to_mcore(hf_sd, cfg), cfg, first_stage_layers)
