"""Qwen2.5-VL as a training model family: architecture from a preset or an HF config, matched to the
tokenizer the data was preprocessed with, built for this rank's TP x PP stage.
"""

from __future__ import annotations

import dataclasses
import os


from m2mega.models.qwen25vl import Qwen25VLConfig, preset
from m2mega.models.qwen25vl.config import PRESETS

from .config import ConfigError

__all__ = ["arch_for_tokenizer", "arch_source", "checkpoint_hf_config", "resolve_arch", "validate_qwen25vl",
           "qwen25vl_flops_per_token"]


def resolve_arch(name_or_path: str) -> Qwen25VLConfig:
    """A preset name (tiny, 3b, 7b, 32b, 72b), an HF ``config.json`` or a directory holding one."""
    if os.path.isdir(name_or_path) or name_or_path.endswith(".json"):
        return Qwen25VLConfig.from_hf(name_or_path)
    return preset(name_or_path)


def arch_for_tokenizer(arch: Qwen25VLConfig, tok) -> Qwen25VLConfig:
    """Make the architecture's vocabulary and special-token ids those of ``tok`` (an ``M2Tokenizer``).

    Real checkpoints already agree (HF ids are the tokenizer's); the tiny preset is resized to the offline
    test tokenizer. A checkpoint whose vocabulary is *smaller* than the tokenizer's cannot embed its ids.
    """
    ids = dict(
        image_token_id=tok.image_token_id,
        video_token_id=tok.video_token_id,
        vision_start_token_id=tok.vision_start_token_id,
        vision_end_token_id=tok.vision_end_token_id,
    )
    if arch.name == "tiny":
        return arch.replace(text=dataclasses.replace(arch.text, vocab_size=tok.vocab_size), **ids)
    if arch.text.vocab_size < tok.vocab_size:
        raise ValueError(
            f"the tokenizer has {tok.vocab_size} ids but the model's vocabulary is {arch.text.vocab_size}"
        )
    for k, v in ids.items():
        if getattr(arch, k) != v:
            raise ValueError(f"tokenizer's {k}={v} differs from the model config's {getattr(arch, k)}")
    return arch


def qwen25vl_flops_per_token(arch: Qwen25VLConfig, seq_length: int) -> float:
    """Training FLOPs per LM token: 6 x (non-embedding LM params) + attention (12 x layers x h x s / 2 causal),
    the count the model benchmark uses. Vision-tower FLOPs are not included (they scale with patches)."""
    t = arch.text
    head_dim = t.hidden_size // t.num_attention_heads
    q = t.hidden_size * t.num_attention_heads * head_dim
    kv = 2 * t.hidden_size * t.num_key_value_heads * head_dim
    o = t.num_attention_heads * head_dim * t.hidden_size
    mlp = 3 * t.hidden_size * t.intermediate_size
    per_layer = q + kv + o + mlp
    dense = t.num_layers * per_layer + t.hidden_size * t.vocab_size  # + output layer
    attn = 12 * t.num_layers * t.hidden_size * seq_length / 2
    return float(6 * dense + attn)


def tokenizer_from_prefix(prefix: str, override: str | None = None):
    """The tokenizer a dataset was preprocessed with (see :mod:`m2mega.data.dataset_meta`)."""
    from m2mega.data.dataset_meta import dataset_tokenizer

    return dataset_tokenizer(prefix, override)


def checkpoint_hf_config(path: str) -> str | None:
    """The HF ``config.json`` a checkpoint carries: ``path/config.json`` for one checkpoint (converted or
    saved by training), else that of the newest complete checkpoint of the save root ``path``."""
    from .checkpoint import find_latest

    if os.path.isfile(os.path.join(path, "config.json")):
        return os.path.join(path, "config.json")
    found = find_latest(path) if os.path.isdir(path) else None
    if found is not None and os.path.isfile(os.path.join(found[1], "config.json")):
        return os.path.join(found[1], "config.json")
    return None


def arch_source(cfg) -> str:
    """Where the architecture comes from: ``model.preset``, else the config.json of ``model.init_from``.
    Never a silent default: a run whose shape nobody chose would train (and save) the wrong model."""
    m = cfg.model
    if m.preset:
        return m.preset
    if m.init_from:
        found = checkpoint_hf_config(m.init_from)
        if found is None:
            raise ConfigError(f"model.preset is not set and model.init_from {m.init_from} holds no config.json: "
                              f"set model.preset ({', '.join(PRESETS)}, an HF config.json or a directory)")
        return found
    raise ConfigError(f"model.preset is required for model.family qwen25vl: one of {', '.join(PRESETS)}, an HF "
                      f"config.json or a directory holding one (or set model.init_from to a checkpoint that "
                      f"carries its config.json)")


def validate_qwen25vl(cfg) -> None:
    """The real Qwen2.5-VL shape (preset or config.json) against TP/PP and the sequence length. Records the
    resolved architecture source in ``model.preset`` so the saved config names what was built."""
    src = arch_source(cfg)
    try:
        arch = resolve_arch(src)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"model.preset {src!r}: {e}") from None
    cfg.model.preset = src
    p, t, v = cfg.parallel, arch.text, arch.vision
    for what, n in (("attention heads", t.num_attention_heads), ("key/value heads", t.num_key_value_heads),
                    ("vision attention heads", v.num_heads)):
        if n % p.tp:
            raise ConfigError(f"parallel.tp={p.tp} must divide the {n} {what} of Qwen2.5-VL {arch.name!r}")
    if t.num_layers < p.pp:
        raise ConfigError(f"parallel.pp={p.pp} exceeds the {t.num_layers} layers of Qwen2.5-VL {arch.name!r}")
    if cfg.schedule.seq_length > t.max_position_embeddings:
        raise ConfigError(f"schedule.seq_length {cfg.schedule.seq_length} > max_position_embeddings "
                          f"{t.max_position_embeddings} of Qwen2.5-VL {arch.name!r}")


def arch_from_config(cfg) -> Qwen25VLConfig:
    """The architecture of :func:`arch_source` matched to the data's tokenizer."""
    arch = resolve_arch(arch_source(cfg))
    if cfg.data.train_prefix:
        arch = arch_for_tokenizer(arch, tokenizer_from_prefix(cfg.data.train_prefix, cfg.data.tokenizer))
    return arch


def qwen25vl_model_provider(cfg):
    """This rank's TP x PP stage of Qwen2.5-VL for a :class:`~m2mega.train.config.TrainConfig`."""
    from m2mega.models.qwen25vl import build_model

    from .optim import resolve_dtype, training_transformer_overrides

    arch = arch_from_config(cfg)
    over = training_transformer_overrides(cfg)
    # The ViT never pipelines and runs without sequence parallelism (the model splices its output into
    # the full-sequence embeddings); it takes only the dtype and recompute settings.
    vision_keys = ("params_dtype", "bf16", "recompute_granularity", "recompute_method", "recompute_num_layers")
    vision_over = {k: v for k, v in over.items() if k in vision_keys}
    return build_model(arch, resolve_dtype(cfg), language_overrides=over, vision_overrides=vision_over)


def _flops(cfg) -> float:
    return qwen25vl_flops_per_token(arch_from_config(cfg), cfg.schedule.seq_length)


from .families import register_model_family  # noqa: E402

register_model_family("qwen25vl", qwen25vl_model_provider, _flops, validate_qwen25vl)
