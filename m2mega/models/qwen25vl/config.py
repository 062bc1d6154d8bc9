"""Qwen2.5-VL architecture description: HF ``config.json`` reader, named presets, megatron configs.

:class:`Qwen25VLConfig` holds only the *architecture* (what a checkpoint fixes). The parallel layout and
dtype are chosen when the megatron :class:`TransformerConfig` objects are built
(:meth:`Qwen25VLConfig.language_transformer_config`, :meth:`vision_transformer_config`,
:meth:`merger_transformer_config`), so one architecture loads into any TP x PP layout.

Presets (``preset(name)``): ``tiny`` (tests, demo: odd sizes that still split over TP=2), ``3b``, ``7b``,
``32b``, ``72b`` (the released Qwen2.5-VL shapes; M2-Reasoning-7B has the 7B shape). A user checkpoint
should be read with :meth:`Qwen25VLConfig.from_hf`, which is authoritative over the presets.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["TextArch", "VisionArch", "Qwen25VLConfig", "PRESETS", "round_up"]


def round_up(x: int, m: int) -> int:
    return int(math.ceil(x / m) * m)


@dataclass(frozen=True)
class TextArch:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    max_position_embeddings: int = 128000
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class VisionArch:
    depth: int = 32
    hidden_size: int = 1280
    num_heads: int = 16
    intermediate_size: int = 3420
    out_hidden_size: int = 3584
    patch_size: int = 14
    temporal_patch_size: int = 2
    in_channels: int = 3
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    tokens_per_second: float = 2.0
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened pixel patch (C x T x P x P), the row size of ``pixel_values``."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def merger_hidden_size(self) -> int:
        return self.hidden_size * self.spatial_merge_size**2


_ACTS = {"silu": F.silu, "gelu": F.gelu}


@dataclass(frozen=True)
class Qwen25VLConfig:
    text: TextArch
    vision: VisionArch
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    # Megatron pads the vocabulary to a multiple of this x TP so every TP rank holds an equal slice.
    make_vocab_size_divisible_by: int = 128
    name: str = "custom"

    def __post_init__(self):
        t, v = self.text, self.vision
        if t.hidden_size % t.num_attention_heads:
            raise ValueError(f"text hidden_size {t.hidden_size} not divisible by heads {t.num_attention_heads}")
        if t.num_attention_heads % t.num_key_value_heads:
            raise ValueError(f"text heads {t.num_attention_heads} not divisible by kv heads {t.num_key_value_heads}")
        if sum(t.mrope_section) * 2 != t.head_dim:
            raise ValueError(f"mrope_section {t.mrope_section} must sum to head_dim/2 = {t.head_dim // 2}")
        if v.hidden_size % v.num_heads or v.head_dim % 4:
            raise ValueError(
                f"vision head_dim {v.hidden_size}/{v.num_heads} must be an integer divisible by 4 (2D rope)"
            )
        if v.out_hidden_size != t.hidden_size:
            raise ValueError(f"vision out_hidden_size {v.out_hidden_size} != text hidden_size {t.hidden_size}")
        bad = [i for i in v.fullatt_block_indexes if not 0 <= i < v.depth]
        if bad:
            raise ValueError(f"fullatt_block_indexes {bad} outside 0..{v.depth - 1}")

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf(cls, source: str | os.PathLike | dict[str, Any], **overrides) -> "Qwen25VLConfig":
        """Read an HF ``config.json`` (path to the file or its directory, or the parsed dict).

        Accepts both the flat hub layout (Qwen2.5-VL release: text fields at top level, ``rope_scaling``)
        and the nested transformers>=5 layout (``text_config``, ``rope_parameters``).
        """
        if isinstance(source, dict):
            d, where = source, "<dict>"
        else:
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            with open(path) as f:
                d = json.load(f)
            where = path
        mt = d.get("model_type")
        if mt not in (None, "qwen2_5_vl"):
            raise ValueError(f"{where}: model_type {mt!r} is not qwen2_5_vl")
        tc = dict(d)
        if isinstance(d.get("text_config"), dict):
            tc.update({k: v for k, v in d["text_config"].items() if v is not None})
        rope = tc.get("rope_parameters") or tc.get("rope_scaling") or {}
        theta = rope.get("rope_theta", tc.get("rope_theta", 1000000.0))
        try:
            text = TextArch(
                vocab_size=int(tc["vocab_size"]),
                hidden_size=int(tc["hidden_size"]),
                intermediate_size=int(tc["intermediate_size"]),
                num_layers=int(tc["num_hidden_layers"]),
                num_attention_heads=int(tc["num_attention_heads"]),
                num_key_value_heads=int(tc.get("num_key_value_heads") or tc["num_attention_heads"]),
                rms_norm_eps=float(tc.get("rms_norm_eps", 1e-6)),
                rope_theta=float(theta),
                mrope_section=tuple(int(x) for x in rope.get("mrope_section", (16, 24, 24))),
                max_position_embeddings=int(tc.get("max_position_embeddings", 128000)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", tc.get("tie_word_embeddings", False))),
                hidden_act=str(tc.get("hidden_act", "silu")),
            )
            vc = d["vision_config"]
            vrope = vc.get("rope_parameters") or {}
            vision = VisionArch(
                depth=int(vc.get("depth", vc.get("num_hidden_layers", 32))),
                hidden_size=int(vc.get("hidden_size", 1280)),
                num_heads=int(vc.get("num_heads", vc.get("num_attention_heads", 16))),
                intermediate_size=int(vc.get("intermediate_size", 3420)),
                out_hidden_size=int(vc.get("out_hidden_size", text.hidden_size)),
                patch_size=int(vc.get("patch_size", vc.get("spatial_patch_size", 14))),
                temporal_patch_size=int(vc.get("temporal_patch_size", 2)),
                in_channels=int(vc.get("in_channels", vc.get("in_chans", 3))),
                spatial_merge_size=int(vc.get("spatial_merge_size", 2)),
                window_size=int(vc.get("window_size", 112)),
                fullatt_block_indexes=tuple(int(i) for i in vc.get("fullatt_block_indexes", (7, 15, 23, 31))),
                tokens_per_second=float(vc.get("tokens_per_second", 2)),
                rope_theta=float(vrope.get("rope_theta", 10000.0)),
                hidden_act=str(vc.get("hidden_act", "silu")),
            )
        except KeyError as e:
            raise ValueError(f"{where}: missing field {e.args[0]!r} in the Qwen2.5-VL config") from None
        kw = dict(
            text=text,
            vision=vision,
            image_token_id=int(d.get("image_token_id", 151655)),
            video_token_id=int(d.get("video_token_id", 151656)),
            vision_start_token_id=int(d.get("vision_start_token_id", 151652)),
            vision_end_token_id=int(d.get("vision_end_token_id", 151653)),
            name=str(d.get("_name_or_path") or "hf"),
        )
        kw.update(overrides)
        return cls(**kw)

    def to_hf_dict(self) -> dict[str, Any]:
        """The nested transformers>=5 config dict (``Qwen2_5_VLConfig(**d)``), used to build the HF parity model."""
        t, v = self.text, self.vision
        return {
            "model_type": "qwen2_5_vl",
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "text_config": {
                "vocab_size": t.vocab_size,
                "hidden_size": t.hidden_size,
                "intermediate_size": t.intermediate_size,
                "num_hidden_layers": t.num_layers,
                "num_attention_heads": t.num_attention_heads,
                "num_key_value_heads": t.num_key_value_heads,
                "rms_norm_eps": t.rms_norm_eps,
                "max_position_embeddings": t.max_position_embeddings,
                "hidden_act": t.hidden_act,
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": t.rope_theta,
                    "mrope_section": list(t.mrope_section),
                },
                "bos_token_id": None,
                "eos_token_id": None,
            },
            "vision_config": {
                "depth": v.depth,
                "hidden_size": v.hidden_size,
                "num_heads": v.num_heads,
                "intermediate_size": v.intermediate_size,
                "out_hidden_size": v.out_hidden_size,
                "patch_size": v.patch_size,
                "temporal_patch_size": v.temporal_patch_size,
                "in_channels": v.in_channels,
                "spatial_merge_size": v.spatial_merge_size,
                "window_size": v.window_size,
                "fullatt_block_indexes": list(v.fullatt_block_indexes),
                "tokens_per_second": int(v.tokens_per_second) if float(v.tokens_per_second).is_integer() else v.tokens_per_second,
                "hidden_act": v.hidden_act,
                "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
            },
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": t.tie_word_embeddings,
        }

    # ------------------------------------------------------------------ layout-dependent sizes
    def padded_vocab_size(self, tp: int) -> int:
        """Vocabulary rows per model (all TP ranks together): padded like megatron-LM does."""
        return round_up(self.text.vocab_size, self.make_vocab_size_divisible_by * tp)

    def lm_ffn_size(self, tp: int) -> int:
        # Zero-padded FFN rows contribute exactly nothing (silu(0) * 0) and get zero gradients.
        return round_up(self.text.intermediate_size, tp)

    def vision_ffn_size(self, tp: int) -> int:
        return round_up(self.vision.intermediate_size, tp)

    def lm_layers_per_stage(self, pp: int, first_stage_layers: int | None = None) -> list[int]:
        """LM decoder layers on each PP stage. ``first_stage_layers`` lightens stage 0 (it also runs the
        vision tower); the rest are split evenly, as megatron's ``num_layers_in_first_pipeline_stage``."""
        n = self.text.num_layers
        if pp == 1:
            return [n]
        if first_stage_layers is None:
            if n % pp:
                raise ValueError(
                    f"{n} LM layers do not split evenly over PP={pp}; pass first_stage_layers "
                    f"(e.g. {n - (pp - 1) * (n // pp)}) so the rest split evenly"
                )
            return [n // pp] * pp
        rest = n - first_stage_layers
        if first_stage_layers < 0 or rest % (pp - 1):
            raise ValueError(f"{rest} LM layers after a first stage of {first_stage_layers} do not split over {pp - 1}")
        return [first_stage_layers] + [rest // (pp - 1)] * (pp - 1)

    # ------------------------------------------------------------------ megatron configs
    def _common(self, tp: int, dtype: torch.dtype, **overrides) -> dict[str, Any]:
        kw = dict(
            tensor_model_parallel_size=tp,
            params_dtype=dtype,
            bf16=dtype == torch.bfloat16,
            fp16=dtype == torch.float16,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            normalization="RMSNorm",
            gated_linear_unit=True,
            add_qkv_bias=True,
            apply_rope_fusion=False,
            bias_activation_fusion=False,
            masked_softmax_fusion=False,
            gradient_accumulation_fusion=False,
            persist_layer_norm=False,
            # fp32 softmax in attention, as HF does.
            attention_softmax_in_fp32=True,
            use_cpu_initialization=True,
        )
        kw.update(overrides)
        return kw

    def language_transformer_config(
        self,
        tp: int = 1,
        pp: int = 1,
        dtype: torch.dtype = torch.float32,
        first_stage_layers: int | None = None,
        **overrides,
    ):
        """megatron ``TransformerConfig`` of the LM decoder for a TP x PP layout."""
        from megatron.core.transformer import TransformerConfig

        t = self.text
        if t.num_key_value_heads % tp and tp % t.num_key_value_heads:
            raise ValueError(f"TP={tp} must divide or be a multiple of the {t.num_key_value_heads} KV heads")
        if t.num_attention_heads % tp:
            raise ValueError(f"TP={tp} does not divide the {t.num_attention_heads} attention heads")
        stages = self.lm_layers_per_stage(pp, first_stage_layers)
        kw = self._common(
            tp,
            dtype,
            num_layers=t.num_layers,
            hidden_size=t.hidden_size,
            ffn_hidden_size=self.lm_ffn_size(tp),
            num_attention_heads=t.num_attention_heads,
            num_query_groups=t.num_key_value_heads,
            kv_channels=t.head_dim,
            layernorm_epsilon=t.rms_norm_eps,
            activation_func=_ACTS[t.hidden_act],
            add_bias_linear=False,
            mrope_section=list(t.mrope_section),
            pipeline_model_parallel_size=pp,
            pipeline_dtype=dtype,
            # Packed micro-batches differ in length; PP must exchange shapes. (The dispatcher setting only
            # silences megatron's MoE check, which rejects variable lengths with its default.)
            variable_seq_lengths=True,
            moe_token_dispatcher_type="alltoall",
        )
        if pp > 1 and first_stage_layers is not None:
            kw["num_layers_in_first_pipeline_stage"] = stages[0]
            if pp > 2:
                kw["num_layers_in_last_pipeline_stage"] = stages[-1]
        kw.update(overrides)
        return TransformerConfig(**kw)

    def vision_transformer_config(self, tp: int = 1, dtype: torch.dtype = torch.float32, **overrides):
        """megatron ``TransformerConfig`` of the ViT. It never pipelines: it lives on PP stage 0."""
        from megatron.core.transformer import TransformerConfig

        v = self.vision
        if v.num_heads % tp:
            raise ValueError(f"TP={tp} does not divide the {v.num_heads} vision heads")
        kw = self._common(
            tp,
            dtype,
            num_layers=v.depth,
            hidden_size=v.hidden_size,
            ffn_hidden_size=self.vision_ffn_size(tp),
            num_attention_heads=v.num_heads,
            num_query_groups=v.num_heads,
            kv_channels=v.head_dim,
            layernorm_epsilon=v.rms_norm_eps,
            activation_func=_ACTS[v.hidden_act],
            add_bias_linear=True,
            pipeline_model_parallel_size=1,
            sequence_parallel=False,
        )
        kw.update(overrides)
        return TransformerConfig(**kw)

    def merger_transformer_config(self, tp: int = 1, dtype: torch.dtype = torch.float32, **overrides):
        """Config of the patch merger MLP: (4 x vision hidden) -> GELU -> LM hidden, with biases."""
        from megatron.core.transformer import TransformerConfig

        v = self.vision
        if v.merger_hidden_size % tp:
            raise ValueError(f"TP={tp} does not divide the merger width {v.merger_hidden_size}")
        kw = self._common(
            tp,
            dtype,
            num_layers=1,
            hidden_size=v.out_hidden_size,
            ffn_hidden_size=v.merger_hidden_size,
            num_attention_heads=tp,  # unused by an MLP, but megatron checks it divides over TP
            gated_linear_unit=False,
            activation_func=F.gelu,
            add_bias_linear=True,
            layernorm_epsilon=1e-6,
            pipeline_model_parallel_size=1,
            sequence_parallel=False,
        )
        kw.update(overrides)
        return TransformerConfig(**kw)

    def replace(self, **kw) -> "Qwen25VLConfig":
        return dataclasses.replace(self, **kw)


def _qwen_vision(out_hidden: int, intermediate: int) -> VisionArch:
    return VisionArch(out_hidden_size=out_hidden, intermediate_size=intermediate)


PRESETS: dict[str, Qwen25VLConfig] = {
    # Tiny random model for tests and the CPU demo: odd sizes (FFN 74, vision FFN 54, vocab 203) that
    # still split over TP=2; window 112 px so an 84x140 image has several attention windows.
    "tiny": Qwen25VLConfig(
        text=TextArch(
            vocab_size=203, hidden_size=48, intermediate_size=74, num_layers=3, num_attention_heads=6,
            num_key_value_heads=2, rope_theta=10000.0, mrope_section=(2, 1, 1), max_position_embeddings=4096,
        ),
        vision=VisionArch(
            depth=3, hidden_size=40, num_heads=2, intermediate_size=54, out_hidden_size=48,
            fullatt_block_indexes=(2,),
        ),
        image_token_id=200, video_token_id=201, vision_start_token_id=198, vision_end_token_id=199,
        make_vocab_size_divisible_by=8, name="tiny",
    ),
    "3b": Qwen25VLConfig(
        text=TextArch(
            vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_layers=36,
            num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True,
        ),
        vision=_qwen_vision(2048, 3420),
        name="3b",
    ),
    "7b": Qwen25VLConfig(
        text=TextArch(
            vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
            num_attention_heads=28, num_key_value_heads=4,
        ),
        vision=_qwen_vision(3584, 3420),
        name="7b",
    ),
    "32b": Qwen25VLConfig(
        text=TextArch(
            vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_layers=64,
            num_attention_heads=40, num_key_value_heads=8,
        ),
        vision=_qwen_vision(5120, 3456),
        name="32b",
    ),
    "72b": Qwen25VLConfig(
        text=TextArch(
            vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_layers=80,
            num_attention_heads=64, num_key_value_heads=8,
        ),
        vision=_qwen_vision(8192, 3456),
        name="72b",
    ),
}


def preset(name: str) -> Qwen25VLConfig:
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown Qwen2.5-VL preset {name!r}; known: {sorted(PRESETS)}") from None


__all__.append("preset")
