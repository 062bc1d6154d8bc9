"""Per-token log-probs (and entropy) of the sampled tokens under a vocab-parallel output layer, without
materialising the T x V logits.

    logprob[t] = z[t, y_t] - logsumexp_v z[t, v],   z = (h · W^T) / temperature
    entropy[t] = logsumexp_v z[t, v] - sum_v softmax(z[t])_v z[t, v]

**Tensor parallelism** (megatron's vocab-parallel output layer): rank r of ``tp_group`` holds vocab rows
[r·V_local, (r+1)·V_local) of W and the *same* hidden states; targets are global ids. The forward reduces
the row max (MAX), then sum-exp, the entropy's sum p·z and the target logit (SUM) across the group, exactly
like megatron's ``vocab_parallel_cross_entropy``, so every rank returns the full logprob[T].

Gradient convention: this op is ``copy_to_tensor_model_parallel_region`` + ``ColumnParallelLinear``
(no bias, ``gather_output=False``) + the vocab-parallel softmax, fused. Hence each rank's grad_weight is
the gradient of its own vocab shard, and each rank's partial grad_hidden (its shard's dlogits @ W_local) is
all-reduced over the TP group so every rank gets the full grad_hidden, as megatron's copy-to-region
backward does. With sequence parallelism the caller gathers the hidden states itself
(``gather_from_sequence_parallel_region``, whose backward reduce-scatters); pass
``reduce_grad_hidden=False`` then, or the reduction would be applied twice.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from . import _linear_logprob_triton as tk
from .config import get_kernel_config, triton_runs_on

__all__ = ["fused_linear_logprob", "linear_logprob_torch", "LinearLogprobFunction"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _tp_info(tp_group) -> tuple[int, int]:
    if tp_group is None:
        return 0, 1
    return dist.get_rank(tp_group), dist.get_world_size(tp_group)


def _check(hidden, weight, targets, temperature, tp_size, ignore_index, check_values: bool,
           dtypes=_DTYPES) -> None:
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"hidden must be [T, H] and weight [V_local, H]; got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)} (flatten [B, L, H] to [B*L, H] first)")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden size mismatch: hidden is [T, {hidden.shape[1]}], weight is "
                         f"[V_local, {weight.shape[1]}]")
    if targets.dim() != 1 or targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"targets must be [T] = [{hidden.shape[0]}], got {tuple(targets.shape)}")
    if hidden.dtype not in dtypes or weight.dtype != hidden.dtype:
        raise TypeError(f"hidden and weight must share one of {dtypes}; got {hidden.dtype} and {weight.dtype}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be int64 or int32, got {targets.dtype}")
    if hidden.device != weight.device or targets.device != hidden.device:
        raise ValueError(f"devices differ: hidden {hidden.device}, weight {weight.device}, targets {targets.device}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if check_values and targets.numel():
        v_global = weight.shape[0] * tp_size
        bad = ((targets < 0) | (targets >= v_global)) & (targets != ignore_index)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"targets[{i}] = {int(targets[i])} is outside the vocabulary [0, {v_global}) "
                             f"(V_local={weight.shape[0]} x tp={tp_size}) and is not ignore_index={ignore_index}")


# ------------------------------------------------------------------------------------------------ torch counterpart


def linear_logprob_torch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    tp_group: dist.ProcessGroup | None = None,
    return_entropy: bool = False,
    ignore_index: int = -100,
    reduce_grad_hidden: bool = True,
    vocab_start: int | None = None,
):
    """Plain-torch counterpart (autograd through torch ops). Materialises the [T, V_local] logits in the input
    dtype, as eager training code does, then works in fp32 (in fp64 for fp64 inputs: gradient checks).
    TP=1 is the usual ``log_softmax(...).gather`` (the benchmark's "eager" baseline); TP>1 is megatron's
    vocab-parallel cross entropy written with megatron-core's own region mappings, so it has the same
    gradient convention as the fused op."""
    rank, tp = _tp_info(tp_group)
    _check(hidden, weight, targets, temperature, tp, ignore_index, False, _DTYPES + (torch.float64,))
    V = weight.shape[0]
    wide = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    ignored = targets == ignore_index
    if tp == 1:
        logsm = torch.log_softmax((hidden @ weight.t()).to(wide) / temperature, dim=-1)
        logprob = torch.where(ignored, 0.0, logsm.gather(1, targets.long().clamp(0, V - 1)[:, None]).squeeze(1))
        return (logprob, -(logsm.exp() * logsm).sum(dim=-1)) if return_entropy else logprob

    from megatron.core.tensor_parallel.mappings import (
        copy_to_tensor_model_parallel_region,
        reduce_from_tensor_model_parallel_region,
    )

    def reduce(x):  # forward all-reduce, backward identity (the loss is replicated on every TP rank)
        return reduce_from_tensor_model_parallel_region(x, group=tp_group)

    if reduce_grad_hidden:  # forward identity, backward all-reduce of grad_hidden
        hidden = copy_to_tensor_model_parallel_region(hidden, group=tp_group)
    logits = (hidden @ weight.t()).to(wide) / temperature
    m = logits.detach().amax(dim=-1)
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)
    x = logits - m[:, None]
    ex = x.exp()
    sumexp = reduce(ex.sum(dim=-1))
    local = targets.long() - (rank * V if vocab_start is None else vocab_start)
    present = (local >= 0) & (local < V)
    tz = reduce(torch.where(present, x.gather(1, local.clamp(0, V - 1)[:, None]).squeeze(1), 0.0))
    lse_shifted = sumexp.log()
    logprob = torch.where(ignored, 0.0, tz - lse_shifted)
    if not return_entropy:
        return logprob
    entropy = lse_shifted - reduce((ex * x).sum(dim=-1)) / sumexp
    return logprob, entropy


# ------------------------------------------------------------------------------------------------ fused


def _vocab_chunks(V: int, T: int, itemsize: int, cfg) -> list[tuple[int, int]]:
    if cfg.bwd_vocab_chunk is not None:
        width = cfg.bwd_vocab_chunk
    else:
        width = max(256, cfg.bwd_slab_bytes // max(1, T * itemsize))
    n = max(1, -(-V // width))
    width = -(-V // n)
    mult = 256 if width > 256 else 16  # GEMM-friendly widths; the last chunk takes the rest
    width = -(-width // mult) * mult
    return [(v0, min(V, v0 + width)) for v0 in range(0, V, width)]


class LinearLogprobFunction(torch.autograd.Function):
    """autograd wrapper: forward = fused stats kernel + TP reductions; backward recomputes logits chunks."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, tp_group, with_ent, ignore_index, reduce_grad_hidden,
                vocab_start):
        rank, tp = _tp_info(tp_group)
        inv_temp = 1.0 / float(temperature)
        m_part, s_part, e_part, tz = tk.fwd_stats(hidden, weight, targets, inv_temp, vocab_start, with_ent)
        # Combine the per-tile partials (online-softmax merge), then across TP ranks.
        m = m_part.amax(dim=0)
        scale = torch.exp(m_part - m)
        s = (s_part * scale).sum(dim=0)
        e = (e_part * scale).sum(dim=0) if with_ent else None
        del scale, m_part, s_part, e_part
        if tp > 1:
            m_glob = m.clone()
            dist.all_reduce(m_glob, op=dist.ReduceOp.MAX, group=tp_group)
            r = torch.exp(m - m_glob)
            buf = torch.stack([s * r, tz] + ([e * r] if with_ent else []))
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=tp_group)
            s, tz = buf[0], buf[1]
            e = buf[2] if with_ent else None
            m = m_glob
        lse = m + torch.log(s)
        ignored = targets == ignore_index
        logprob = torch.where(ignored, 0.0, tz - lse)
        ebar = e / s if with_ent else None
        ctx.save_for_backward(hidden, weight, targets, lse, ignored, ebar if with_ent else lse)
        ctx.meta = (inv_temp, tp_group, rank, tp, with_ent, reduce_grad_hidden, vocab_start)
        if with_ent:
            return logprob, lse - ebar
        return logprob

    @staticmethod
    def backward(ctx, *grads):
        hidden, weight, targets, lse, ignored, ebar = ctx.saved_tensors
        inv_temp, tp_group, rank, tp, with_ent, reduce_grad_hidden, vocab_start = ctx.meta
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g_lp = grads[0]
        g_ent = grads[1] if with_ent else None
        if (not need_h and not need_w) or (g_lp is None and g_ent is None):
            return (None,) * 9
        T, H = hidden.shape
        V = weight.shape[0]
        g_lp = torch.zeros(T, device=hidden.device) if g_lp is None else g_lp.float()
        g_lp = torch.where(ignored, 0.0, g_lp).contiguous()
        if with_ent:
            g_ent = torch.zeros(T, device=hidden.device) if g_ent is None else g_ent.float().contiguous()
        cfg = get_kernel_config()
        chunks = _vocab_chunks(V, T, hidden.element_size(), cfg)
        slab = torch.empty((T, max(v1 - v0 for v0, v1 in chunks)), device=hidden.device, dtype=hidden.dtype)
        grad_w = torch.empty_like(weight) if need_w else None
        grad_h = torch.empty((T, H), device=hidden.device, dtype=torch.float32) if need_h else None
        for i, (v0, v1) in enumerate(chunks):
            w_c = weight[v0:v1]
            d = slab[:, : v1 - v0]
            tk.bwd_dlogits(hidden, w_c, targets, lse, g_lp, g_ent, ebar, d, inv_temp, vocab_start + v0)
            if need_w:
                # One GEMM over all T per chunk: each grad_W row is reduced in the GEMM's fp32 accumulator
                # and rounded once.
                torch.mm(d.t(), hidden, out=grad_w[v0:v1])
            if need_h:
                tk.mm_acc(d, w_c, grad_h, accumulate=i > 0)
        if need_h:
            if tp > 1 and reduce_grad_hidden:
                dist.all_reduce(grad_h, op=dist.ReduceOp.SUM, group=tp_group)
            grad_h = grad_h.to(hidden.dtype)
        return grad_h, grad_w, None, None, None, None, None, None, None


def fused_linear_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    tp_group: dist.ProcessGroup | None = None,
    return_entropy: bool = False,
    use_torch: bool = False,
    *,
    ignore_index: int = -100,
    reduce_grad_hidden: bool = True,
    vocab_size: int | None = None,
):
    """log softmax((hidden @ weight^T) / temperature)[t, targets[t]] as fp32 [T], and optionally the entropy
    of that distribution (fp32 [T]), without storing T x V.

    hidden [T, H] and weight [V_local, H] share a dtype (fp32, bf16 or fp16); targets [T] are *global*
    vocab ids (int64/int32). Rows whose target equals ``ignore_index`` get logprob 0 and no gradient through
    it (their entropy is still computed). ``tp_group``: the tensor-parallel group the vocab is split over
    (None: no split). ``use_torch`` (or ``KernelConfig.use_torch``) runs the torch counterpart.

    ``vocab_size``: the real global vocabulary when megatron padded the output layer (to a multiple of
    128 x TP): padded rows are excluded from the softmax (as if their logits were -inf) and get zero
    gradient. Rank r still owns global ids [r*V_local, (r+1)*V_local).
    """
    cfg = get_kernel_config()
    rank, tp = _tp_info(tp_group)
    _check(hidden, weight, targets, temperature, tp, ignore_index, cfg.check_inputs)
    v_local = weight.shape[0]
    vocab_start = rank * v_local
    if vocab_size is not None and vocab_size < v_local * tp:
        if cfg.check_inputs and targets.numel():
            bad = (targets >= vocab_size) & (targets != ignore_index)
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise ValueError(f"targets[{i}] = {int(targets[i])} is a padded vocabulary id (vocab_size={vocab_size})")
        n_valid = min(v_local, vocab_size - vocab_start)
        if n_valid <= 0:
            raise ValueError(f"TP rank {rank} holds only padded vocabulary rows (vocab_size={vocab_size}, "
                             f"V_local={v_local}); use less vocabulary padding or a smaller TP")
        weight = weight[:n_valid]  # a view: autograd gives the padded rows zero gradient
    if use_torch or cfg.use_torch or not triton_runs_on(hidden):
        return linear_logprob_torch(hidden, weight, targets, temperature, tp_group, return_entropy,
                                        ignore_index, reduce_grad_hidden, vocab_start)
    if hidden.shape[0] == 0:
        z = hidden.sum(dim=1, dtype=torch.float32) + weight.sum() * 0  # keeps autograd wiring for T=0
        return (z, z.clone()) if return_entropy else z
    return LinearLogprobFunction.apply(hidden.contiguous(), weight.contiguous(), targets.contiguous(),
                                       float(temperature), tp_group if tp > 1 else None, bool(return_entropy),
                                       int(ignore_index), bool(reduce_grad_hidden), vocab_start)
