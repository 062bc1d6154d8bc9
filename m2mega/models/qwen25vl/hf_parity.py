"""Synthetic multimodal batches and the HF transformers Qwen2.5-VL model (the HF parity model, the oracle of
the parity tests and the peer of the benchmarks).

Nothing here downloads anything: the HF model is built from a :class:`Qwen25VLConfig` with random
weights, and batches are random tokens with correctly sized image / video placeholder runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .config import Qwen25VLConfig

__all__ = ["SyntheticBatch", "synthetic_batch", "build_hf_model", "randomize_"]


@dataclass
class SyntheticBatch:
    samples: list[Tensor]  # token ids of each sample (unpadded)
    image_grid_thw: Tensor | None  # [n, 3] over all samples, in order
    pixel_values: Tensor | None  # [sum t*h*w, patch_dim]
    loss_mask: list[Tensor]  # per sample: 1 where the next token is a target
    video_grid_thw: Tensor | None = None  # [n_vid, 3] over all samples, in order
    pixel_values_videos: Tensor | None = None  # [sum t*h*w, patch_dim]
    second_per_grid_ts: Tensor | None = None  # float32 [n_vid]

    def vision_kwargs(self) -> dict:
        """pixel_values / image_grid_thw and, when there are videos, their three fields (model kwargs)."""
        kw = dict(pixel_values=self.pixel_values, image_grid_thw=self.image_grid_thw)
        if self.video_grid_thw is not None:
            kw.update(pixel_values_videos=self.pixel_values_videos, video_grid_thw=self.video_grid_thw,
                      second_per_grid_ts=self.second_per_grid_ts)
        return kw

    # --- padded batch (BSHD), right padding
    def padded(self) -> tuple[Tensor, Tensor]:
        S = max(s.numel() for s in self.samples)
        ids = torch.zeros(len(self.samples), S, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, s in enumerate(self.samples):
            ids[b, : s.numel()] = s
            mask[b, : s.numel()] = 1
        return ids, mask

    def padded_labels(self) -> tuple[Tensor, Tensor]:
        """Next-token labels and loss mask ``[b, S]`` (the last token of each sample has no target)."""
        ids, am = self.padded()
        labels = torch.zeros_like(ids)
        lmask = torch.zeros(ids.shape, dtype=torch.float)
        for b, s in enumerate(self.samples):
            n = s.numel()
            labels[b, : n - 1] = s[1:]
            lmask[b, : n - 1] = self.loss_mask[b][: n - 1]
        return labels, lmask

    # --- packed (THD): one row, samples back to back
    def packed(self) -> tuple[Tensor, list[int]]:
        return torch.cat(self.samples)[None], [s.numel() for s in self.samples]

    def packed_labels(self) -> tuple[Tensor, Tensor]:
        labels, lmask = self.padded_labels()
        _, am = self.padded()
        keep = am.bool()
        return labels[keep][None], lmask[keep][None]


def synthetic_batch(
    cfg: Qwen25VLConfig,
    images_per_sample: list[list[tuple[int, int]]],
    *,
    seed: int = 0,
    text_len: tuple[int, int] = (2, 7),
    extra_text: list[int] | None = None,
    videos_per_sample: list[list[tuple[int, int, int, float]]] | None = None,
) -> SyntheticBatch:
    """Samples of random text with images of the given pixel sizes (h, w multiples of 28 for the
    standard patch 14 / merge 2), each wrapped as ``<vision_start> <image_pad>*n <vision_end>``.
    ``extra_text[i]`` appends that many more text tokens to sample i (to reach a target length).
    ``videos_per_sample[i]``: videos ``(frames, h, w, second_per_grid)`` after sample i's images, wrapped
    as ``<vision_start> <video_pad>*n <vision_end>`` (frames even: whole temporal patches)."""
    g = torch.Generator().manual_seed(seed)
    g_extra = torch.Generator().manual_seed(seed + 1)  # so extra_text does not change the rest
    g_vid = torch.Generator().manual_seed(seed + 2)  # so videos do not change the rest either
    vgrids, vsec = [], []
    v = cfg.vision
    unit = v.patch_size * v.spatial_merge_size
    special = min(cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id)
    vocab_text = min(special, cfg.text.vocab_size)

    def text(n: int, gen=g) -> list[int]:
        return torch.randint(0, vocab_text, (n,), generator=gen).tolist()

    def rand_len() -> int:
        return int(torch.randint(text_len[0], text_len[1] + 1, (1,), generator=g))

    samples, grids, masks = [], [], []
    for i, imgs in enumerate(images_per_sample):
        toks = text(rand_len())
        for h_px, w_px in imgs:
            if h_px % unit or w_px % unit:
                raise ValueError(f"image size {h_px}x{w_px} is not a multiple of {unit}")
            gh, gw = h_px // v.patch_size, w_px // v.patch_size
            grids.append((1, gh, gw))
            n = gh * gw // v.spatial_merge_size**2
            toks += [cfg.vision_start_token_id] + [cfg.image_token_id] * n + [cfg.vision_end_token_id]
            toks += text(rand_len())
        for frames, h_px, w_px, sec in (videos_per_sample[i] if videos_per_sample else []):
            if h_px % unit or w_px % unit or frames % v.temporal_patch_size:
                raise ValueError(f"video {frames}x{h_px}x{w_px}: sides must be multiples of {unit}, frames of "
                                 f"{v.temporal_patch_size}")
            gt, gh, gw = frames // v.temporal_patch_size, h_px // v.patch_size, w_px // v.patch_size
            vgrids.append((gt, gh, gw))
            vsec.append(sec)
            n = gt * gh * gw // v.spatial_merge_size**2
            toks += [cfg.vision_start_token_id] + [cfg.video_token_id] * n + [cfg.vision_end_token_id]
            toks += text(int(torch.randint(text_len[0], text_len[1] + 1, (1,), generator=g_vid)), g_vid)
        if extra_text:
            toks += text(extra_text[i], g_extra)
        t = torch.tensor(toks, dtype=torch.long)
        samples.append(t)
        # Loss on text targets only (never predict a placeholder), like SFT masking of the prompt.
        nxt = torch.cat([t[1:], t.new_zeros(1)])
        m = (nxt != cfg.image_token_id) & (nxt != cfg.video_token_id) & (nxt != cfg.vision_start_token_id)
        m[: t.numel() // 4] = False  # a "prompt" prefix without loss
        masks.append(m.float())
    grid = torch.tensor(grids, dtype=torch.long) if grids else None
    pv = None
    if grid is not None:
        pv = torch.randn(int(grid.prod(-1).sum()), v.patch_dim, generator=g)
    out = SyntheticBatch(samples, grid, pv, masks)
    if vgrids:
        out.video_grid_thw = torch.tensor(vgrids, dtype=torch.long)
        out.pixel_values_videos = torch.randn(int(out.video_grid_thw.prod(-1).sum()), v.patch_dim, generator=g_vid)
        out.second_per_grid_ts = torch.tensor(vsec, dtype=torch.float32)
    return out


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Re-draw every parameter (norm weights around 1) so parity is not helped by special init values."""
    gens: dict = {}
    with torch.no_grad():
        for name, p in module.named_parameters():
            # One generator per device: the same seed gives the same weights wherever the model lives.
            g = gens.setdefault(p.device, torch.Generator(device=p.device).manual_seed(seed))
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32, device=p.device)
            if "norm" in name or "ln_q" in name:
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_((std if p.dim() > 1 else std / 2) * noise)


def build_hf_model(cfg: Qwen25VLConfig, seed: int = 0, dtype: torch.dtype = torch.float32):
    """``Qwen2_5_VLForConditionalGeneration`` with this architecture and random weights (eval mode)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**cfg.to_hf_dict()))
    randomize_(model, seed)
    return model.to(dtype).eval()


def hf_forward(model, cfg: Qwen25VLConfig, batch: SyntheticBatch) -> Tensor:
    """HF logits ``[b, S, vocab]`` for the padded form of ``batch``."""
    ids, am = batch.padded()
    mm = torch.zeros_like(ids, dtype=torch.int32)
    mm[ids == cfg.image_token_id] = 1
    mm[ids == cfg.video_token_id] = 2
    return model(input_ids=ids, attention_mask=am, mm_token_type_ids=mm, **batch.vision_kwargs()).logits


__all__.append("hf_forward")
