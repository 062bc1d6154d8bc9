"""Triton kernels behind ``fused_linear_logprob``: logits tiles h·W^T that never leave registers.

Three kernels share one tile routine (:func:`_logits_tile`, a K-loop of ``tl.dot`` on bf16/fp16 tiles with
an fp32 accumulator, the shape of Triton's matmul tutorial so it pipelines into wgmma on H100):

* ``_fwd_stats_kernel``: one program per [BLOCK_T, BLOCK_V] logits tile; its epilogue reduces the tile to
  per-row partial statistics (max, sum exp(z - max), sum exp(z - max)·z for entropy) written to a
  [num_vocab_blocks, T] buffer, and the target logit (written by the single tile that holds it).
  Only O(T · V / BLOCK_V) floats leave the SM instead of the T x V logits.
* ``_bwd_dlogits_kernel``: recomputes a tile and writes dL/dlogits for one vocab chunk (a T x V_chunk slab,
  the only T x something-large buffer of the whole op, sized by ``KernelConfig.bwd_slab_bytes``).
* ``_mm_acc_kernel``: C_fp32 (+)= A @ B. grad_hidden is the sum of one GEMM per vocab chunk; cuBLAS would
  round each partial to bf16 before we could add it, so the accumulation stays in fp32 here.

Tiles are ordered in groups of GROUP_T row blocks (the tutorial's "super-grouping") so programs resident
at the same time share W tiles in L2: W (V x H, ~1 GB) is the operand that must not be re-read per row
block.

Dot precision (``DOT_MODE``): 0 = native tensor-core dot (bf16/fp16 on GPU); 1 = exact fp32 ("ieee"; TF32
would break the fp32 parity target); 2 = upcast half operands to fp32 first: Triton 3.6's interpreter
returns garbage for bf16 ``tl.dot`` (measured: errors ~1e10), and products of bf16 numbers are exact in
fp32, so this is the same arithmetic as the GPU's bf16 x bf16 -> fp32 MMA.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"
if INTERPRET:
    from . import _interpreter_compat

    _interpreter_compat.apply()

# Smallest BLOCK_V of any forward config: the partial-statistics buffer is sized for it (the autotuner picks
# the config inside the launch, after the buffer must exist); rows a larger block leaves unused stay at
# the neutral (max=-inf, sum=0) they were initialised to.
MIN_BLOCK_V = 64 if INTERPRET else 128


def dot_mode(dtype: torch.dtype) -> int:
    if dtype == torch.float32:
        return 1
    return 2 if INTERPRET else 0


@triton.jit
def _tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_m
    pid_n = (pid % in_group) // group_m
    return pid_m, pid_n


@triton.jit
def _dot(a, b, acc, DOT_MODE: tl.constexpr):
    if DOT_MODE == 0:
        acc = tl.dot(a, b, acc)
    elif DOT_MODE == 1:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return acc


@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, cols, K, stride_h, stride_w,
                 BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                 DOT_MODE: tl.constexpr):
    """acc[BLOCK_T, BLOCK_V] = h[rows, :] @ W[cols, :]^T in fp32. ``rows``/``cols`` are already clamped
    in range, so the main loop runs unmasked; only a K tail (H % BLOCK_K) takes a masked iteration."""
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_h + offs_k[None, :]
    b_ptrs = w_ptr + cols.to(tl.int64)[None, :] * stride_w + offs_k[:, None]
    acc = tl.zeros((BLOCK_T, BLOCK_V), dtype=tl.float32)
    for _ in range(0, K // BLOCK_K):
        acc = _dot(tl.load(a_ptrs), tl.load(b_ptrs), acc, DOT_MODE)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    rem = K % BLOCK_K
    if rem != 0:
        a = tl.load(a_ptrs, mask=offs_k[None, :] < rem, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < rem, other=0.0)
        acc = _dot(a, b, acc, DOT_MODE)
    return acc


@triton.jit
def _fwd_stats_kernel(h_ptr, w_ptr, tgt_ptr, m_ptr, s_ptr, e_ptr, tz_ptr,
                      T, V, K, stride_h, stride_w, inv_temp, tgt_offset, T_BUCKET,
                      WITH_ENT: tl.constexpr, DOT_MODE: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_T: tl.constexpr):
    pid_t, pid_v = _tile_ids(tl.program_id(0), T, V, BLOCK_T, BLOCK_V, GROUP_T)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = offs_t < T
    col_ok = offs_v < V
    z = _logits_tile(h_ptr, w_ptr, offs_t % T, offs_v % V, K, stride_h, stride_w,
                     BLOCK_T, BLOCK_V, BLOCK_K, DOT_MODE) * inv_temp
    z = tl.where(col_ok[None, :], z, float("-inf"))
    m = tl.max(z, axis=1)
    p = tl.exp(z - m[:, None])
    part = pid_v.to(tl.int64) * T + offs_t
    tl.store(m_ptr + part, m, mask=row_ok)
    tl.store(s_ptr + part, tl.sum(p, axis=1), mask=row_ok)
    if WITH_ENT:
        tl.store(e_ptr + part, tl.sum(p * tl.where(col_ok[None, :], z, 0.0), axis=1), mask=row_ok)
    # Target ids are global; tgt_offset = this rank's (and chunk's) first vocab id. A row's target lies in
    # at most one tile of at most one rank, so exactly one program writes each present target logit.
    local = tl.load(tgt_ptr + offs_t, mask=row_ok, other=-1) - tgt_offset
    hit = (offs_v[None, :] == local[:, None]) & col_ok[None, :]
    tz = tl.sum(tl.where(hit, z, 0.0), axis=1)
    has = tl.max(hit.to(tl.int32), axis=1) > 0
    tl.store(tz_ptr + offs_t, tz, mask=row_ok & has)


@triton.jit
def _bwd_dlogits_kernel(h_ptr, w_ptr, tgt_ptr, lse_ptr, glp_ptr, gent_ptr, ebar_ptr, d_ptr,
                        T, V, K, stride_h, stride_w, stride_d, inv_temp, tgt_offset, T_BUCKET,
                        WITH_ENT: tl.constexpr, DOT_MODE: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_T: tl.constexpr):
    """d[t, v] = dL/d(raw logit) = (g_lp (1[v=y] - p) + g_ent p (Ebar - z)) / temperature, where
    z = raw / temperature, p = softmax(z) (via the saved global lse) and Ebar = sum_v p z (entropy = lse - Ebar)."""
    pid_t, pid_v = _tile_ids(tl.program_id(0), T, V, BLOCK_T, BLOCK_V, GROUP_T)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = offs_t < T
    col_ok = offs_v < V
    z = _logits_tile(h_ptr, w_ptr, offs_t % T, offs_v % V, K, stride_h, stride_w,
                     BLOCK_T, BLOCK_V, BLOCK_K, DOT_MODE) * inv_temp
    lse = tl.load(lse_ptr + offs_t, mask=row_ok, other=float("inf"))  # dead rows: p = 0, not inf
    g = tl.load(glp_ptr + offs_t, mask=row_ok, other=0.0)
    p = tl.exp(z - lse[:, None])
    local = tl.load(tgt_ptr + offs_t, mask=row_ok, other=-1) - tgt_offset
    hit = offs_v[None, :] == local[:, None]
    d = tl.where(hit, g[:, None], 0.0) - g[:, None] * p
    if WITH_ENT:
        ge = tl.load(gent_ptr + offs_t, mask=row_ok, other=0.0)
        eb = tl.load(ebar_ptr + offs_t, mask=row_ok, other=0.0)
        d += ge[:, None] * p * (eb[:, None] - z)
    d = d * inv_temp
    ptrs = d_ptr + offs_t.to(tl.int64)[:, None] * stride_d + offs_v[None, :]
    tl.store(ptrs, d.to(d_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _mm_acc_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_a, stride_b, stride_c, M_BUCKET,
                   ACCUMULATE: tl.constexpr, DOT_MODE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   GROUP_M: tl.constexpr):
    """C[M, N] (fp32) = (C +) A[M, K] @ B[K, N]; A and B row-major with unit inner stride."""
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (offs_m % M).to(tl.int64)[:, None] * stride_a + offs_k[None, :]
    b_ptrs = b_ptr + offs_k.to(tl.int64)[:, None] * stride_b + (offs_n % N)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, K // BLOCK_K):
        acc = _dot(tl.load(a_ptrs), tl.load(b_ptrs), acc, DOT_MODE)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_b
    rem = K % BLOCK_K
    if rem != 0:
        a = tl.load(a_ptrs, mask=offs_k[None, :] < rem, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < rem, other=0.0)
        acc = _dot(a, b, acc, DOT_MODE)
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_c + offs_n[None, :]
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=mask, other=0.0)
    tl.store(c_ptrs, acc, mask=mask)


# ---------------------------------------------------------------------------------------------------------
# Launch configurations. CUDA: autotuned per (shape bucket, dtype). Every candidate is one that compiles for
# sm_90a without register spills and within the 227 KB of shared memory per block, which
# benchmarks/sm90_static.py checks for every config at the production shapes (tests/test_sm90_static.py
# keeps it so). The logits kernels carry a softmax / dlogits epilogue on top of the fp32 accumulator, so
# only 64 accumulator registers per thread leave it room (128x128 tiles over 8 warps = two wgmma warp
# groups of m64n128): the 128x256 / 256x128 / 4-warp 128x128 matmul tiles spilled 1.5-4.7 KB per thread.
# The same holds for _mm_acc_kernel once it accumulates into C (its fp32 C tile joins the accumulator):
# 128x256 spilled 136-372 B with ACCUMULATE, whether C was added in the epilogue or loaded as the initial
# accumulator, so it shares the 128x128 candidates. Interpreter: one small config (numpy runs each
# program serially; blocks of 16-32 keep odd test shapes exercising every tail path).
# ---------------------------------------------------------------------------------------------------------


def _cfg(bm, bn, bk, group, warps, stages, names):
    m, n, k, g = names
    return triton.Config({m: bm, n: bn, k: bk, g: group}, num_warps=warps, num_stages=stages)


def _logits_configs(fp32: bool, names=("BLOCK_T", "BLOCK_V", "BLOCK_K", "GROUP_T")):
    if INTERPRET:
        return [_cfg(32, 64, 32, 2, 1, 1, names)]
    if fp32:  # exact fp32 FMA path: correctness/debug dtype, not the performance target
        return [_cfg(64, 128, 32, 8, 4, 3, names), _cfg(128, 128, 32, 8, 8, 3, names)]
    return [
        _cfg(128, 128, 64, 8, 8, 4, names),
        _cfg(128, 128, 64, 16, 8, 4, names),
        _cfg(128, 128, 64, 8, 8, 3, names),
        _cfg(128, 128, 64, 8, 8, 5, names),
    ]


def _tuned(kernel, configs, key, restore=None):
    return triton.autotune(configs=configs, key=key, restore_value=restore)(kernel)


_MM_NAMES = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")
# T only through a power-of-two bucket: packed micro-batches change T every step and must not re-tune.
FWD = {fp32: _tuned(_fwd_stats_kernel, _logits_configs(fp32), ["V", "K", "T_BUCKET"]) for fp32 in (False, True)}
BWD = {fp32: _tuned(_bwd_dlogits_kernel, _logits_configs(fp32), ["V", "K", "T_BUCKET"]) for fp32 in (False, True)}
MM_ACC = {
    fp32: _tuned(_mm_acc_kernel, _logits_configs(fp32, _MM_NAMES), ["N", "K", "M_BUCKET"], restore=["c_ptr"])
    for fp32 in (False, True)
}


def t_bucket(t: int) -> int:
    return min(triton.next_power_of_2(max(t, 1)), 1 << 16)


def fwd_stats(hidden, weight, targets, inv_temp: float, tgt_offset: int, with_ent: bool):
    """Partial statistics of logits/temperature. Returns (m_part, s_part, e_part | None, tz) with
    m_part/s_part/e_part of shape [ceil(V / MIN_BLOCK_V), T] and tz [T] (0 where the target is not local)."""
    T, K = hidden.shape
    V = weight.shape[0]
    nvb = triton.cdiv(V, MIN_BLOCK_V)
    dev = hidden.device
    m_part = torch.full((nvb, T), float("-inf"), device=dev, dtype=torch.float32)
    s_part = torch.zeros((nvb, T), device=dev, dtype=torch.float32)
    e_part = torch.zeros((nvb, T), device=dev, dtype=torch.float32) if with_ent else s_part
    tz = torch.zeros(T, device=dev, dtype=torch.float32)
    fp32 = hidden.dtype == torch.float32

    def grid(meta):
        return (triton.cdiv(T, meta["BLOCK_T"]) * triton.cdiv(V, meta["BLOCK_V"]),)

    FWD[fp32][grid](hidden, weight, targets, m_part, s_part, e_part, tz,
                    T, V, K, hidden.stride(0), weight.stride(0), inv_temp, tgt_offset, t_bucket(T),
                    WITH_ENT=with_ent, DOT_MODE=dot_mode(hidden.dtype))
    return m_part, s_part, (e_part if with_ent else None), tz


def bwd_dlogits(hidden, weight_chunk, targets, lse, g_lp, g_ent, ebar, out, inv_temp: float, tgt_offset: int):
    """Write dL/dlogits for the vocab rows of ``weight_chunk`` into ``out`` ([T, Vc] view, unit col stride)."""
    T, K = hidden.shape
    V = weight_chunk.shape[0]
    with_ent = g_ent is not None
    fp32 = hidden.dtype == torch.float32

    def grid(meta):
        return (triton.cdiv(T, meta["BLOCK_T"]) * triton.cdiv(V, meta["BLOCK_V"]),)

    BWD[fp32][grid](hidden, weight_chunk, targets, lse, g_lp, g_ent if with_ent else g_lp,
                    ebar if with_ent else g_lp, out,
                    T, V, K, hidden.stride(0), weight_chunk.stride(0), out.stride(0), inv_temp, tgt_offset,
                    t_bucket(T), WITH_ENT=with_ent, DOT_MODE=dot_mode(hidden.dtype))


def mm_acc(a, b, c, accumulate: bool) -> None:
    """c (fp32) = (c +) a @ b, accumulating in fp32 across calls."""
    M, K = a.shape
    N = b.shape[1]
    fp32 = a.dtype == torch.float32

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    MM_ACC[fp32][grid](a, b, c, M, N, K, a.stride(0), b.stride(0), c.stride(0), t_bucket(M),
                       ACCUMULATE=accumulate, DOT_MODE=dot_mode(a.dtype))
