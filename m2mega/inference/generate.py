"""Batched autoregressive generation with a KV cache for m2mega's Qwen2.5-VL (GRPO rollouts, evaluation).

``generate(model, prompts, ...)`` takes a ragged list of prompts (each with its own images), left-pads them
into one batch and decodes greedily or by sampling until every row hit an EOS token or
``max_new_tokens``. It runs on every rank of one model replica (TP x PP) and returns the same result on
each.

How it works:

- **KV cache**: megatron-core's :class:`~megatron.core.inference.contexts.StaticInferenceContext`, passed
  as ``inference_context`` through ``GPTModel`` to megatron's ``SelfAttention``, which appends each
  step's keys/values to preallocated buffers and hands the whole cached prefix to the model's
  ``PackedAttention`` (its dense path masks padding keys and aligns causality bottom-right).
- **M-RoPE**: prompt positions are the model's own ``compute_position_ids`` (HF's ``get_rope_index`` with
  the attention mask); a generated token gets ``previous max position + 1`` of its row on all three axes,
  which is what HF's ``rope_deltas`` give. megatron slices rotary embeddings by cache offset
  (``[offset:offset+s]`` for queries, ``[:offset+s]`` for cached keys), so each call passes the position
  ids of the whole sequence so far.
- **TP**: logits are gathered over TP (megatron requires it in inference mode); padded vocabulary columns
  are dropped. Tokens are picked on the last stage and broadcast from TP rank 0, so all TP ranks agree.
- **PP**: stages run one after another for each step, exchanging ``[s, b, h]`` activations with
  megatron's inference p2p helpers; the last stage broadcasts the chosen tokens to the other stages.
- ``use_cache=False`` recomputes the whole sequence every step (no inference context): the reference the
  cache is tested against.

Rows that finished keep receiving ``pad_token_id`` (like HF) until all rows are done.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

from m2mega.models.wrappers import unwrap_vlm

from .sampling import SamplingParams, select_next_tokens

__all__ = ["GenerationOutput", "generate"]


@dataclass
class GenerationOutput:
    """Per prompt, in input order. ``tokens[i]`` are the generated ids (an EOS token, when hit, included);
    ``response_lengths[i] == len(tokens[i])``; ``finished[i]``: the row stopped at an EOS token (False:
    it ran into ``max_new_tokens``); ``logprobs[i]`` (when asked for): log-probability of each generated
    token under ``softmax(logits / temperature)`` (see :func:`~m2mega.inference.sampling.select_next_tokens`)."""

    tokens: list[Tensor]
    response_lengths: Tensor
    finished: Tensor
    logprobs: Optional[list[Tensor]] = None


@contextlib.contextmanager
def _inference_mode(model) -> Iterator[None]:
    """eval() + no_grad, and sequence parallelism off (a 1-token decode step cannot be split over TP)."""
    was_training = model.training
    toggled = []
    if getattr(model.config, "sequence_parallel", False):
        toggled.append((model.config, "sequence_parallel"))
        for mod in model.language_model.modules():
            for attr in ("sequence_parallel", "reduce_scatter_embeddings"):
                if getattr(mod, attr, False) is True:
                    toggled.append((mod, attr))
    for obj, attr in toggled:
        setattr(obj, attr, False)
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for obj, attr in toggled:
            setattr(obj, attr, True)
        model.train(was_training)


def _left_pad(prompts: Sequence[Tensor], pad_token_id: int, vocab_size: int, device) -> tuple[Tensor, Tensor]:
    if not prompts:
        raise ValueError("generate() needs at least one prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, Tensor) or p.dim() != 1 or p.numel() == 0:
            shape = tuple(p.shape) if isinstance(p, Tensor) else type(p).__name__
            raise ValueError(f"prompt {i} must be a non-empty 1-D tensor of token ids, got {shape}")
        if p.dtype.is_floating_point or p.dtype == torch.bool:
            raise ValueError(f"prompt {i} has dtype {p.dtype}; token ids must be integers")
        lo, hi = int(p.min()), int(p.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"prompt {i} has token ids in [{lo}, {hi}] outside the vocabulary [0, {vocab_size})")
    S = max(p.numel() for p in prompts)
    ids = torch.full((len(prompts), S), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros(len(prompts), S, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, S - p.numel():] = p.to(device)
        mask[i, S - p.numel():] = 1
    return ids, mask


def _collect_images(n: int, pixel_values, image_grid_thw, device,
                    names: tuple[str, str] = ("pixel_values", "image_grid_thw")) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Per-prompt lists (entries may be None or empty) -> the batch's concatenated patches and grids, in row
    order. ``names`` label errors (videos: ``("pixel_values_videos", "video_grid_thw")``)."""
    if pixel_values is None and image_grid_thw is None:
        return None, None
    pv_name, grid_name = names
    if pixel_values is None or image_grid_thw is None or len(pixel_values) != n or len(image_grid_thw) != n:
        raise ValueError(
            f"{pv_name} and {grid_name} must both be lists with one entry (or None) per prompt ({n} prompts)"
        )
    pv, grids = [], []
    for i, (p, g) in enumerate(zip(pixel_values, image_grid_thw)):
        # A prompt without images may say so with None or with empty tensors ([0, patch_dim], [0, 3]).
        p = None if p is None or p.shape[0] == 0 else p
        g = None if g is None or g.numel() == 0 else g
        if (p is None) != (g is None):
            raise ValueError(f"prompt {i}: {pv_name} and {grid_name} must both be given or both be None")
        if p is None:
            continue
        g = g.reshape(-1, 3)
        if p.dim() != 2 or p.shape[0] != int(g.prod(-1).sum()):
            raise ValueError(
                f"prompt {i}: {pv_name} {tuple(p.shape)} do not match grids {g.tolist()} "
                f"({int(g.prod(-1).sum())} patches expected)"
            )
        pv.append(p)
        grids.append(g)
    if not pv:
        return None, None
    return torch.cat(pv).to(device), torch.cat(grids).to(device)


def _collect_seconds(n: int, video_grid_thw, second_per_grid_ts) -> Optional[Tensor]:
    """Per-prompt seconds per temporal grid step of each video -> one float32 tensor in row order (None:
    no videos, or none given, which M-RoPE reads as 1 s)."""
    if second_per_grid_ts is None or video_grid_thw is None:
        return None
    if len(second_per_grid_ts) != n:
        raise ValueError(f"second_per_grid_ts must be a list with one entry (or None) per prompt ({n} prompts)")
    out = []
    for i, (g, sec) in enumerate(zip(video_grid_thw, second_per_grid_ts)):
        k = 0 if g is None else g.reshape(-1, 3).shape[0]
        sec = torch.zeros(0) if sec is None else torch.as_tensor(sec, dtype=torch.float32).reshape(-1)
        if sec.numel() != k:
            raise ValueError(f"prompt {i}: {sec.numel()} second_per_grid_ts value(s) for {k} video(s)")
        out.append(sec)
    return torch.cat(out) if out else None


class _Stepper:
    """Runs one forward of the whole model replica (all PP stages in turn) and returns the last stage's
    full-vocabulary logits of the last position ``[B, vocab]`` (None on other stages)."""

    def __init__(self, model, batch: int, max_len: int, use_cache: bool):
        from megatron.core import parallel_state as ps

        self.model = model
        self.lm = model.language_model
        self.vocab = model.vocab_size
        self.hidden = model.config.hidden_size
        self.dtype = model.config.pipeline_dtype or model.config.params_dtype
        self.pp = ps.get_pipeline_model_parallel_world_size()
        self.first = ps.is_pipeline_first_stage(ignore_virtual=True)
        self.last = ps.is_pipeline_last_stage(ignore_virtual=True)
        self.ctx = None
        if use_cache:
            from megatron.core.inference.contexts import StaticInferenceContext

            self.ctx = StaticInferenceContext(max_batch_size=batch, max_sequence_length=max_len)
        self.prefix_emb: Optional[Tensor] = None  # no-cache path: embeddings of everything so far [s, b, h]

    def _embed(self, ids: Tensor, pixel_values, grid, videos) -> Tensor:
        emb = self.lm.embedding(input_ids=ids, position_ids=None)  # [s, b, h]
        if pixel_values is not None or videos[0] is not None:
            emb = self.model._splice_vision(emb, ids, pixel_values, grid, *videos)
        return emb

    def __call__(self, new_ids: Tensor, positions: Tensor, attn_mask: Tensor, start: int,
                 pixel_values=None, grid=None, videos=(None, None)) -> Optional[Tensor]:
        """``new_ids [B, n]`` are the tokens at sequence indices ``start .. start+n``; ``positions`` /
        ``attn_mask`` cover indices ``0 .. start+n``."""
        from megatron.core.inference.communication_utils import (
            recv_from_prev_pipeline_rank_,
            send_to_next_pipeline_rank,
        )

        B, n = new_ids.shape
        end = start + n
        decoder_input = None
        if self.first:
            emb = self._embed(new_ids, pixel_values, grid, videos)
            if self.ctx is None:
                self.prefix_emb = emb if self.prefix_emb is None else torch.cat([self.prefix_emb, emb])
                decoder_input = self.prefix_emb
            else:
                decoder_input = emb
        seq = n if self.ctx is not None else end
        if not self.first:
            buf = torch.empty(seq, B, self.hidden, dtype=self.dtype, device=new_ids.device)
            recv_from_prev_pipeline_rank_(buf)
            self.model.set_input_tensor(buf)
        if self.ctx is not None:
            self.ctx.sequence_len_offset = start
            if start > 0:
                self.ctx.enable_decode_mode()
        out = self.lm(
            input_ids=new_ids if self.ctx is not None else None,
            position_ids=positions[:, :, :end],
            attention_mask=~attn_mask[:, :end].bool()[:, None, None, :],  # megatron: True = masked
            decoder_input=decoder_input,
            inference_context=self.ctx,
            runtime_gather_output=True,
        )
        if not self.last:
            send_to_next_pipeline_rank(out.contiguous())
            return None
        # [B, s, padded vocab] gathered over TP; drop the padding columns.
        return out[:, -1, : self.vocab].float()


def _broadcast_choice(tokens: Optional[Tensor], logprobs: Optional[Tensor], B: int, device) -> tuple[Tensor, Tensor]:
    """Make every rank of the replica hold the last stage's TP-rank-0 choice."""
    from megatron.core import parallel_state as ps

    import torch.distributed as dist

    if tokens is None:
        tokens = torch.empty(B, dtype=torch.long, device=device)
        logprobs = torch.empty(B, dtype=torch.float32, device=device)
    packed = torch.cat([tokens.double()[:, None], logprobs.double()[:, None]], 1)  # ids < 2^53: exact
    if ps.get_tensor_model_parallel_world_size() > 1 and ps.is_pipeline_last_stage(ignore_virtual=True):
        dist.broadcast(packed, ps.get_tensor_model_parallel_src_rank(), group=ps.get_tensor_model_parallel_group())
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(packed, ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    return packed[:, 0].long(), packed[:, 1].float()


def generate(
    model,
    prompts: Sequence[Tensor],
    *,
    pixel_values: Optional[Sequence[Optional[Tensor]]] = None,
    image_grid_thw: Optional[Sequence[Optional[Tensor]]] = None,
    pixel_values_videos: Optional[Sequence[Optional[Tensor]]] = None,
    video_grid_thw: Optional[Sequence[Optional[Tensor]]] = None,
    second_per_grid_ts: Optional[Sequence[Optional[Tensor]]] = None,
    max_new_tokens: int,
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    use_cache: bool = True,
    return_logprobs: bool = False,
    suppress_token_ids: Optional[Sequence[int]] = None,
) -> GenerationOutput:
    """Generate continuations of ``prompts`` (1-D token-id tensors of any lengths) with ``model`` (this
    rank's stage of an m2mega Qwen2.5-VL, possibly wrapped in DDP/Float16Module).

    ``pixel_values[i]`` / ``image_grid_thw[i]``: prompt i's image patches ``[n_patches, C*T*P*P]`` and grids
    ``[n_images, 3]`` (None for a text-only prompt); each prompt's ``<|image_pad|>`` runs must match its
    grids. Videos likewise: ``pixel_values_videos[i]`` / ``video_grid_thw[i]`` and ``second_per_grid_ts[i]``
    (seconds per temporal grid step of each of prompt i's videos: the M-RoPE time axis; default 1 s).
    Sampling: ``greedy=True`` or ``temperature=0`` picks the argmax, else temperature / top-k /
    top-p sampling from ``generator`` (or a fresh one seeded with ``seed``; else torch's global RNG).
    Every rank of the replica must call this with the same arguments. ``suppress_token_ids`` are never
    generated (their logits are -inf before sampling): GRPO passes the vision placeholders, which a
    response must not contain (the model would look for image features for them).
    """
    model = unwrap_vlm(model)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    params = SamplingParams(greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p)
    eos = [] if eos_token_id is None else [int(e) for e in torch.as_tensor(eos_token_id).flatten().tolist()]
    if not 0 <= pad_token_id < model.vocab_size:
        # Padding and finished rows are fed through the embedding, so the pad id must be a real token.
        raise ValueError(f"pad_token_id {pad_token_id} is outside the vocabulary [0, {model.vocab_size})")
    from m2mega.runtime import device as runtime_device

    first_param = next(iter(model.parameters()), None)
    dev = first_param.device if first_param is not None else runtime_device()
    if generator is None and seed is not None:
        generator = torch.Generator(device=dev).manual_seed(int(seed))

    ids, mask = _left_pad(prompts, pad_token_id, model.vocab_size, dev)
    pv, grid = _collect_images(len(prompts), pixel_values, image_grid_thw, dev)
    vpv, vgrid = _collect_images(len(prompts), pixel_values_videos, video_grid_thw, dev,
                                 ("pixel_values_videos", "video_grid_thw"))
    sec = _collect_seconds(len(prompts), video_grid_thw, second_per_grid_ts) if vgrid is not None else None
    B, S = ids.shape
    L = S + max_new_tokens
    # Prompt positions (HF's get_rope_index with the mask); generated token t of row b: max_b + 1 + t.
    prompt_pos = model.compute_position_ids(ids, grid, vgrid, mask, second_per_grid_ts=sec)
    row_max = prompt_pos.masked_fill(~mask.bool()[None], -1).amax(dim=(0, 2))  # [B]
    positions = torch.empty(3, B, L, dtype=torch.long, device=dev)
    positions[:, :, :S] = prompt_pos
    positions[:, :, S:] = (row_max[:, None] + 1 + torch.arange(max_new_tokens, device=dev))[None]
    attn = torch.cat([mask, torch.ones(B, max_new_tokens, dtype=torch.long, device=dev)], 1)
    eos_t = torch.tensor(eos, dtype=torch.long, device=dev)

    out_tokens = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=dev)
    out_logp = torch.zeros(B, max_new_tokens, dtype=torch.float32, device=dev)
    lengths = torch.zeros(B, dtype=torch.long, device=dev)
    finished = torch.zeros(B, dtype=torch.bool, device=dev)

    with _inference_mode(model):
        step = _Stepper(model, B, L, use_cache)
        logits = step(ids, positions, attn, 0, pv, grid, (vpv, vgrid))
        for t in range(max_new_tokens):
            tok = lp = None
            if logits is not None:
                if suppress_token_ids:
                    logits = logits.clone()
                    logits[..., list(suppress_token_ids)] = float("-inf")
                tok, lp = select_next_tokens(logits, params, generator)
            tok, lp = _broadcast_choice(tok, lp, B, dev)
            active = ~finished
            tok = torch.where(active, tok, torch.full_like(tok, pad_token_id))
            out_tokens[:, t] = tok
            out_logp[:, t] = torch.where(active, lp, torch.zeros_like(lp))
            lengths += active.long()
            if eos:
                finished |= active & torch.isin(tok, eos_t)
            if bool(finished.all()) or t == max_new_tokens - 1:
                break
            logits = step(tok[:, None], positions, attn, S + t)

    n = lengths.tolist()
    return GenerationOutput(
        tokens=[out_tokens[i, : n[i]].clone() for i in range(B)],
        response_lengths=lengths,
        finished=finished,
        logprobs=[out_logp[i, : n[i]].clone() for i in range(B)] if return_logprobs else None,
    )
