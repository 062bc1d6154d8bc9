"""megatron-core layer specs for the Qwen2.5-VL language model and vision tower.

Both use megatron's ``TransformerLayer`` / ``SelfAttention`` / ``MLP`` with its TP linears
(``ColumnParallelLinear`` / ``RowParallelLinear``), plus two local pieces:

- :class:`RMSNorm`: HF's formula (normalise in fp32, cast back, then scale) so bf16 runs round like HF;
  unlike megatron's torch-norm wrapper it supports sequence parallelism (its weight is marked so
  megatron's DDP all-reduces its gradient over TP).
- :class:`~m2mega.models.qwen25vl.attention.PackedAttention`: THD (cu_seqlens) attention on any device.

The vision spec is a per-layer list: layers in ``fullatt_block_indexes`` attend within whole images, the
others within 112-px windows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from m2mega.runtime.backends import Environment, select_backends

from .attention import PackedAttention

__all__ = ["RMSNorm", "language_layer_spec", "language_block_spec", "vision_block_spec", "merger_mlp_spec"]


class RMSNorm(nn.Module):
    """RMSNorm as HF Qwen2 computes it: ``w * (x_fp32 * rsqrt(mean(x_fp32^2) + eps)).to(x.dtype)``.

    The normalisation runs as torch's fused ``F.rms_norm`` on CUDA (one kernel; it normalises a half
    input in fp32 and casts once, i.e. HF's rounding) or as the explicit formula, by the rule in
    :func:`m2mega.runtime.backends.select_backends`."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **_unused):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        # megatron's finalize_model_grads all-reduces grads of params marked like this over TP.
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if select_backends(Environment.of(x), dtype).rms_norm == "torch_fused":
            return self.weight * F.rms_norm(x, (x.shape[-1],), None, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def _layer_spec(attn_mask_type: AttnMaskType, window_attention: bool = False, backend: str | None = None) -> ModuleSpec:
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": attn_mask_type},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=ModuleSpec(
                        module=PackedAttention, params={"window_attention": window_attention, "backend": backend}
                    ),
                    linear_proj=RowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=ModuleSpec(
                module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def language_layer_spec(backend: str | None = None) -> ModuleSpec:
    """One causal LM decoder layer (QKV bias, GQA, SwiGLU, RMSNorm) with packed-sequence attention."""
    return _layer_spec(AttnMaskType.causal, backend=backend)


def language_block_spec(config: TransformerConfig, vp_stage: int | None = None, pp_rank: int | None = None,
                        backend: str | None = None) -> TransformerBlockSubmodules:
    """This PP stage's LM layers plus the HF-style final RMSNorm (megatron's default would be torch's)."""
    n = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[language_layer_spec(backend)] * n, layer_norm=RMSNorm)


def vision_block_spec(num_layers: int, fullatt_block_indexes, backend: str | None = None) -> TransformerBlockSubmodules:
    """All ViT layers (the ViT never pipelines): non-causal, window attention except the full-attention
    layers; no final norm (the merger has its own)."""
    full = set(int(i) for i in fullatt_block_indexes)
    return TransformerBlockSubmodules(
        layer_specs=[_layer_spec(AttnMaskType.no_mask, window_attention=i not in full, backend=backend)
                     for i in range(num_layers)],
        layer_norm=None,
    )


def merger_mlp_spec() -> MLPSubmodules:
    """Patch merger MLP: ColumnParallel (4h -> 4h) -> GELU -> RowParallel (4h -> LM hidden)."""
    return MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
