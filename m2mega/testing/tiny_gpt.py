"""A tiny Qwen2.5-shaped megatron-core GPTModel (RMSNorm, SwiGLU, QKV bias, GQA, RoPE) for tests.

Used by the foundation parity tests and the first stage of the CPU demo; the real Qwen2.5-VL lives in
``m2mega.models``. Sizes are deliberately odd (hidden 48, ffn 88, vocab 130) so shape bugs that a
power-of-two model would hide show up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class TinyGPTShape:
    num_layers: int = 4
    hidden_size: int = 48
    num_attention_heads: int = 6
    num_query_groups: int = 2
    ffn_hidden_size: int = 88
    vocab_size: int = 130
    max_seq_len: int = 64
    rotary_base: float = 1_000_000.0


def build_tiny_gpt(shape: TinyGPTShape = TinyGPTShape(), *, dtype: torch.dtype = torch.float32):
    """Build this rank's slice (TP/PP from megatron's parallel_state) of the tiny Qwen-like GPTModel."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    cfg = TransformerConfig(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_attention_heads,
        num_query_groups=shape.num_query_groups,
        ffn_hidden_size=shape.ffn_hidden_size,
        kv_channels=shape.hidden_size // shape.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=1e-6,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # Initialise the full master weights on CPU and slice them: every TP layout then starts from
        # the same weights for a given seed.
        use_cpu_initialization=True,
        perform_initialization=True,
    )
    return GPTModel(
        cfg,
        get_gpt_layer_local_spec(),
        vocab_size=shape.vocab_size,
        max_sequence_length=shape.max_seq_len,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_base=shape.rotary_base,
    )


def synthetic_batch(
    shape: TinyGPTShape, batch: int, seq: int, seed: int
) -> dict[str, torch.Tensor]:
    """Random tokens/labels with a loss mask that blanks a ragged tail of each row (like prompt masking)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, shape.vocab_size, (batch, seq), generator=g)
    labels = torch.roll(tokens, -1, dims=1)
    loss_mask = torch.ones(batch, seq)
    for b in range(batch):
        loss_mask[b, seq - 1 - b % max(1, seq // 2) :] = 0.0
    position_ids = torch.arange(seq).unsqueeze(0).expand(batch, seq).contiguous()
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids}
