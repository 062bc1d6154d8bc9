"""THD-packed micro-batches (SFT) and single prompts (GRPO) from a preprocessed dataset.

:class:`PackedTHDDataset` is a map-style ``torch.utils.data.Dataset`` indexed by *step*: item ``s`` is
this data-parallel rank's micro-batch at step ``s`` (:class:`~m2mega.data.packing.PackPlan` decides which
samples). :class:`THDLoader` iterates it from a start step through a ``torch.utils.data.DataLoader``
(worker processes prefetch), with ``state_dict()`` / ``load_state_dict()`` for exact resume.

A :class:`MicroBatch` concatenates whole samples (never split) up to ``seq_length`` tokens:

* ``tokens`` [T], ``labels`` [T]: ``labels[t] = tokens[t+1]`` inside a sample, ``-100`` on each sample's
  last token (no prediction across a boundary) and on padding;
* ``loss_mask`` [T] float: 1 where ``labels[t]`` is an SFT target (assistant content and ``<|im_end|>``);
* ``position_ids`` [3, T]: 3D M-RoPE ids, restarting at 0 for every sample (HF ``get_rope_index``);
* ``cu_seqlens`` int32 [n+1] (+1 more when padded: padding is its own segment), ``max_seqlen``;
* ``pixel_values`` [P, 1176], ``image_grid_thw`` [n_img, 3] of all images, sample-major;
  ``pixel_values_videos`` [Pv, 1176], ``video_grid_thw`` [n_vid, 3], ``second_per_grid_ts`` [n_vid] of all
  videos; plus the vision tower's metadata from the packing op (``vision_cu_seqlens``, ``window_index``,
  ``cu_window_seqlens``, ``rot_pos_ids``) for the images followed by the videos (the model's order);
* ``sample_indices`` [n]: dataset indices, for metadata lookups (``dataset.info(i)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Iterator

import numpy as np
import torch

from m2mega.models.qwen25vl.rope_index import get_rope_index, get_rope_index_packed

from .indexed import IndexedSamples, SampleInfo
from .packing import SAMPLER_ORDERS, PackPlan, PromptPlan

__all__ = ["IGNORE_INDEX", "MicroBatch", "model_inputs", "RLPrompt", "PackedTHDDataset", "THDLoader", "PromptDataset"]

IGNORE_INDEX = -100


@dataclass
class MicroBatch:
    """One THD-packed micro-batch (see module docstring for the fields): the one batch type of SFT, GRPO
    updates and forward-only passes; :func:`model_inputs` turns it into the model's arguments. GRPO fills
    the per-sequence ``advantages``/``weights`` and per-token ``old_logp``/``ref_logp``
    (``m2mega.train.grpo_update.pack_rollouts``); ``sample_indices`` are then rollout indices."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 3, dtype=torch.long))
    sample_indices: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    step: int = 0
    epoch: int = 0
    num_padding: int = 0
    vision_cu_seqlens: torch.Tensor | None = None
    window_index: torch.Tensor | None = None
    cu_window_seqlens: torch.Tensor | None = None
    rot_pos_ids: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 3, dtype=torch.long))
    second_per_grid_ts: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    # GRPO: per sequence (padding segment included, 0) and per token
    advantages: torch.Tensor | None = None  # float32 [n], group-normalised
    weights: torch.Tensor | None = None  # float32 [n], Eq. 6 weight of the sequence's group
    old_logp: torch.Tensor | None = None  # float32 [T], pi_old (None: the policy's own, detached)
    ref_logp: torch.Tensor | None = None  # float32 [T], the KL reference policy's

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.numel()) - self.num_padding

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "MicroBatch":
        """Copy of the batch with every tensor on ``device``."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
        return MicroBatch(**out)

    def pin_memory(self) -> "MicroBatch":
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                setattr(self, f.name, v.pin_memory())
        return self


def model_inputs(batch: MicroBatch, *, with_labels: bool = True, return_hidden: bool = False) -> dict:
    """The model's keyword arguments for a THD :class:`MicroBatch` (one row of concatenated sequences):
    ``PackedSeqParams(qkv_format="thd")`` from ``cu_seqlens``, the M-RoPE ids, images and videos, and the
    packing op's vision metadata when the loader computed it."""
    # megatron is imported here, not at module level: the loader's worker processes import this module and
    # never build model inputs.
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = batch.cu_seqlens.to(torch.int32)
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                          max_seqlen_q=int(batch.max_seqlen), max_seqlen_kv=int(batch.max_seqlen))
    pos = batch.position_ids
    kwargs = {
        "input_ids": batch.tokens.unsqueeze(0),
        # M-RoPE ids [3, T] -> [3, 1, T] (one packed row)
        "position_ids": pos.unsqueeze(1) if pos.dim() == 2 else pos,
        "attention_mask": None,
        "packed_seq_params": psp,
    }
    if with_labels:
        # Non-targets carry IGNORE_INDEX; the loss mask zeroes them, the clamp keeps the cross entropy finite.
        kwargs["labels"] = batch.labels.clamp_min(0).unsqueeze(0)
    if return_hidden:
        kwargs["return_hidden"] = True
    if batch.pixel_values is not None and batch.pixel_values.numel():
        kwargs["pixel_values"] = batch.pixel_values
        kwargs["image_grid_thw"] = batch.image_grid_thw
    if batch.pixel_values_videos is not None and batch.pixel_values_videos.numel():
        kwargs["pixel_values_videos"] = batch.pixel_values_videos
        kwargs["video_grid_thw"] = batch.video_grid_thw
        kwargs["second_per_grid_ts"] = batch.second_per_grid_ts
    meta = (batch.vision_cu_seqlens, batch.window_index, batch.cu_window_seqlens, batch.rot_pos_ids)
    if ("pixel_values" in kwargs or "pixel_values_videos" in kwargs) and all(m is not None for m in meta):
        kwargs["vision_meta"] = meta  # the packing op already computed the vision tower's metadata
    return kwargs


@dataclass
class RLPrompt:
    """One unpacked prompt for rollouts: tokens up to and including ``<|im_start|>assistant\\n``."""

    index: int
    prompt_tokens: torch.Tensor  # int64 [L]
    position_ids: torch.Tensor  # int64 [3, L]
    rope_delta: int  # M-RoPE offset for generated positions: pos(t) = t + rope_delta for t >= L
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor  # int64 [n_img, 3]
    info: SampleInfo  # id, answer, task, answer_type, difficulty, ...
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 3, dtype=torch.long))
    second_per_grid_ts: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # float32 [n_vid]


def _grids(arrays: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.concatenate(arrays).astype(np.int64).reshape(-1, 3)) if arrays else torch.zeros(
        0, 3, dtype=torch.long)


class _Images:
    """Turns stored images and videos into vision-tower inputs (packing op for pixels, concatenation for
    patches); the tower's metadata covers the images, then the videos, as the model concatenates them."""

    def __init__(self, data: IndexedSamples, dtype: torch.dtype, backend: str) -> None:
        self.data, self.dtype, self.backend = data, dtype, backend
        cfg = data.meta.get("config", {})
        self.min_pixels = int(cfg.get("min_pixels", 56 * 56))
        self.max_pixels = int(cfg.get("max_pixels", 28 * 28 * 1280))

    def __call__(self, indices) -> dict:
        from m2mega.ops.vision_pack import pack_images, vision_metadata

        d = self.data
        imgs = [im for i in indices for im in d.images(int(i))]
        vids = [v for i in indices for v in d.videos(int(i))]
        grid = _grids([d.grid_thw(int(i)) for i in indices])
        vgrid = _grids([d.video_grid_thw(int(i)) for i in indices])
        sec = torch.from_numpy(np.concatenate([d.second_per_grid(int(i)) for i in indices]).astype(np.float32)) \
            if len(indices) else torch.zeros(0)
        out = {"pixel_values": None, "image_grid_thw": grid, "pixel_values_videos": None, "video_grid_thw": vgrid,
               "second_per_grid_ts": sec}
        if not imgs and not vids:
            return out
        n_img = int(grid.prod(-1).sum())
        if d.image_format == "pixels":
            # Already at their final sizes (multiples of 28): with bounds holding every size (video frames
            # have bounds of their own), the op's smart resize is the identity: it normalises and patchifies.
            areas = [int(a.shape[-3]) * int(a.shape[-2]) for a in imgs + vids]
            p = pack_images(imgs + vids, min_pixels=min(areas + [self.min_pixels]),
                            max_pixels=max(areas + [self.max_pixels]), dtype=self.dtype, backend=self.backend)
            if not torch.equal(p.grid_thw, torch.cat([grid, vgrid])):
                raise ValueError(f"stored grids {grid.tolist()} + {vgrid.tolist()} != packed grids "
                                 f"{p.grid_thw.tolist()} (dataset '{d.prefix}', samples {list(indices)})")
            pv = p.pixel_values
            meta = (p.cu_seqlens, p.window_index, p.cu_window_seqlens, p.rot_pos_ids)
        else:
            pv = torch.cat(imgs + vids).to(self.dtype)
            meta = vision_metadata(torch.cat([grid, vgrid]), backend=self.backend)
        out.update(pixel_values=pv[:n_img] if imgs else None, pixel_values_videos=pv[n_img:] if vids else None,
                   vision_cu_seqlens=meta[0], window_index=meta[1], cu_window_seqlens=meta[2], rot_pos_ids=meta[3])
        return out


class PackedTHDDataset(torch.utils.data.Dataset):
    """``dataset[step]`` -> this rank's :class:`MicroBatch` at ``step`` (deterministic, any order of access).

    ``order``: ``sequential`` (stored order: the curriculum when preprocessed with ``--order curriculum``),
    ``shuffle`` (new permutation per epoch) or ``bucket_shuffle`` (per-epoch shuffle inside
    ``num_buckets`` difficulty buckets, buckets easy to hard). ``pad_to_multiple_of`` pads the token count
    (padding is one extra ``cu_seqlens`` segment, ``labels`` -100, ``loss_mask`` 0). ``sft_only``
    restricts the samples to SFT rows. ``pixel_dtype``: dtype of ``pixel_values``.
    """

    def __init__(self, prefix: str, seq_length: int, *, dp_rank: int = 0, dp_size: int = 1,
                 order: str = "sequential", seed: int = 1234, num_buckets: int = 10, pad_to_multiple_of: int = 1,
                 sft_only: bool = False, pixel_dtype: torch.dtype = torch.float32, vision_backend: str = "auto") -> None:
        if order not in SAMPLER_ORDERS:
            raise ValueError(f"order must be one of {SAMPLER_ORDERS}, got {order!r}")
        self.prefix, self.seq_length, self.pad_to = prefix, seq_length, max(1, pad_to_multiple_of)
        self._args = dict(dp_rank=dp_rank, dp_size=dp_size, order=order, seed=seed, num_buckets=num_buckets,
                          sft_only=sft_only, pixel_dtype=pixel_dtype, vision_backend=vision_backend)
        self._open()

    def _open(self) -> None:
        a = self._args
        self.data = IndexedSamples(self.prefix)
        sp = self.data.special
        self.image_token_id, self.vision_start_token_id = sp["image_token_id"], sp["vision_start_token_id"]
        self.video_token_id = sp["video_token_id"]
        self.pad_id = sp["pad_id"]
        samples = self.data.samples
        indices = np.flatnonzero(np.asarray(samples["is_rl"]) == 0) if a["sft_only"] else None
        self.plan = PackPlan(np.asarray(samples["n_tokens"]), self.seq_length, dp_rank=a["dp_rank"],
                             dp_size=a["dp_size"], order=a["order"], seed=a["seed"],
                             difficulty=np.asarray(samples["difficulty"]), num_buckets=a["num_buckets"],
                             indices=indices)
        self._images = _Images(self.data, a["pixel_dtype"], a["vision_backend"])

    # DataLoader workers re-open the memory maps instead of pickling them.
    def __getstate__(self) -> dict:
        return {"prefix": self.prefix, "seq_length": self.seq_length, "pad_to": self.pad_to, "_args": self._args}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open()

    def __len__(self) -> int:
        """Steps in the first epoch for this rank (the stream itself is endless: index past it freely)."""
        return self.plan.packs_in_epoch(0) // self.plan.dp_size

    def __getitem__(self, step: int) -> MicroBatch:
        epoch, idx = self.plan.global_pack(int(step) * self.plan.dp_size + self.plan.dp_rank)
        return self.build(idx, step=int(step), epoch=epoch)

    def build(self, indices, step: int = -1, epoch: int = -1) -> MicroBatch:
        """Pack the given dataset indices (in order) into one micro-batch."""
        toks = [self.data.tokens(int(i)) for i in indices]
        masks = [self.data.loss_mask(int(i)) for i in indices]
        lens = np.asarray([len(t) for t in toks], dtype=np.int64)
        total = int(lens.sum())
        pad = -total % self.pad_to
        tokens = np.concatenate(toks + [np.full(pad, self.pad_id, dtype=np.int32)]).astype(np.int64)
        ends = np.cumsum(lens)
        labels = np.full(total + pad, IGNORE_INDEX, dtype=np.int64)
        labels[:-1] = tokens[1:]
        loss = np.zeros(total + pad, dtype=np.float32)
        loss[:-1] = np.concatenate(masks + [np.zeros(pad, dtype=bool)])[1:]
        labels[ends - 1] = IGNORE_INDEX  # a sample's last token predicts nothing (next sample / padding)
        loss[ends - 1] = 0.0
        if pad:
            labels[total:] = IGNORE_INDEX
            loss[total:] = 0.0
        seg = np.concatenate([[0], ends] + ([[total + pad]] if pad else []))
        vis = self._images(indices)
        pos, _ = get_rope_index_packed(
            [torch.from_numpy(t.astype(np.int64)) for t in toks], **_rope_inputs(vis),
            image_token_id=self.image_token_id, video_token_id=self.video_token_id,
            vision_start_token_id=self.vision_start_token_id,
        )
        if pad:
            pos = torch.cat([pos, torch.arange(pad, dtype=torch.long).expand(3, pad)], dim=1)
        return MicroBatch(
            tokens=torch.from_numpy(tokens), labels=torch.from_numpy(labels), loss_mask=torch.from_numpy(loss),
            position_ids=pos, cu_seqlens=torch.from_numpy(seg.astype(np.int32)),
            max_seqlen=int(np.diff(seg).max()), sample_indices=torch.as_tensor(np.asarray(indices, dtype=np.int64)),
            step=step, epoch=epoch, num_padding=pad, **vis,
        )


def _rope_inputs(vis: dict) -> dict:
    """get_rope_index's grid arguments from :class:`_Images` output (None where there are none).
    ``tokens_per_second`` stays at its default 2, every Qwen2.5-VL's value."""
    grid, vgrid = vis["image_grid_thw"], vis["video_grid_thw"]
    return {"image_grid_thw": grid if len(grid) else None, "video_grid_thw": vgrid if len(vgrid) else None,
            "second_per_grid_ts": vis["second_per_grid_ts"] if len(vgrid) else None}


class _StepSampler(torch.utils.data.Sampler):
    def __init__(self, start: int, stop: int | None) -> None:
        self.start, self.stop = start, stop

    def __iter__(self) -> Iterator[int]:
        s = self.start
        while self.stop is None or s < self.stop:
            yield s
            s += 1


def _identity(x):
    return x


class THDLoader:
    """Iterates :class:`PackedTHDDataset` from ``start_step`` (prefetching in ``num_workers`` processes).

    ``state_dict()`` after consuming steps ``start..k`` records ``k+1``; a loader given that state (same
    dataset, seq_length, dp_size, order, seed) yields step ``k+1`` next: no replay, no skip.
    """

    def __init__(self, dataset: PackedTHDDataset, *, start_step: int = 0, num_steps: int | None = None,
                 num_workers: int = 0, prefetch_factor: int = 4, pin_memory: bool = False) -> None:
        self.dataset, self.next_step, self.num_steps = dataset, start_step, num_steps
        self.num_workers, self.prefetch_factor, self.pin_memory = num_workers, prefetch_factor, pin_memory

    def __iter__(self) -> Iterator[MicroBatch]:
        stop = None if self.num_steps is None else self.num_steps
        kw = dict(prefetch_factor=self.prefetch_factor, persistent_workers=False) if self.num_workers else {}
        dl = torch.utils.data.DataLoader(self.dataset, sampler=_StepSampler(self.next_step, stop), batch_size=None,
                                         collate_fn=_identity, num_workers=self.num_workers,
                                         pin_memory=self.pin_memory, **kw)
        for mb in dl:
            self.next_step = mb.step + 1
            yield mb

    def state_dict(self) -> dict:
        return {"next_step": self.next_step, "plan": self.dataset.plan.state()}

    def load_state_dict(self, state: dict) -> None:
        mine = self.dataset.plan.state()
        if state["plan"] != mine:
            diff = {k: (state["plan"].get(k), v) for k, v in mine.items() if state["plan"].get(k) != v}
            raise ValueError(f"cannot resume: data plan differs from the checkpoint's (saved, now): {diff}")
        self.next_step = int(state["next_step"])


class PromptDataset:
    """RL prompts: ``prompts(step)`` for this rank's GRPO step, ``prompt(i)`` for any sample.

    Uses the RL rows (those ending at a user turn) unless ``rl_only=False``; ``order`` as for
    :class:`PackedTHDDataset`. Deterministic given (seed, step), so resuming at a step is exact.
    """

    def __init__(self, prefix: str, global_batch: int, *, dp_rank: int = 0, dp_size: int = 1,
                 order: str = "sequential", seed: int = 1234, num_buckets: int = 10, rl_only: bool = True,
                 pixel_dtype: torch.dtype = torch.float32, vision_backend: str = "auto") -> None:
        self.data = IndexedSamples(prefix)
        sp = self.data.special
        self.image_token_id, self.vision_start_token_id = sp["image_token_id"], sp["vision_start_token_id"]
        self.video_token_id = sp["video_token_id"]
        s = self.data.samples
        idx = np.flatnonzero(np.asarray(s["is_rl"]) == 1) if rl_only else np.arange(len(s))
        if len(idx) == 0:
            raise ValueError(f"dataset '{prefix}' has no RL rows (rows ending at a user turn)")
        self.plan = PromptPlan(idx, global_batch, dp_rank=dp_rank, dp_size=dp_size, order=order, seed=seed,
                               difficulty=np.asarray(s["difficulty"])[idx], num_buckets=num_buckets)
        self._images = _Images(self.data, pixel_dtype, vision_backend)

    def __len__(self) -> int:
        return len(self.plan.indices)

    def prompt(self, i: int) -> RLPrompt:
        info = self.data.info(i)
        toks = torch.from_numpy(self.data.tokens(i)[: info.prompt_len].astype(np.int64))
        vis = self._images([i])
        r = _rope_inputs(vis)
        pos, delta = get_rope_index(toks, r.pop("image_grid_thw"), **r, image_token_id=self.image_token_id,
                                    video_token_id=self.video_token_id,
                                    vision_start_token_id=self.vision_start_token_id, sample_index=i)
        return RLPrompt(index=i, prompt_tokens=toks, position_ids=pos, rope_delta=delta,
                        pixel_values=vis["pixel_values"], image_grid_thw=vis["image_grid_thw"], info=info,
                        pixel_values_videos=vis["pixel_values_videos"], video_grid_thw=vis["video_grid_thw"],
                        second_per_grid_ts=vis["second_per_grid_ts"])

    def prompts(self, step: int) -> list[RLPrompt]:
        return [self.prompt(int(i)) for i in self.plan.prompts(step)]
