"""Qwen2.5-VL vision tower on megatron-core: patch embedding, 2D RoPE, window attention, patch merger.

Input is what the Qwen2-VL image processor (or ``m2mega.ops.vision_pack``) emits for a ragged batch of
images: ``pixel_values [N, C*T*P*P]`` (patches in 2x2-merge-block order) and ``grid_thw [n, 3]``.
Output is ``[N / merge^2, LM hidden]``, one row per LM image token, in the processor's order.

Inside, as HF does: the patches are reordered so each 112-px window is contiguous (``window_index``), the
layers in ``fullatt_block_indexes`` attend within whole images/frames and the others within windows
(both via cu_seqlens, :mod:`.attention`), the merger folds each 2x2 block into one LM-sized vector, and
the result is put back into the original order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatron.core import parallel_state
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from .attention import WindowedPackedSeqParams
from .config import VisionArch
from .layer_specs import RMSNorm, merger_mlp_spec, vision_block_spec

__all__ = ["VisionTransformer", "vision_metadata", "vision_rotary_freqs"]


def _vision_metadata(grid_thw: Tensor, merge_size: int = 2, window_size: int = 112, patch_size: int = 14):
    """(cu_seqlens int32, window_index int64, cu_window_seqlens int32, rot_pos_ids int64 [N, 2]) for a
    ragged batch, as HF's vision tower computes them. Private fallback for ``m2mega.ops.vision_pack``."""
    grids = grid_thw.detach().to("cpu", torch.long).reshape(-1, 3).tolist()
    m = merge_size
    win = window_size // m // patch_size  # window side in merged units
    cu, cu_win, win_idx, rot = [0], [0], [], []
    offset = 0
    for t, h, w in grids:
        if h % m or w % m:
            raise ValueError(f"image grid {t}x{h}x{w} is not divisible by the merge size {m}")
        for _ in range(t):
            cu.append(cu[-1] + h * w)
        # 2D rotary ids in 2x2-block order: (block row, block col, in-block row, in-block col).
        hh = torch.arange(h).view(h // m, m, 1, 1).expand(h // m, m, w // m, m).permute(0, 2, 1, 3).reshape(-1)
        ww = torch.arange(w).view(1, 1, w // m, m).expand(h // m, m, w // m, m).permute(0, 2, 1, 3).reshape(-1)
        rot.append(torch.stack([hh, ww], dim=-1).repeat(t, 1))
        # Window reordering of merged units, per frame.
        lh, lw = h // m, w // m
        nh, nw = -(-lh // win), -(-lw // win)
        idx = torch.arange(t * lh * lw).view(t, lh, lw)
        for f in range(t):
            for a in range(nh):
                for b in range(nw):
                    block = idx[f, a * win : (a + 1) * win, b * win : (b + 1) * win].reshape(-1)
                    win_idx.append(block + offset)
                    cu_win.append(cu_win[-1] + block.numel() * m * m)
        offset += t * lh * lw
    return (
        torch.tensor(cu, dtype=torch.int32),
        torch.cat(win_idx) if win_idx else torch.zeros(0, dtype=torch.long),
        torch.tensor(cu_win, dtype=torch.int32),
        torch.cat(rot) if rot else torch.zeros(0, 2, dtype=torch.long),
    )


try:  # the packing engineer's (C++/GPU) implementation, when present
    from m2mega.ops.vision_pack import vision_metadata as _ops_vision_metadata  # type: ignore
except Exception:  # noqa: BLE001
    _ops_vision_metadata = None


def vision_metadata(grid_thw: Tensor, merge_size: int = 2, window_size: int = 112, patch_size: int = 14):
    """See :func:`_vision_metadata`; uses ``m2mega.ops.vision_pack.vision_metadata`` when available."""
    if _ops_vision_metadata is not None:
        return _ops_vision_metadata(grid_thw, merge_size=merge_size, window_size=window_size, patch_size=patch_size)
    return _vision_metadata(grid_thw, merge_size, window_size, patch_size)


def vision_rotary_freqs(rot_pos_ids: Tensor, head_dim: int, theta: float = 10000.0) -> Tensor:
    """Rotation angles ``[N, head_dim]`` for 2D RoPE: ``[h*f, w*f, h*f, w*f]`` with ``f`` the
    ``head_dim/4`` inverse frequencies (megatron's non-interleaved rotate-half convention, as HF)."""
    spatial = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, spatial, 2, dtype=torch.float, device=rot_pos_ids.device) / spatial))
    f = rot_pos_ids[..., None].float() * inv_freq  # [N, 2, head_dim/4]
    hw = torch.cat([f[:, 0], f[:, 1]], dim=-1)
    return torch.cat([hw, hw], dim=-1)


class PatchMerger(MegatronModule):
    """RMSNorm, then each 2x2 block of patches -> Linear -> GELU -> Linear into the LM hidden size."""

    def __init__(self, vision_config: TransformerConfig, merger_config: TransformerConfig, arch: VisionArch):
        super().__init__(config=merger_config)
        self.unit = arch.spatial_merge_size**2
        self.ln_q = RMSNorm(vision_config, arch.hidden_size, eps=arch.rms_norm_eps)
        self.mlp = MLP(merger_config, merger_mlp_spec(), input_size=arch.merger_hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        x = self.ln_q(x).reshape(-1, self.ln_q.weight.shape[0] * self.unit)
        out, bias = self.mlp(x)
        return out + bias if bias is not None else out


class VisionTransformer(MegatronModule):
    """The Qwen2.5-VL ViT + merger. TP-parallel (heads, MLP, merger); never pipelined (PP stage 0)."""

    def __init__(self, config: TransformerConfig, merger_config: TransformerConfig, arch: VisionArch,
                 attn_backend: str | None = None):
        super().__init__(config=config)
        self.arch = arch
        self.patch_embed = nn.Linear(arch.patch_dim, arch.hidden_size, bias=False, dtype=config.params_dtype)
        if config.perform_initialization:
            config.init_method(self.patch_embed.weight)
            # A replicated random weight must be identical on every TP rank.
            if parallel_state.model_parallel_is_initialized() and parallel_state.get_tensor_model_parallel_world_size() > 1:
                torch.distributed.broadcast(
                    self.patch_embed.weight.data,
                    src=parallel_state.get_tensor_model_parallel_src_rank(),
                    group=parallel_state.get_tensor_model_parallel_group(),
                )
        self.decoder = TransformerBlock(
            config=config,
            spec=vision_block_spec(arch.depth, arch.fullatt_block_indexes, backend=attn_backend),
            post_layer_norm=False,
            pre_process=True,
            post_process=False,
        )
        self.merger = PatchMerger(config, merger_config, arch)

    def forward(self, pixel_values: Tensor, grid_thw: Tensor, meta: tuple | None = None) -> Tensor:
        """``meta``: precomputed :func:`vision_metadata` of ``grid_thw`` (e.g. from the data loader)."""
        a = self.arch
        n = pixel_values.shape[0]
        expected = int(grid_thw.prod(-1).sum().item())
        if pixel_values.dim() != 2 or pixel_values.shape[1] != a.patch_dim or n != expected:
            raise ValueError(
                f"pixel_values {tuple(pixel_values.shape)} do not match grid_thw (expected [{expected}, "
                f"{a.patch_dim}] for grids {grid_thw.tolist()})"
            )
        if meta is None:
            meta = vision_metadata(
                grid_thw, merge_size=a.spatial_merge_size, window_size=a.window_size, patch_size=a.patch_size
            )
        cu, window_index, cu_win, rot_ids = meta
        dev = pixel_values.device
        cu, window_index, cu_win, rot_ids = (x.to(dev) for x in (cu, window_index, cu_win, rot_ids))
        unit = a.spatial_merge_size**2

        def to_windows(x: Tensor) -> Tensor:
            return x.reshape(n // unit, unit, -1)[window_index].reshape(n, -1)

        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))
        x = to_windows(x)
        freqs = to_windows(vision_rotary_freqs(rot_ids, a.head_dim, a.rope_theta))
        lens, wlens = cu[1:] - cu[:-1], cu_win[1:] - cu_win[:-1]
        packed = WindowedPackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=cu, cu_seqlens_kv=cu,
            max_seqlen_q=int(lens.max()), max_seqlen_kv=int(lens.max()),
            cu_seqlens_window=cu_win, max_seqlen_window=int(wlens.max()),
        )
        h = self.decoder(
            hidden_states=x.unsqueeze(1), attention_mask=None, rotary_pos_emb=freqs[:, None, None, :],
            packed_seq_params=packed,
        )
        merged = self.merger(h.squeeze(1))
        reverse = torch.argsort(window_index)
        return merged[reverse]
