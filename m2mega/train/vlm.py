"""Qwen2.5-VL as a training model family: architecture from a preset or an HF config, matched to the
tokenizer the data was preprocessed with, built for this rank's TP x PP stage.
"""

from __future__ import annotations

import dataclasses
import os


from m2mega.models.qwen25vl import Qwen25VLConfig, preset

__all__ = ["arch_for_tokenizer", "resolve_arch", "qwen25vl_flops_per_token"]


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


def tokenizer_from_prefix(prefix: str):
    """The tokenizer a dataset was preprocessed with (recorded in ``PREFIX.meta.json``)."""
    import json

    from m2mega.data.tokenizer import build_tokenizer

    path = prefix + ".meta.json"
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except OSError as e:
        raise FileNotFoundError(f"{path}: cannot read the dataset's metadata ({e}); run tools/preprocess_data.py") from e
    if not meta.get("tokenizer_model"):
        raise ValueError(f"{path} records no tokenizer_model")
    return build_tokenizer(meta.get("tokenizer_type", "HuggingFaceTokenizer"), meta["tokenizer_model"])


def arch_from_config(cfg) -> Qwen25VLConfig:
    """``model.preset`` (name, HF config.json or directory; default tiny) matched to the data's tokenizer."""
    arch = resolve_arch(cfg.model.preset or "tiny")
    if cfg.data.train_prefix:
        arch = arch_for_tokenizer(arch, tokenizer_from_prefix(cfg.data.train_prefix))
    return arch


def qwen25vl_model_provider(cfg):
    """This rank's TP x PP stage of Qwen2.5-VL for a :class:`~m2mega.train.config.TrainConfig`."""
    from m2mega.models.qwen25vl import build_model

    from .loop import training_transformer_overrides
    from .optim import resolve_dtype

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

register_model_family("qwen25vl", qwen25vl_model_provider, _flops)
