"""Cascade attention for group decoding: each prompt's keys/values stored once, attended once per group.

The G samples of a GRPO group share their prompt. :class:`~m2mega.inference.kv_cache.KVSlab` copies the
prompt's keys/values into every member's slot, and a decode step then reads them G times, each slot with
its own tiny attention matmul (on CPU at 2 query heads per KV head those matmuls cost far more than their
arithmetic). :class:`CascadeKV` keeps instead

- one **prefix block** per distinct prompt being decoded: ``pk``/``pv`` ``[layers, blocks, kv_heads,
  prefix_cap, head_dim]`` with an additive bias ``pbias [blocks, prefix_cap]`` closing the padding;
- one **suffix** per slot for the tokens it generates: ``sk``/``sv`` ``[layers, slots, kv_heads, suffix_cap,
  head_dim]`` with the running mask ``mask [slots, suffix_cap]`` (0 = attend, -inf = not);

and :func:`cascade_attention` attends a step's queries to both: the queries of a block's members are
gathered into one matrix per (block, KV head) and multiplied with the prefix once (``M = members x query
heads per KV head`` rows instead of G separate ones), the suffix is attended per slot, and the two partial
softmaxes are merged exactly by their log-sum-exp (``o = (o1 e^(m1-m) + o2 e^(m2-m)) / (l1 e^(m1-m) + l2
e^(m2-m))``, FlashInfer's cascade / "merge states"). Equal to attention over the concatenated sequence up
to fp32 rounding (tests/test_cascade.py).

It offers the slab's interface (``load_prefix``, ``move``, ``release``, ``attend``), so the engine's
scheduling does not change; positions passed in are full-sequence cache positions (prompt + generated).
The engine uses it for the CPU decode (:class:`~m2mega.inference.stage.LMStage` ``matmul_attention``); the
CUDA path keeps the slab that its captured graphs replay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["CascadeKV", "CascadePlan", "cascade_attention", "use_cascade"]


@dataclass
class CascadePlan:
    """How the ``n`` live rows of one decode step map onto the prefix blocks (built once per step).

    ``gather [nb * members]``: the row of member j of active block b at ``b * members + j`` (padding: row
    0, its results discarded); ``back [n]``: each row's index in that layout; ``blocks``: the active blocks
    (a ``slice`` when contiguous, else an index tensor); ``prefix_len``: columns of the prefix read;
    ``suffix_len``: columns of the suffix read; ``where``: flat row of each (row, KV head) new key in a
    layer's suffix viewed as ``[slots * kv_heads * suffix_cap, head_dim]``."""

    gather: Tensor
    back: Tensor
    nb: int
    members: int
    blocks: object
    prefix_len: int
    suffix_len: int
    where: Tensor


class CascadeKV:
    """Prefix blocks shared by a group's slots plus per-slot suffixes (see the module docstring)."""

    def __init__(self, layers: int, slots: int, blocks: int, kv_heads: int, prefix_cap: int, suffix_cap: int,
                 head_dim: int, *, dtype: torch.dtype, device) -> None:
        if min(layers, slots, blocks, kv_heads, prefix_cap, suffix_cap, head_dim) < 1:
            raise ValueError(f"CascadeKV sizes must be >= 1, got layers={layers} slots={slots} blocks={blocks} "
                             f"kv_heads={kv_heads} prefix_cap={prefix_cap} suffix_cap={suffix_cap} "
                             f"head_dim={head_dim}")
        self.pk = torch.zeros(layers, blocks, kv_heads, prefix_cap, head_dim, dtype=dtype, device=device)
        self.pv = torch.zeros_like(self.pk)
        self.pbias = torch.full((blocks, prefix_cap), float("-inf"), dtype=dtype, device=device)
        self.pbias[:, 0] = 0.0  # every row keeps an open column: nothing non-finite, even in padding
        self.sk = torch.zeros(layers, slots, kv_heads, suffix_cap, head_dim, dtype=dtype, device=device)
        self.sv = torch.zeros_like(self.sk)
        self.mask = torch.full((slots, suffix_cap), float("-inf"), dtype=dtype, device=device)
        self.plen = torch.zeros(slots, dtype=torch.long, device=device)  # prefix length of each slot
        self.slots, self.blocks, self.prefix_cap, self.suffix_cap = slots, blocks, prefix_cap, suffix_cap
        self.capacity = prefix_cap + suffix_cap
        self._blen = [0] * blocks
        self._plan_base = None
        # slot -> block (-1: free), references per block, the prefix tensor each block was loaded from
        # (matched by identity: the rest of a group admitted later reuses its block)
        self._block_of: list[int] = []
        self._refs: list[int] = []
        self._owner: list = []
        self._plan_key = None
        self.reset()

    def reset(self) -> None:
        """Every slot free and every block unowned (the engine calls this when it reuses the cache for a new
        call, so a call that ended in an error leaves nothing behind)."""
        self._block_of = [-1] * self.slots
        self._refs = [0] * self.blocks
        self._owner = [None] * self.blocks
        self.mask.fill_(float("-inf"))
        self._plan_key = None

    def fits(self, slots: int, blocks: int, prefix_cap: int, suffix_cap: int) -> bool:
        return (slots <= self.slots and blocks <= self.blocks and prefix_cap <= self.prefix_cap
                and suffix_cap <= self.suffix_cap)

    @property
    def nbytes(self) -> int:
        return (self.pk.numel() * 2 + self.sk.numel() * 2 + self.mask.numel() + self.pbias.numel()) \
            * self.pk.element_size()

    def data_ptrs(self) -> tuple[int, ...]:
        return self.pk.data_ptr(), self.pv.data_ptr(), self.sk.data_ptr(), self.sv.data_ptr(), self.mask.data_ptr()

    # ------------------------------------------------------------------ slab interface
    def load_prefix(self, slots: Tensor, keys: list[Tensor], values: list[Tensor]) -> None:
        """Give ``slots`` (free) the prompt whose per-layer keys/values ``[kv_heads, S, head_dim]`` these
        are: stored once per prompt (a later call with the same tensors, the rest of the group, reuses the
        block), each slot's suffix empty."""
        S = keys[0].shape[1]
        if S > self.prefix_cap:
            raise ValueError(f"a prompt of {S} tokens does not fit the cascade cache's prefix capacity "
                             f"{self.prefix_cap}")
        b = next((i for i in range(self.blocks) if self._refs[i] and self._owner[i] is keys[0]), None)
        if b is None:
            b = self._refs.index(0) if 0 in self._refs else None
            if b is None:
                raise RuntimeError(f"cascade cache: all {self.blocks} prefix blocks in use")
            for li, (k, v) in enumerate(zip(keys, values)):
                self.pk[li, b, :, :S] = k
                self.pv[li, b, :, :S] = v
            self.pbias[b] = float("-inf")
            self.pbias[b, :S] = 0.0
            self._owner[b], self._blen[b] = keys[0], S
        for s in slots.tolist():
            self._assign(s, b)
            self.mask[s] = float("-inf")
        self.plen[slots] = S
        self._plan_key = None

    def move(self, src: int, dst: int, length: int) -> None:
        """Slot ``src`` (``length`` positions, prefix included) -> slot ``dst``."""
        n = length - int(self.plen[src])
        self.sk[:, dst, :, :n] = self.sk[:, src, :, :n]
        self.sv[:, dst, :, :n] = self.sv[:, src, :, :n]
        self.mask[dst] = self.mask[src]
        self.plen[dst] = self.plen[src]
        self._assign(dst, self._block_of[src])
        self._plan_key = None

    def release(self, slot: int) -> None:
        self._assign(slot, -1)
        self.mask[slot] = float("-inf")
        self._plan_key = None

    def attend(self, rows: Tensor, positions: Tensor) -> None:
        """Open cache position ``positions[i]`` (full-sequence) of slot ``rows[i]``."""
        self.mask[rows, positions - self.plen[rows]] = 0.0

    def _assign(self, slot: int, block: int) -> None:
        old = self._block_of[slot]
        if old >= 0:
            self._refs[old] -= 1
            if self._refs[old] == 0:
                self._owner[old] = None  # the prompt's tensors may be freed; never match them again
        self._block_of[slot] = block
        if block >= 0:
            self._refs[block] += 1

    # ------------------------------------------------------------------ decode
    def plan(self, cache_pos: Tensor) -> CascadePlan:
        """The plan of a step over rows ``0..n-1`` writing at full-sequence positions ``cache_pos [n]``."""
        n = cache_pos.numel()
        dev = cache_pos.device
        key = n
        if self._plan_key != key:  # the row -> block map changes only on admission and finish
            blk = self._block_of[:n]
            if min(blk) < 0:
                raise RuntimeError("cascade cache: a decoded row has no prompt loaded")
            active = sorted(set(blk))
            rows_of = {b: [] for b in active}
            for r, b in enumerate(blk):
                rows_of[b].append(r)
            m = max(len(v) for v in rows_of.values())
            gather, back = [], [0] * n
            for bi, b in enumerate(active):
                rs = rows_of[b]
                for j, r in enumerate(rs):
                    back[r] = bi * m + j
                gather += rs + [rs[0]] * (m - len(rs))
            lo = active[0]
            blocks = slice(lo, lo + len(active)) if active == list(range(lo, lo + len(active))) else \
                torch.tensor(active, dtype=torch.long, device=dev)
            self._plan_base = (torch.tensor(gather, dtype=torch.long, device=dev),
                               torch.tensor(back, dtype=torch.long, device=dev), len(active), m, blocks,
                               max(self._blen[b] for b in active))
            self._plan_key = key
        gather, back, nb, m, blocks, plen = self._plan_base
        col = cache_pos - self.plen[:n]
        g = self.pk.shape[2]
        rows = torch.arange(n * g, device=dev).view(n, g)
        where = (rows * self.suffix_cap + col[:, None]).view(-1)
        return CascadePlan(gather, back, nb, m, blocks, plen, int(col.max()) + 1, where)

    def attention(self, li: int, q: Tensor, k: Tensor, v: Tensor, plan: CascadePlan, scale: float) -> Tensor:
        """Layer ``li``: write the step's keys/values ``[n, g, d]`` into the suffixes, then attend queries
        ``q [n, g, qpg, d]``; returns ``[n, g, qpg, d]``."""
        n, g, _, d = q.shape
        sk, sv = self.sk[li], self.sv[li]
        sk.view(-1, d).index_copy_(0, plan.where, k.reshape(n * g, d))
        sv.view(-1, d).index_copy_(0, plan.where, v.reshape(n * g, d))
        P, T = plan.prefix_len, plan.suffix_len
        pk, pv, pb = self.pk[li, plan.blocks, :, :P], self.pv[li, plan.blocks, :, :P], self.pbias[plan.blocks, :P]
        return cascade_attention(q, pk, pv, pb, sk[:n, :, :T], sv[:n, :, :T], self.mask[:n, :T], plan.gather,
                                 plan.back, plan.members, scale)


def cascade_attention(q: Tensor, pk: Tensor, pv: Tensor, pbias: Tensor, sk: Tensor, sv: Tensor, smask: Tensor,
                      gather: Tensor, back: Tensor, members: int, scale: float) -> Tensor:
    """Attention of ``q [n, g, qpg, d]`` (``g`` KV heads, ``qpg`` query heads each) over each row's shared
    prefix then its own suffix. Prefixes ``pk``/``pv [nb, g, P, d]`` with additive ``pbias [nb, P]``;
    row ``r``'s prefix is block ``back[r] // members``, and ``gather [nb * members]`` lists the rows of
    each block (padded with any row). Suffixes ``sk``/``sv [n, g, T, d]`` with additive ``smask [n, T]``.
    Every row needs an open column in its prefix (the softmax of a fully masked part would be NaN)."""
    n, g, qpg, d = q.shape
    nb, m = pk.shape[0], members
    # Prefix: one [m * qpg, d] x [d, P] product per (block, KV head) instead of m products of qpg rows.
    qp = q.index_select(0, gather).view(nb, m, g, qpg, d).transpose(1, 2).reshape(nb, g, m * qpg, d)
    s1 = torch.matmul(qp, pk.transpose(-1, -2)).mul_(scale).add_(pbias[:, None, None, :])
    m1 = s1.amax(-1, keepdim=True)
    e1 = s1.sub_(m1).exp_()
    l1 = e1.sum(-1, keepdim=True)
    o1 = torch.cat([torch.matmul(e1, pv), m1, l1], -1)  # [nb, g, m * qpg, d + 2]: one scatter back for all three
    o1 = o1.view(nb, g, m, qpg, d + 2).transpose(1, 2).reshape(nb * m, g, qpg, d + 2).index_select(0, back)
    o1, m1, l1 = o1[..., :d], o1[..., d:d + 1], o1[..., d + 1:]
    # Suffix: each row's own generated tokens.
    s2 = torch.matmul(q, sk.transpose(-1, -2)).mul_(scale).add_(smask[:, None, None, :])
    m2 = s2.amax(-1, keepdim=True)
    e2 = s2.sub_(m2).exp_()
    l2 = e2.sum(-1, keepdim=True)
    o2 = torch.matmul(e2, sv)
    # Merge the two partial softmaxes by their maxima (log-sum-exp): exact up to rounding.
    mx = torch.maximum(m1, m2)
    a1, a2 = (m1 - mx).exp_(), (m2 - mx).exp_()
    return (o1 * a1).add_(o2 * a2).div_((l1 * a1).add_(l2 * a2))


def use_cascade(setting: str, matmul_attention: bool, prompt_lens: Sequence[int], samples: Sequence[int],
                fused_decode: bool = False) -> bool:
    """Whether a call decodes with cascade attention (:mod:`~m2mega.inference.cascade`: each prompt's keys
    read once per group). ``auto``: on the CPU decode when groups share prompts (some request has >= 2
    samples) and the prompts average >= ``CASCADE_MIN_PROMPT`` tokens (``CASCADE_MIN_PROMPT_FUSED`` when
    the slab would be decoded by the fused kernel): below that its extra ops cost more than re-reading the
    prompt. Measured against the torch slab path (one decode step of the bench's 4-layer model, 32 rows of
    4 prompts, 24 tokens generated, 1 thread, min of 150): 0.97x at prompts of 26-61 tokens (the bench's),
    1.08x at 100-190, 1.17x at 170-260, 1.48x at 400-600. Against the fused slab decode (bench_rollout,
    2 threads, per decode step, greedy / sampled): 0.70x / 0.67x at 400-600, 1.17x / 0.94x at 1500-2000."""
    if setting == "off" or not matmul_attention:
        return False
    least = CASCADE_MIN_PROMPT_FUSED if fused_decode else CASCADE_MIN_PROMPT
    return setting == "on" or (max(samples) > 1 and sum(prompt_lens) / len(prompt_lens) >= least)


CASCADE_MIN_PROMPT = 128
CASCADE_MIN_PROMPT_FUSED = 2048
