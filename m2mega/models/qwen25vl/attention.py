"""Core attention for megatron layer specs that understands packed (THD) sequences on any device.

megatron-core's local ``DotProductAttention`` refuses packed sequences, and TE is not always installed.
:class:`PackedAttention` is a drop-in ``core_attention`` submodule (same constructor and forward signature)
that computes attention restricted to segments given by ``cu_seqlens``:

- the LM's THD micro-batches (several samples packed into one row, causal inside each sample),
- the vision tower's per-image full attention and per-window attention (non-causal).

Backends, picked per call by :func:`m2mega.runtime.backends.select_backends` (``M2MEGA_ATTN_BACKEND`` or
the ``backend`` argument can force one):

- ``flash_attn``: ``flash_attn_varlen_func`` when flash-attn is installed (CUDA sm80+, fp16/bf16),
- ``torch_varlen``: ``torch.nn.attention.varlen.varlen_attn`` (CUDA sm80+, fp16/bf16, no dropout; flash
  kernels in torch: the THD path of a GPU without TE or flash-attn),
- ``sdpa``: ``scaled_dot_product_attention`` on chunks of whole segments with a block-diagonal (and causal)
  mask, so memory is bounded by the chunk size, not the packed length (CPU, fp32, anything).

The vision tower needs two segmentations in one forward (whole images for the full-attention layers,
windows for the others). :class:`WindowedPackedSeqParams` carries both; a ``PackedAttention`` built with
``window_attention=True`` uses the window one. Rotary embeddings are unaffected (they are per token).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide
from torch import Tensor

from m2mega.runtime.backends import Environment, select_backends

try:  # optional: only on CUDA machines with flash-attn installed
    from flash_attn import flash_attn_varlen_func as _flash_varlen  # type: ignore
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _flash_varlen = None

try:
    from torch.nn.attention.varlen import varlen_attn as _torch_varlen
except Exception:  # noqa: BLE001
    _torch_varlen = None

__all__ = ["PackedAttention", "WindowedPackedSeqParams", "segment_attention", "packed_seq_params_from_lengths"]

# SDPA fallback: short segments (vision windows, short samples) are grouped into block-masked chunks of at
# most this many tokens; segments of at least _SDPA_SOLO_TOKENS run alone with no mask (flash/causal kernels).
_SDPA_CHUNK_TOKENS = int(os.environ.get("M2MEGA_SDPA_CHUNK_TOKENS", "4096"))
_SDPA_SOLO_TOKENS = int(os.environ.get("M2MEGA_SDPA_SOLO_TOKENS", "1024"))


@dataclass
class WindowedPackedSeqParams(PackedSeqParams):
    """THD params with a second, finer segmentation used by window-attention layers."""

    cu_seqlens_window: Tensor = None
    max_seqlen_window: int = None


def packed_seq_params_from_lengths(lengths: list[int] | Tensor, device=None) -> PackedSeqParams:
    """THD ``PackedSeqParams`` for samples of the given lengths packed back to back."""
    lengths = torch.as_tensor(lengths, dtype=torch.int32)
    cu = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0)).to(device)
    mx = int(lengths.max().item()) if lengths.numel() else 0
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=mx, max_seqlen_kv=mx)


def _pick_backend(q: Tensor, backend: str | None, dropout_p: float) -> str:
    # The one selection rule (m2mega.runtime.backends), fed with this call's device, dtype and dropout.
    return select_backends(Environment.of(q), q.dtype, dropout_p, attention=backend).attention


def _chunks(lengths: list[int], limit: int, solo: int) -> list[tuple[int, int]]:
    """Group consecutive segments into chunks of at most ``limit`` tokens, segments of ``solo`` tokens or
    more alone: (first, last+1) segment indices."""
    out, start, tokens = [], 0, 0
    for i, n in enumerate(lengths):
        if tokens and (tokens + n > limit or n >= solo):
            out.append((start, i))
            start, tokens = i, 0
        tokens += n
        if n >= solo:
            out.append((start, i + 1))
            start, tokens = i + 1, 0
    if start < len(lengths):
        out.append((start, len(lengths)))
    return out


def _sdpa_segments(q: Tensor, k: Tensor, v: Tensor, lengths: list[int], causal: bool, scale: float,
                   dropout_p: float) -> Tensor:
    gqa = q.shape[1] != k.shape[1]
    outs = []
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    for a, b in _chunks(lengths, _SDPA_CHUNK_TOKENS, _SDPA_SOLO_TOKENS):
        s, e = offsets[a], offsets[b]
        qc, kc, vc = (x[s:e].transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # [1, h, n, d]
        if b - a == 1:
            mask, is_causal = None, causal
        else:
            seg = torch.repeat_interleave(
                torch.arange(b - a, device=q.device), torch.tensor(lengths[a:b], device=q.device)
            )
            mask = seg[:, None] == seg[None, :]
            if causal:
                mask = mask.tril()
            is_causal = False
        o = F.scaled_dot_product_attention(
            qc, kc, vc, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=gqa
        )
        outs.append(o.squeeze(0).transpose(0, 1))
    return torch.cat(outs, dim=0) if len(outs) != 1 else outs[0]


def segment_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int | None,
    *,
    causal: bool,
    scale: float,
    dropout_p: float = 0.0,
    backend: str | None = None,
) -> Tensor:
    """Attention inside each segment of a packed sequence.

    q ``[T, Hq, D]``, k/v ``[T, Hkv, D]`` (GQA when Hkv < Hq: query head i uses kv head i // (Hq/Hkv)),
    ``cu_seqlens`` int ``[n+1]`` with ``cu_seqlens[-1] == T``. Returns ``[T, Hq, D]``.
    """
    T = q.shape[0]
    if int(cu_seqlens[-1]) != T:
        raise ValueError(f"cu_seqlens ends at {int(cu_seqlens[-1])} but the packed sequence has {T} tokens")
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())
    which = _pick_backend(q, backend, dropout_p)
    if which == "flash_attn":
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        return _flash_varlen(q, k, v, cu, cu, max_seqlen, max_seqlen, dropout_p=dropout_p,
                             softmax_scale=scale, causal=causal)
    if which == "torch_varlen":
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        return _torch_varlen(q, k, v, cu, cu, max_seqlen, max_seqlen, scale=scale,
                             window_size=(-1, 0) if causal else (-1, -1), enable_gqa=q.shape[1] != k.shape[1])
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    return _sdpa_segments(q, k, v, lengths, causal, scale, dropout_p)


def dense_attention(q: Tensor, k: Tensor, v: Tensor, attention_mask: Optional[Tensor], *, causal: bool,
                    scale: float, dropout_p: float = 0.0) -> Tensor:
    """Padded batch (BSHD): q ``[sq, b, Hq, D]``, k/v ``[sk, b, Hkv, D]``; ``attention_mask`` megatron-style
    bool, True = masked, broadcastable to ``[b, 1, sq, sk]``. Causality is bottom-right aligned when
    sq < sk (queries are the last sq positions, as in KV-cache decoding). Returns ``[sq, b, Hq, D]``."""
    qb, kb, vb = (x.permute(1, 2, 0, 3) for x in (q, k, v))  # [b, h, s, d]
    gqa = qb.shape[1] != kb.shape[1]
    sq, sk = q.shape[0], k.shape[0]
    if attention_mask is None and (not causal or sq == sk):
        o = F.scaled_dot_product_attention(qb, kb, vb, dropout_p=dropout_p, is_causal=causal, scale=scale,
                                           enable_gqa=gqa)
    else:
        allowed = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
        if causal:
            allowed = allowed.tril(diagonal=sk - sq)
        if attention_mask is not None:
            allowed = allowed & ~attention_mask.to(torch.bool)
            # A fully masked row (a padding query) would give NaN; let it see its own position instead.
            allowed = allowed | torch.eye(sq, sk, dtype=torch.bool, device=q.device).roll(sk - sq, dims=-1)
        o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=allowed, dropout_p=dropout_p, scale=scale,
                                           enable_gqa=gqa)
    return o.permute(2, 0, 1, 3)


class PackedAttention(MegatronModule):
    """``core_attention`` submodule: THD via cu_seqlens (causal or not), BSHD with optional mask.

    Constructor matches megatron's ``DotProductAttention`` so it drops into ``SelfAttentionSubmodules``;
    ``window_attention`` / ``backend`` are extra spec params.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        window_attention: bool = False,
        backend: str | None = None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise NotImplementedError("PackedAttention does not implement context parallelism")

        tp = (
            pg_collection.tp.size()
            if pg_collection is not None and hasattr(pg_collection, "tp")
            else parallel_state.get_tensor_model_parallel_world_size()
        )
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.window_attention = window_attention
        self.backend = backend
        self.num_heads = divide(config.num_attention_heads, tp)
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> Tensor:
        if attention_bias is not None:
            raise NotImplementedError("PackedAttention does not support attention_bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
        dropout_p = self.dropout_p if self.training else 0.0
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            p = packed_seq_params
            if self.window_attention:
                if not isinstance(p, WindowedPackedSeqParams) or p.cu_seqlens_window is None:
                    raise ValueError(
                        f"layer {self.layer_number} uses window attention but packed_seq_params has no "
                        "cu_seqlens_window (pass WindowedPackedSeqParams)"
                    )
                cu, mx = p.cu_seqlens_window, p.max_seqlen_window
            else:
                # Padded offsets put each sample's padding after its tokens: harmless under a causal mask.
                cu = p.cu_seqlens_q_padded if p.cu_seqlens_q_padded is not None else p.cu_seqlens_q
                mx = p.max_seqlen_q
            out = segment_attention(query, key, value, cu, mx, causal=causal, scale=self.softmax_scale,
                                    dropout_p=dropout_p, backend=self.backend)
            return out.reshape(out.shape[0], -1)
        out = dense_attention(query, key, value, attention_mask, causal=causal, scale=self.softmax_scale,
                              dropout_p=dropout_p)
        return out.reshape(out.shape[0], out.shape[1], -1)
