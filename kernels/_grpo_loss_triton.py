"""Triton kernels behind ``fused_grpo_loss``: one program per sequence, one pass over its tokens.

Forward writes per-sequence sums of everything the loss and the logged metrics need (see ``STATS``), so
both aggregations (token-mean and sequence-mean) and every metric are O(B) torch ops afterwards, with no
second pass over tokens and no atomics (results are deterministic). Backward recomputes the per-token
branch decisions (ratio, clip, dual-clip) from the same inputs and writes d loss / d logp in one pass.
Sequences are (start, length) segments of the flattened token axis, which covers padded [B, L] batches
and packed THD batches (cu_seqlens) with one kernel.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

if os.environ.get("TRITON_INTERPRET", "") == "1":
    from . import _interpreter_compat

    _interpreter_compat.apply()

# Per-sequence statistics, in column order of the [B, NSTAT] buffer (all sums over tokens with mask > 0,
# weighted by the mask value).
STATS = ("mask", "pg", "kl", "clip", "clip_low", "clip_high", "dual_clip", "ratio", "approx_kl")
NSTAT = len(STATS)
BLOCK = 64 if os.environ.get("TRITON_INTERPRET", "") == "1" else 1024


@triton.jit
def _token_terms(lp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, idx, ok, a_seq,
                 clip_lo, clip_hi, dual_c,
                 HAS_REF: tl.constexpr, ADV_TOKEN: tl.constexpr, HAS_DUAL: tl.constexpr):
    mk = tl.load(mask_ptr + idx, mask=ok, other=0).to(tl.float32)
    valid = mk > 0
    # Masked-out tokens may hold garbage (padding, -inf): never let them reach exp().
    x = tl.load(lp_ptr + idx, mask=valid, other=0.0).to(tl.float32)
    o = tl.load(old_ptr + idx, mask=valid, other=0.0).to(tl.float32)
    if ADV_TOKEN:
        a = tl.load(adv_ptr + idx, mask=valid, other=0.0).to(tl.float32) * a_seq
    else:
        a = tl.zeros_like(x) + a_seq
    log_r = x - o
    r = tl.exp(log_r)
    pg1 = -a * r
    pg2 = -a * tl.minimum(tl.maximum(r, 1.0 - clip_lo), 1.0 + clip_hi)
    clipped = pg2 > pg1
    pg = tl.maximum(pg1, pg2)
    dual = tl.zeros_like(x) > 1.0  # all False; a real tensor so both HAS_DUAL branches type-check
    if HAS_DUAL:
        pg3 = -a * dual_c
        dual = (a < 0) & (pg > pg3)
        pg = tl.where(dual, pg3, pg)
    if HAS_REF:
        d = tl.load(ref_ptr + idx, mask=valid, other=0.0).to(tl.float32) - x
        ed = tl.exp(d)
        kl = ed - d - 1.0
    else:
        ed = tl.zeros_like(x)
        kl = tl.zeros_like(x)
    return mk, valid, x, r, log_r, a, pg, kl, ed, clipped, dual


@triton.jit
def _grpo_fwd_kernel(lp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, w_ptr, starts_ptr, lens_ptr, stats_ptr,
                     clip_lo, clip_hi, dual_c,
                     HAS_REF: tl.constexpr, ADV_TOKEN: tl.constexpr, HAS_W: tl.constexpr,
                     HAS_DUAL: tl.constexpr, NSTAT: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    start = tl.load(starts_ptr + b)
    n = tl.load(lens_ptr + b)
    a_seq = 1.0
    if not ADV_TOKEN:
        a_seq = tl.load(adv_ptr + b).to(tl.float32)
    if HAS_W:
        a_seq = a_seq * tl.load(w_ptr + b).to(tl.float32)
    s_mask = tl.zeros((BLOCK,), tl.float32)
    s_pg = tl.zeros((BLOCK,), tl.float32)
    s_kl = tl.zeros((BLOCK,), tl.float32)
    s_clip = tl.zeros((BLOCK,), tl.float32)
    s_lo = tl.zeros((BLOCK,), tl.float32)
    s_hi = tl.zeros((BLOCK,), tl.float32)
    s_dual = tl.zeros((BLOCK,), tl.float32)
    s_ratio = tl.zeros((BLOCK,), tl.float32)
    s_akl = tl.zeros((BLOCK,), tl.float32)
    for off in range(0, n, BLOCK):
        j = off + tl.arange(0, BLOCK)
        ok = j < n
        idx = start + j
        mk, valid, x, r, log_r, a, pg, kl, ed, clipped, dual = _token_terms(
            lp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, idx, ok, a_seq, clip_lo, clip_hi, dual_c,
            HAS_REF, ADV_TOKEN, HAS_DUAL)
        zero = tl.zeros_like(x)
        s_mask += tl.where(valid, mk, zero)
        s_pg += tl.where(valid, mk * pg, zero)
        s_kl += tl.where(valid, mk * kl, zero)
        s_clip += tl.where(valid & clipped, mk, zero)
        s_lo += tl.where(valid & clipped & (r < 1.0 - clip_lo), mk, zero)
        s_hi += tl.where(valid & clipped & (r > 1.0 + clip_hi), mk, zero)
        s_dual += tl.where(valid & dual, mk, zero)
        s_ratio += tl.where(valid, mk * r, zero)
        s_akl += tl.where(valid, mk * (r - 1.0 - log_r), zero)
    out = stats_ptr + b.to(tl.int64) * NSTAT
    tl.store(out + 0, tl.sum(s_mask, 0))
    tl.store(out + 1, tl.sum(s_pg, 0))
    tl.store(out + 2, tl.sum(s_kl, 0))
    tl.store(out + 3, tl.sum(s_clip, 0))
    tl.store(out + 4, tl.sum(s_lo, 0))
    tl.store(out + 5, tl.sum(s_hi, 0))
    tl.store(out + 6, tl.sum(s_dual, 0))
    tl.store(out + 7, tl.sum(s_ratio, 0))
    tl.store(out + 8, tl.sum(s_akl, 0))


@triton.jit
def _grpo_bwd_kernel(lp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, w_ptr, starts_ptr, lens_ptr,
                     scale_ptr, gout_ptr, grad_ptr, clip_lo, clip_hi, dual_c, beta,
                     HAS_REF: tl.constexpr, ADV_TOKEN: tl.constexpr, HAS_W: tl.constexpr,
                     HAS_DUAL: tl.constexpr, KL_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """grad[t] = gout * scale[seq(t)] * mask[t] * (d pg/d logp + beta * d k3/d logp), where the surrogate
    passes -A·ratio only where the unclipped branch is the active one (clip and dual clip are constants)."""
    b = tl.program_id(0)
    start = tl.load(starts_ptr + b)
    n = tl.load(lens_ptr + b)
    a_seq = 1.0
    if not ADV_TOKEN:
        a_seq = tl.load(adv_ptr + b).to(tl.float32)
    if HAS_W:
        a_seq = a_seq * tl.load(w_ptr + b).to(tl.float32)
    scale = tl.load(scale_ptr + b) * tl.load(gout_ptr).to(tl.float32)
    for off in range(0, n, BLOCK):
        j = off + tl.arange(0, BLOCK)
        ok = j < n
        idx = start + j
        mk, valid, x, r, log_r, a, pg, kl, ed, clipped, dual = _token_terms(
            lp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, idx, ok, a_seq, clip_lo, clip_hi, dual_c,
            HAS_REF, ADV_TOKEN, HAS_DUAL)
        g = tl.where(clipped | dual, 0.0, -a * r)
        if KL_GRAD:  # only when beta != 0: 0 * (1 - inf) would poison the gradient with nan
            g += beta * (1.0 - ed)
        g = tl.where(valid, mk * scale * g, 0.0)
        tl.store(grad_ptr + idx, g.to(grad_ptr.dtype.element_ty), mask=ok)
