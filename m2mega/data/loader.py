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
* ``pixel_values`` [P, 1176], ``image_grid_thw`` [n_img, 3] of all images, sample-major, plus the vision
  tower's metadata from the packing op (``vision_cu_seqlens``, ``window_index``, ``cu_window_seqlens``,
  ``rot_pos_ids``);
* ``sample_indices`` [n]: dataset indices, for metadata lookups (``dataset.info(i)``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterator

import numpy as np
import torch

from m2mega.models.qwen25vl.rope_index import get_rope_index, get_rope_index_packed

from .indexed import IndexedSamples, SampleInfo
from .packing import SAMPLER_ORDERS, PackPlan, PromptPlan

__all__ = ["IGNORE_INDEX", "MicroBatch", "RLPrompt", "PackedTHDDataset", "THDLoader", "PromptDataset"]

IGNORE_INDEX = -100


@dataclass
class MicroBatch:
    """One THD-packed micro-batch (see module docstring for the fields)."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor
    sample_indices: torch.Tensor
    step: int
    epoch: int
    num_padding: int = 0
    vision_cu_seqlens: torch.Tensor | None = None
    window_index: torch.Tensor | None = None
    cu_window_seqlens: torch.Tensor | None = None
    rot_pos_ids: torch.Tensor | None = None

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


class _Images:
    """Turns stored images into vision-tower inputs (packing op for pixels, concatenation for patches)."""

    def __init__(self, data: IndexedSamples, dtype: torch.dtype, backend: str) -> None:
        self.data, self.dtype, self.backend = data, dtype, backend
        cfg = data.meta.get("config", {})
        self.min_pixels = int(cfg.get("min_pixels", 56 * 56))
        self.max_pixels = int(cfg.get("max_pixels", 28 * 28 * 1280))

    def __call__(self, indices) -> dict:
        from m2mega.ops.vision_pack import pack_images, vision_metadata

        imgs = [im for i in indices for im in self.data.images(int(i))]
        grids = [self.data.grid_thw(int(i)) for i in indices]
        grid = torch.from_numpy(np.concatenate(grids).astype(np.int64)) if grids else torch.zeros(0, 3, dtype=torch.long)
        if not imgs:
            return {"pixel_values": None, "image_grid_thw": torch.zeros(0, 3, dtype=torch.long)}
        if self.data.image_format == "pixels":
            # Already at their smart-resize size: the op only normalises and patchifies.
            p = pack_images(imgs, min_pixels=self.min_pixels, max_pixels=self.max_pixels, dtype=self.dtype,
                            backend=self.backend)
            if not torch.equal(p.grid_thw, grid):
                raise ValueError(f"stored grids {grid.tolist()} != packed grids {p.grid_thw.tolist()} "
                                 f"(dataset '{self.data.prefix}', samples {list(indices)})")
            return {"pixel_values": p.pixel_values, "image_grid_thw": grid, "vision_cu_seqlens": p.cu_seqlens,
                    "window_index": p.window_index, "cu_window_seqlens": p.cu_window_seqlens,
                    "rot_pos_ids": p.rot_pos_ids}
        cu, widx, cuw, rot = vision_metadata(grid, backend=self.backend)
        return {"pixel_values": torch.cat(imgs).to(self.dtype), "image_grid_thw": grid, "vision_cu_seqlens": cu,
                "window_index": widx, "cu_window_seqlens": cuw, "rot_pos_ids": rot}


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
        grid = vis["image_grid_thw"]
        pos, _ = get_rope_index_packed(
            [torch.from_numpy(t.astype(np.int64)) for t in toks], grid if len(grid) else None,
            image_token_id=self.image_token_id, vision_start_token_id=self.vision_start_token_id,
        )
        if pad:
            pos = torch.cat([pos, torch.arange(pad, dtype=torch.long).expand(3, pad)], dim=1)
        return MicroBatch(
            tokens=torch.from_numpy(tokens), labels=torch.from_numpy(labels), loss_mask=torch.from_numpy(loss),
            position_ids=pos, cu_seqlens=torch.from_numpy(seg.astype(np.int32)),
            max_seqlen=int(np.diff(seg).max()), sample_indices=torch.as_tensor(np.asarray(indices, dtype=np.int64)),
            step=step, epoch=epoch, num_padding=pad, **vis,
        )


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
        grid = vis["image_grid_thw"]
        pos, delta = get_rope_index(toks, grid if len(grid) else None, image_token_id=self.image_token_id,
                                    vision_start_token_id=self.vision_start_token_id, sample_index=i)
        return RLPrompt(index=i, prompt_tokens=toks, position_ids=pos, rope_delta=delta,
                        pixel_values=vis["pixel_values"], image_grid_thw=grid, info=info)

    def prompts(self, step: int) -> list[RLPrompt]:
        return [self.prompt(int(i)) for i in self.plan.prompts(step)]
