"""GRPO / DAPO policy loss over per-token log-probs, fused into one forward and one backward pass.

Per valid token (mask > 0), with A the advantage times the sample's dynamic weight (paper Eq. 6):

    ratio = exp(logp - old_logp)
    pg    = max(-A·ratio, -A·clip(ratio, 1 - clip_low, 1 + clip_high))        (clip-higher: clip_high > clip_low)
    pg    = min(pg, -A·dual_clip)   where A < 0                                (dual clip, optional, dual_clip > 1)
    kl    = exp(ref - logp) - (ref - logp) - 1                                 (k3 estimator of KL(pi || ref))
    loss_t = pg + beta·kl

aggregated as ``"token"``: sum_t m_t loss_t / sum_t m_t over the whole batch (DAPO), or ``"sequence"``:
the mean over sequences that have a valid token of each sequence's masked token-mean (original GRPO).
``normalizer`` replaces the denominator (token count, resp. sequence count), e.g. a global count across
micro-batches and data-parallel ranks. A batch without valid tokens gives loss 0 (and zero gradients).

Only ``logp`` receives a gradient: old/ref log-probs, advantages and weights are data (the torch counterpart
detaches them too). Metrics are token-level masked means over all valid tokens, except ``pg_loss`` and
``kl_loss``, which use the loss's own aggregation so that ``loss = pg_loss + beta * kl_loss``.
"""

from __future__ import annotations

from typing import Literal

import torch

from . import _grpo_loss_triton as gk
from .config import get_kernel_config, triton_runs_on

__all__ = ["fused_grpo_loss", "grpo_loss_torch", "GRPOLossFunction", "dynamic_advantage_weights"]

Aggregation = Literal["token", "sequence"]


def dynamic_advantage_weights(accuracy: torch.Tensor, group_size: int, sigma: float = 1.0) -> torch.Tensor:
    """Paper Eq. 6: every rollout of a prompt group gets w = sigma · mean(acc) · (1 - mean(acc)), where the
    mean runs over the group's ``group_size`` consecutive rollouts; peaks for groups at 50% accuracy."""
    if accuracy.dim() != 1 or accuracy.numel() % group_size != 0:
        raise ValueError(f"accuracy must be [num_groups * group_size]; got {tuple(accuracy.shape)} "
                         f"with group_size={group_size}")
    from m2mega.rl import dynamic_weights  # the one definition of Eq. 6; here expanded per rollout

    return dynamic_weights(accuracy.float().view(-1, group_size), sigma).repeat_interleave(group_size)


# ------------------------------------------------------------------------------------------------ inputs


def _segments(logp, cu_seqlens, check: bool):
    """(starts[B], lens[B]) int64 segments of the flattened token axis, and B."""
    dev = logp.device
    if logp.dim() == 2:
        if cu_seqlens is not None:
            raise ValueError("cu_seqlens is only for packed [T] inputs; logp is [B, L]")
        B, L = logp.shape
        starts = torch.arange(B, device=dev, dtype=torch.int64) * L
        return starts, torch.full((B,), L, device=dev, dtype=torch.int64), B
    if logp.dim() != 1:
        raise ValueError(f"logp must be [B, L] or packed [T]; got {tuple(logp.shape)}")
    if cu_seqlens is None:
        z = torch.zeros(1, device=dev, dtype=torch.int64)
        return z, torch.full((1,), logp.shape[0], device=dev, dtype=torch.int64), 1
    cu = cu_seqlens.to(device=dev, dtype=torch.int64)
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"cu_seqlens must be [B + 1] with B >= 1; got {tuple(cu_seqlens.shape)}")
    lens = cu[1:] - cu[:-1]
    if check:
        if int(cu[0]) != 0 or int(cu[-1]) != logp.shape[0]:
            raise ValueError(f"cu_seqlens must start at 0 and end at T={logp.shape[0]}; got "
                             f"{int(cu[0])} .. {int(cu[-1])}")
        if bool((lens < 0).any()):
            i = int((lens < 0).nonzero()[0, 0])
            raise ValueError(f"cu_seqlens must be non-decreasing; cu_seqlens[{i + 1}] < cu_seqlens[{i}]")
    return cu[:-1].contiguous(), lens.contiguous(), lens.numel()


def _prepare(logp, old_logp, ref_logp, advantages, loss_mask, weights, cu_seqlens, clip_low, clip_high,
             dual_clip, beta, aggregation, check: bool):
    if not logp.is_floating_point():
        raise TypeError(f"logp must be floating point, got {logp.dtype}")
    starts, lens, B = _segments(logp, cu_seqlens, check)
    for name, t in (("old_logp", old_logp), ("loss_mask", loss_mask)) + (
        (("ref_logp", ref_logp),) if ref_logp is not None else ()
    ):
        if t.shape != logp.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected logp's {tuple(logp.shape)}")
    if advantages.shape == logp.shape:  # per token (when T == B both readings give the same loss)
        adv_token = True
    elif advantages.dim() == 1 and advantages.shape[0] == B:
        adv_token = False
    else:
        raise ValueError(f"advantages must be per sequence [{B}] or per token {tuple(logp.shape)}; got "
                         f"{tuple(advantages.shape)}")
    if weights is not None and (weights.dim() != 1 or weights.shape[0] != B):
        raise ValueError(f"weights must be per sequence [{B}], got {tuple(weights.shape)}")
    if aggregation not in ("token", "sequence"):
        raise ValueError(f"aggregation must be 'token' or 'sequence', got {aggregation!r}")
    if not 0.0 <= clip_low < 1.0 or clip_high < 0.0:
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0; got clip_low={clip_low}, clip_high={clip_high}")
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 (it bounds -A·ratio for A < 0), got {dual_clip}")
    if beta != 0.0 and ref_logp is None:
        raise ValueError(f"beta={beta} needs ref_logp for the KL term")
    mask = loss_mask.view(torch.uint8) if loss_mask.dtype == torch.bool else loss_mask
    return starts, lens, B, adv_token, mask


def _metric_keys(has_ref: bool) -> tuple[str, ...]:
    keys = ("pg_loss", "kl_loss", "clip_frac", "clip_frac_low", "clip_frac_high", "dual_clip_frac",
            "mean_ratio", "approx_kl", "num_tokens")
    return keys + (("ref_kl",) if has_ref else ())


def _finish(stats, aggregation, beta, normalizer, has_ref):
    """Loss, per-sequence gradient scale and metrics from the [B, NSTAT] per-sequence sums (O(B) work)."""
    tot = stats.sum(dim=0)
    n_tok = tot[0]
    safe_tok = torch.where(n_tok > 0, n_tok, torch.ones_like(n_tok))
    if aggregation == "token":
        den = safe_tok if normalizer is None else torch.as_tensor(normalizer, dtype=stats.dtype,
                                                                  device=stats.device)
        pg_loss, kl_loss = tot[1] / den, tot[2] / den
        scale = (1.0 / den).expand(stats.shape[0]).contiguous()
    else:
        n_b = stats[:, 0]
        has = n_b > 0
        safe_b = torch.where(has, n_b, torch.ones_like(n_b))
        n_seq = has.sum().to(stats.dtype)
        if normalizer is None:
            den = torch.where(n_seq > 0, n_seq, torch.ones_like(n_seq))
        else:
            den = torch.as_tensor(normalizer, dtype=stats.dtype, device=stats.device)
        pg_loss = torch.where(has, stats[:, 1] / safe_b, 0.0).sum() / den
        kl_loss = torch.where(has, stats[:, 2] / safe_b, 0.0).sum() / den
        scale = torch.where(has, 1.0 / (safe_b * den), 0.0).contiguous()
    loss = pg_loss + beta * kl_loss if beta != 0.0 else pg_loss
    metrics = {
        "pg_loss": pg_loss.detach(),
        "kl_loss": kl_loss.detach(),
        "clip_frac": tot[3] / safe_tok,
        "clip_frac_low": tot[4] / safe_tok,
        "clip_frac_high": tot[5] / safe_tok,
        "dual_clip_frac": tot[6] / safe_tok,
        "mean_ratio": tot[7] / safe_tok,
        "approx_kl": tot[8] / safe_tok,
        "num_tokens": n_tok,
    }
    if has_ref:
        metrics["ref_kl"] = tot[2] / safe_tok
    assert tuple(metrics) == _metric_keys(has_ref)
    return loss, scale, metrics


# ------------------------------------------------------------------------------------------------ torch counterpart


def grpo_loss_torch(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    beta: float = 0.0,
    weights: torch.Tensor | None = None,
    aggregation: Aggregation = "token",
    cu_seqlens: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
):
    """Plain-torch counterpart with autograd through torch ops (gradient reaches ``logp`` only)."""
    beta = float(beta)
    starts, lens, B, adv_token, _ = _prepare(logp, old_logp, ref_logp, advantages, loss_mask, weights,
                                             cu_seqlens, clip_low, clip_high, dual_clip, beta, aggregation, False)
    wide = torch.float64 if logp.dtype == torch.float64 else torch.float32  # fp64: for gradient checks
    x = logp.reshape(-1).to(wide)
    n = x.numel()
    seq = torch.repeat_interleave(torch.arange(B, device=x.device), lens, output_size=n)
    mk = loss_mask.reshape(-1).to(wide)
    valid = mk > 0
    zero = torch.zeros_like(x)
    x = torch.where(valid, x, zero)
    o = torch.where(valid, old_logp.detach().reshape(-1).to(wide), zero)
    a = advantages.detach().reshape(-1).to(wide) if adv_token else advantages.detach().to(wide)[seq]
    if weights is not None:
        a = a * weights.detach().to(wide)[seq]
    a = torch.where(valid, a, zero)
    log_r = x - o
    r = torch.exp(log_r)
    pg1 = -a * r
    pg2 = -a * torch.clamp(r, 1.0 - clip_low, 1.0 + clip_high)
    clipped = pg2 > pg1
    pg = torch.maximum(pg1, pg2)
    dual = torch.zeros_like(valid)
    if dual_clip is not None:
        pg3 = -a * dual_clip
        dual = (a < 0) & (pg > pg3)
        pg = torch.where(a < 0, torch.minimum(pg, pg3), pg)
    if ref_logp is not None:
        d = torch.where(valid, ref_logp.detach().reshape(-1).to(wide), zero) - x
        kl = torch.exp(d) - d - 1.0
    else:
        kl = zero
    f = valid.to(wide) * mk
    cols = [f, f * pg, f * kl, f * clipped, f * (clipped & (r < 1.0 - clip_low)),
            f * (clipped & (r > 1.0 + clip_high)), f * dual, f * r, f * (r - 1.0 - log_r)]
    cols = [torch.where(valid, c, zero) for c in cols]
    stats = torch.zeros(B, len(cols), device=x.device, dtype=wide).index_add(0, seq, torch.stack(cols, dim=1))
    loss, _, metrics = _finish(stats, aggregation, beta, normalizer, ref_logp is not None)
    return loss, {k: v.detach() for k, v in metrics.items()}


# ------------------------------------------------------------------------------------------------ fused


class GRPOLossFunction(torch.autograd.Function):
    """Forward: per-sequence sums kernel + O(B) finish. Backward: one per-token gradient kernel."""

    @staticmethod
    def forward(ctx, logp, old_logp, ref_logp, advantages, mask, weights, starts, lens, clip_low, clip_high,
                dual_clip, beta, aggregation, normalizer, adv_token):
        B = starts.numel()
        stats = torch.empty((B, gk.NSTAT), device=logp.device, dtype=torch.float32)
        has_ref = ref_logp is not None
        flags = dict(HAS_REF=has_ref, ADV_TOKEN=adv_token, HAS_W=weights is not None,
                     HAS_DUAL=dual_clip is not None, BLOCK=gk.BLOCK)
        dual_c = float(dual_clip) if dual_clip is not None else 0.0
        dummy = logp  # pointer for absent optional inputs (never read: the constexpr flag prunes the load)
        gk._grpo_fwd_kernel[(B,)](logp, old_logp, ref_logp if has_ref else dummy, advantages, mask,
                                  weights if weights is not None else dummy, starts, lens, stats,
                                  clip_low, clip_high, dual_c, NSTAT=gk.NSTAT, **flags)
        loss, scale, metrics = _finish(stats, aggregation, beta, normalizer, has_ref)
        ctx.save_for_backward(logp, old_logp, ref_logp, advantages, mask, weights, starts, lens, scale)
        ctx.params = (clip_low, clip_high, dual_c, beta, flags)
        ctx.mark_non_differentiable(*metrics.values())
        return (loss, *metrics.values())

    @staticmethod
    def backward(ctx, gout, *_):
        logp, old_logp, ref_logp, advantages, mask, weights, starts, lens, scale = ctx.saved_tensors
        clip_low, clip_high, dual_c, beta, flags = ctx.params
        grad = torch.empty_like(logp)
        dummy = logp
        gk._grpo_bwd_kernel[(starts.numel(),)](
            logp, old_logp, ref_logp if ref_logp is not None else dummy, advantages, mask,
            weights if weights is not None else dummy, starts, lens, scale, gout.float().reshape(1).contiguous(),
            grad, clip_low, clip_high, dual_c, beta, KL_GRAD=flags["HAS_REF"] and beta != 0.0, **flags)
        return (grad,) + (None,) * 14


def fused_grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    beta: float = 0.0,
    weights: torch.Tensor | None = None,
    aggregation: Aggregation = "token",
    cu_seqlens: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
    use_torch: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO/DAPO clipped-surrogate loss (+ beta · k3 KL) and its metrics in one pass each way.

    logp/old_logp/ref_logp/loss_mask: [B, L] (padded) or [T] (packed; ``cu_seqlens`` [B + 1] marks the
    sequences). advantages: per sequence [B] or per token (logp's shape). weights: per-sequence dynamic
    advantage weights [B] (see :func:`dynamic_advantage_weights`) or None. Returns (loss scalar fp32,
    metrics dict of detached fp32 scalars: pg_loss, kl_loss, clip_frac, clip_frac_low, clip_frac_high,
    dual_clip_frac, mean_ratio, approx_kl (k3 of ratio, i.e. KL(old || new)), num_tokens, and ref_kl when
    ref_logp is given).
    """
    cfg = get_kernel_config()
    beta = float(beta)
    if use_torch or cfg.use_torch or not triton_runs_on(logp):
        return grpo_loss_torch(logp, old_logp, ref_logp, advantages, loss_mask, clip_low=clip_low,
                                   clip_high=clip_high, dual_clip=dual_clip, beta=beta, weights=weights,
                                   aggregation=aggregation, cu_seqlens=cu_seqlens, normalizer=normalizer)
    starts, lens, B, adv_token, mask = _prepare(logp, old_logp, ref_logp, advantages, loss_mask, weights,
                                                cu_seqlens, clip_low, clip_high, dual_clip, beta, aggregation,
                                                cfg.check_inputs)
    c = torch.Tensor.contiguous
    out = GRPOLossFunction.apply(
        c(logp), c(old_logp.detach()), c(ref_logp.detach()) if ref_logp is not None else None,
        c(advantages.detach()), c(mask), c(weights.detach()) if weights is not None else None, starts, lens,
        float(clip_low), float(clip_high), dual_clip, beta, aggregation, normalizer, adv_token)
    return out[0], dict(zip(_metric_keys(ref_logp is not None), out[1:]))
