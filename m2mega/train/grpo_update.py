"""GRPO policy update: pack scored rollouts into THD micro-batches and compute the clipped-surrogate loss
with the fused kernels, inside megatron's forward/backward schedule.

Per micro-batch, the last pipeline stage gets the final-norm hidden states (``return_hidden``: no
``T x V`` logits), ``m2mega.kernels.fused_linear_logprob`` turns them into log pi(y_t) over the
vocab-parallel output layer (max / sum-exp / target logit all-reduced over TP, padded vocab rows
excluded), and ``m2mega.kernels.fused_grpo_loss`` applies ratio, clip-higher, k3 KL, Eq. 6 weights and the
response mask in one pass. The loss is returned as a *sum* over response tokens with the token count, so
megatron (``calculate_per_token_loss``) normalises by the global token count of the step (DAPO's
token-level aggregation) however the rollouts were split into micro-batches and DP ranks.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from torch import Tensor

from m2mega.data.loader import IGNORE_INDEX, MicroBatch, model_inputs
from m2mega.kernels import fused_grpo_loss, fused_linear_logprob
from m2mega.models.wrappers import unwrap_vlm
from m2mega.rl.rollout import Rollouts

__all__ = ["pack_rollouts", "split_into_microbatches", "make_forward_step"]


def pack_rollouts(
    rollouts: Rollouts, indices: Sequence[int], advantages: Tensor, weights: Tensor, *,
    pad_to_multiple_of: int = 1, pad_token_id: int = 0,
) -> MicroBatch:
    """Concatenate rollouts ``indices`` (prompt tokens + response tokens each) into one THD micro-batch.
    Position ids: the prompt's M-RoPE ids, then the response as text continuing after the prompt's largest
    id (as Qwen2.5-VL's ``get_rope_index`` numbers text after vision), so images and videos keep their ids.

    ``pad_to_multiple_of`` (TP size under sequence parallelism, whose scatter splits the tokens evenly over
    TP ranks) appends one padding segment, as the SFT loader does: its own ``cu_seqlens`` entry (so it
    attends to nothing real), no targets, advantage and weight 0."""
    toks, tgts, masks, pos, pvs, grids, lens, vids = [], [], [], [], [], [], [], []
    for i in indices:
        p = rollouts.prompt_of(i)
        resp = rollouts.response_tokens[i]
        seq = torch.cat([p.prompt_tokens, resp])
        start = int(p.position_ids.max()) + 1 if p.position_ids.numel() else 0
        pos.append(torch.cat([p.position_ids, (start + torch.arange(resp.numel())).expand(3, -1)], dim=1))
        tgt = torch.full_like(seq, IGNORE_INDEX)
        L = p.prompt_tokens.numel()
        # position t predicts token t + 1: the response tokens are targets of positions L-1 .. L+R-2
        tgt[L - 1 : L - 1 + resp.numel()] = resp
        toks.append(seq)
        tgts.append(tgt)
        masks.append((tgt != IGNORE_INDEX).float())
        lens.append(seq.numel())
        if p.pixel_values is not None and len(p.image_grid_thw):
            pvs.append(p.pixel_values)
            grids.append(p.image_grid_thw)
        if p.pixel_values_videos is not None and len(p.video_grid_thw):
            vids.append((p.pixel_values_videos, p.video_grid_thw, p.second_per_grid_ts))
    idx = torch.as_tensor(list(indices), dtype=torch.long)
    adv, w = advantages[idx].float(), weights[idx].float()
    pad = -sum(lens) % max(1, int(pad_to_multiple_of))
    if pad:
        toks.append(torch.full((pad,), pad_token_id, dtype=toks[0].dtype))
        tgts.append(torch.full((pad,), IGNORE_INDEX, dtype=tgts[0].dtype))
        masks.append(torch.zeros(pad))
        pos.append(torch.arange(pad).expand(3, -1))
        lens.append(pad)
        adv, w = torch.cat([adv, adv.new_zeros(1)]), torch.cat([w, w.new_zeros(1)])
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens), 0)
    return MicroBatch(
        tokens=torch.cat(toks),
        labels=torch.cat(tgts),
        loss_mask=torch.cat(masks),
        position_ids=torch.cat(pos, dim=1),
        cu_seqlens=cu,
        max_seqlen=max(lens),
        pixel_values=torch.cat(pvs) if pvs else None,
        image_grid_thw=torch.cat(grids) if grids else torch.zeros(0, 3, dtype=torch.long),
        **({"pixel_values_videos": torch.cat([v[0] for v in vids]), "video_grid_thw": torch.cat([v[1] for v in vids]),
            "second_per_grid_ts": torch.cat([v[2] for v in vids])} if vids else {}),
        sample_indices=idx,
        num_padding=pad,
        advantages=adv,
        weights=w,
    )


def split_into_microbatches(
    rollouts: Rollouts, indices: Sequence[int], max_tokens: int, advantages: Tensor, weights: Tensor, *,
    pad_to_multiple_of: int = 1, pad_token_id: int = 0,
) -> list[MicroBatch]:
    """Greedy, order-preserving packing of rollouts into micro-batches of at most ``max_tokens`` tokens
    (a single rollout longer than that gets a micro-batch of its own); each padded as :func:`pack_rollouts`."""
    pad = dict(pad_to_multiple_of=pad_to_multiple_of, pad_token_id=pad_token_id)
    out, cur, cur_len = [], [], 0
    for i in indices:
        n = rollouts.prompt_of(i).prompt_tokens.numel() + rollouts.response_tokens[i].numel()
        if cur and cur_len + n > max_tokens:
            out.append(pack_rollouts(rollouts, cur, advantages, weights, **pad))
            cur, cur_len = [], 0
        cur.append(i)
        cur_len += n
    if cur:
        out.append(pack_rollouts(rollouts, cur, advantages, weights, **pad))
    return out


def token_logprobs(model, hidden: Tensor, mb: MicroBatch, temperature: float, with_entropy: bool):
    """log pi(target) per position [T] (0 at ignored positions), optionally the entropy [T]."""
    inner = unwrap_vlm(model)
    if inner.config.sequence_parallel:
        # hidden is split along the sequence; the kernel needs every token on every TP rank. The gather's
        # backward reduce-scatters, which already sums the TP partial grads: no second reduction.
        hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True)
        reduce = False
    else:
        reduce = True
    h = hidden.reshape(-1, hidden.shape[-1])
    tp_group = ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None
    return fused_linear_logprob(
        h,
        inner.output_weight().to(h.dtype),
        mb.labels,
        temperature,
        tp_group,
        return_entropy=with_entropy,
        reduce_grad_hidden=reduce,
        vocab_size=inner.vocab_size,
    )


def make_forward_step(
    *,
    temperature: float,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    beta: float,
    logprob_only: bool = False,
    record: list | None = None,
):
    """megatron ``forward_step(data_iterator, model)``. The per-token log-probs of each micro-batch are
    appended to ``record`` (when given) on the last stage: with ``logprob_only``, forward-only passes for
    pi_old / ref_policy log-probs; in the loss pass, the policy's log-probs before the update (the GRPO
    runner's train/rollout mismatch diagnostic)."""

    def forward_step(data_iterator: Iterator, model):
        mb: MicroBatch = next(data_iterator)
        hidden = model(**model_inputs(mb, with_labels=False, return_hidden=True))

        def loss_func(hidden: Tensor):
            if logprob_only:
                logp = token_logprobs(model, hidden, mb, temperature, with_entropy=False)
                if record is not None:
                    record.append(logp.detach().float())
                zero = logp.sum() * 0.0
                return zero, torch.ones((), dtype=torch.int), {}
            logp, ent = token_logprobs(model, hidden, mb, temperature, with_entropy=True)
            if record is not None:
                record.append(logp.detach().float())
            old = mb.old_logp if mb.old_logp is not None else logp.detach()
            loss, m = fused_grpo_loss(
                logp,
                old,
                mb.ref_logp if beta != 0.0 else None,
                mb.advantages,
                mb.loss_mask,
                clip_low=clip_low,
                clip_high=clip_high,
                dual_clip=dual_clip,
                beta=beta,
                weights=mb.weights,
                aggregation="token",  # DAPO's token-level mean (see the module docstring)
                cu_seqlens=mb.cu_seqlens,
                normalizer=1.0,  # a sum: megatron divides by the step's global token count
            )
            n = m["num_tokens"]
            mask = mb.loss_mask
            report = {
                # the optimised quantity (policy gradient + beta * KL) per response token: the progress
                # line's "loss" column
                "loss": torch.stack([loss.detach().float().reshape(()), n]),
                "pg_loss": torch.stack([m["pg_loss"], n]),
                "clip_frac": torch.stack([m["clip_frac"] * n, n]),
                "approx_kl": torch.stack([m["approx_kl"] * n, n]),
                "mean_ratio": torch.stack([m["mean_ratio"] * n, n]),
                "entropy": torch.stack([(ent.detach() * mask).sum(), n]),
                "num_tokens": torch.tensor([float(mb.num_tokens)]),
            }
            if beta != 0.0:
                report["ref_kl"] = torch.stack([m["ref_kl"] * n, n])
            return loss, n.to(torch.int), report

        return hidden, loss_func

    return forward_step
