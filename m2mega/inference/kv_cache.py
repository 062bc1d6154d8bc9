"""KV storage and rotary tables for the rollout engine (:mod:`m2mega.inference.engine`).

:class:`KVSlab` is one preallocated block per pipeline stage: keys and values ``[layers, slots, kv_heads,
capacity, head_dim]`` in the layout ``scaled_dot_product_attention`` reads (``[batch, heads, seq, dim]`` per
layer), so a decode step reorders nothing; the attention mask ``[slots, capacity]`` (additive: 0 = attend,
-inf = not) lives beside it and is extended by one column per generated token, never rebuilt. A slot holds
one sequence from position 0 (prompts are not padded), so its valid keys are a prefix. Nothing is
reallocated while a rollout batch runs: tensor addresses stay fixed, which is what lets CUDA graphs replay
decode steps.

Invariants the engine relies on: every element of the slab is finite (allocated zeroed, written only with
real keys/values), and every mask row has at least one open column (a free slot attends to its position 0),
so a padded row of a static-shape decode step never produces NaN that could leak into the cache.

megatron-core's ``StaticInferenceContext`` keeps ``[seq, batch, heads, dim]`` buffers, which its attention
reorders every step, and its ``DynamicInferenceContext`` (paged) needs flash-attn and has no multimodal
M-RoPE path; hence this small slab.

:class:`RotaryTable` holds ``cos``/``sin`` of ``position x inv_freq`` for positions ``0..n`` (doubling when a
longer position shows up), so a decode step looks its rows up instead of recomputing rotary embeddings for
the whole sequence. Prompt positions (3-axis M-RoPE) are looked up per axis and combined channel-wise by
``mrope_section``, which equals megatron's ``MultimodalRotaryEmbedding`` followed by ``apply_rotary_pos_emb``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["KVSlab", "RotaryTable"]


class KVSlab:
    """Preallocated keys/values and attention mask of ``slots`` sequences of up to ``capacity`` tokens."""

    def __init__(self, layers: int, slots: int, kv_heads: int, capacity: int, head_dim: int, *,
                 dtype: torch.dtype, device) -> None:
        if min(layers, slots, kv_heads, capacity, head_dim) < 1:
            raise ValueError(f"KVSlab sizes must be >= 1, got layers={layers} slots={slots} kv_heads={kv_heads} "
                             f"capacity={capacity} head_dim={head_dim}")
        shape = (layers, slots, kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # Additive attention bias (0 = attend, -inf = not), the form SDPA adds to the scores: a boolean
        # mask would be converted on every layer's call.
        self.mask = torch.full((slots, capacity), float("-inf"), dtype=dtype, device=device)
        self.mask[:, 0] = 0.0
        self.slots, self.capacity = slots, capacity

    @property
    def nbytes(self) -> int:
        return (self.k.numel() * 2 + self.mask.numel()) * self.k.element_size()

    def data_ptrs(self) -> tuple[int, int, int]:
        """Addresses of the three buffers (tests check they never change while a batch runs)."""
        return self.k.data_ptr(), self.v.data_ptr(), self.mask.data_ptr()

    def load_prefix(self, slots: Tensor, keys: list[Tensor], values: list[Tensor]) -> None:
        """Copy one prompt's keys/values (per layer ``[kv_heads, S, head_dim]``) into each slot of ``slots``
        (a group's members share the prompt's prefill) and set their masks to the prefix."""
        S = keys[0].shape[1]
        if S > self.capacity:
            raise ValueError(f"a prompt of {S} tokens does not fit the KV slab's capacity {self.capacity}")
        n = slots.numel()
        for li, (k, v) in enumerate(zip(keys, values)):
            self.k[li, slots, :, :S] = k.unsqueeze(0).expand(n, -1, -1, -1)
            self.v[li, slots, :, :S] = v.unsqueeze(0).expand(n, -1, -1, -1)
        self.mask[slots] = float("-inf")
        self.mask[slots, :S] = 0.0

    def move(self, src: int, dst: int, length: int) -> None:
        """Slot ``src``'s first ``length`` positions -> slot ``dst`` (keeps the live slots a prefix 0..n-1)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]
        self.mask[dst] = self.mask[src]

    def release(self, slot: int) -> None:
        self.mask[slot] = float("-inf")
        self.mask[slot, 0] = 0.0

    def attend(self, rows: Tensor, positions: Tensor) -> None:
        """Open column ``positions[i]`` of slot ``rows[i]`` (the token written there this step)."""
        self.mask[rows, positions] = 0.0


class RotaryTable:
    """``cos``/``sin`` ``[n, head_dim]`` of positions ``0..n-1`` (megatron's non-interleaved layout: the
    frequencies repeated twice; ``sin`` stored as ``[-sin, sin]`` so rotate-half is a roll), grown by
    doubling. ``inv_freq`` is the model's own tensor, so ``position * inv_freq`` is bit-identical to
    megatron's."""

    def __init__(self, inv_freq: Tensor, mrope_section, *, dtype: torch.dtype, device, initial: int = 1024) -> None:
        self.inv_freq = inv_freq.detach().to(device=device, dtype=torch.float32)
        self.dtype, self.device = dtype, device
        half = self.inv_freq.numel()
        sec = [int(s) for s in mrope_section] if mrope_section else [half]
        if sum(sec) != half:
            raise ValueError(f"mrope_section {sec} does not add up to head_dim/2 = {half}")
        # Channel c of the [freqs, freqs] layout takes its position from axis axis_of[c] (megatron's
        # ``emb.split(mrope_section * 2)`` with chunk i using axis i % 3).
        axis = []
        for i, s in enumerate(sec * 2):
            axis += [i % len(sec)] * s
        self.axis_of = torch.tensor(axis, dtype=torch.long, device=device)
        self.cos = self.sin = torch.empty(0, 2 * half, dtype=dtype, device=device)
        self.ensure(initial)

    def ensure(self, n: int) -> None:
        """Make positions ``0..n-1`` available (amortised: the table at least doubles)."""
        have = self.cos.shape[0]
        if n <= have:
            return
        size = max(n, 2 * have, 64)
        pos = torch.arange(size, device=self.device, dtype=torch.float32)
        freqs = pos[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos = torch.cos(emb).to(self.dtype)
        sin = torch.sin(emb)
        self.sin = torch.cat([-sin[:, : freqs.shape[1]], sin[:, freqs.shape[1]:]], dim=-1).to(self.dtype)

    def lookup(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Positions ``[n]`` (the same on every M-RoPE axis: text and generated tokens) -> ``cos``/``sin``
        ``[n, 1, 1, D]`` (broadcast over KV groups and the heads of a group)."""
        return self.cos[positions][:, None, None], self.sin[positions][:, None, None]

    def lookup_3d(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """M-RoPE positions ``[3, n]`` -> ``cos``/``sin`` ``[n, 1, 1, D]`` with each channel from its axis."""
        self.ensure(int(positions.max()) + 1 if positions.numel() else 1)
        n = positions.shape[1]
        idx = positions.t().gather(1, self.axis_of[None, :].expand(n, -1))  # [n, D]: position per channel
        cols = torch.arange(idx.shape[1], device=idx.device)[None, :]
        return self.cos[idx, cols][:, None, None], self.sin[idx, cols][:, None, None]
