"""3D M-RoPE position ids for Qwen2.5-VL, computed exactly as HF transformers' ``get_rope_index``.

Text tokens get the same position on all three axes (temporal, height, width), advancing by one per token.
An image (or video) occupies ``t * (h/m) * (w/m)`` consecutive placeholder tokens (m = spatial merge size);
its tokens get (t * interval, row, col) offset by the position the image starts at, and the text after it
resumes at ``start + max(h, w) / m`` (HF >= 5 rule: the temporal extent of a video does not advance text).

Unlike HF, which needs ``mm_token_type_ids`` from the processor, the modality of each token is read from
``input_ids`` (image / video placeholder ids). A run of placeholder tokens is consumed grid by grid, so two
images that touch (no text between) are still split correctly; a run whose length does not match the grids
is an error naming the sample and the token index.

Used by the data loader (one unpadded sample at a time, or a packed THD micro-batch) and by the model.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["get_rope_index", "get_rope_index_packed", "get_rope_index_batch"]


def _runs(kind: torch.Tensor) -> list[tuple[int, int, int]]:
    """(value, start, end) of each maximal run of equal values in a 1D int tensor."""
    n = kind.numel()
    if n == 0:
        return []
    change = torch.nonzero(kind[1:] != kind[:-1]).flatten() + 1
    bounds = [0, *change.tolist(), n]
    vals = kind[torch.tensor(bounds[:-1])].tolist()
    return [(v, s, e) for v, s, e in zip(vals, bounds[:-1], bounds[1:])]


def get_rope_index(
    input_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None,
    *,
    image_token_id: int,
    video_token_id: int | None = None,
    vision_start_token_id: int,
    spatial_merge_size: int = 2,
    video_grid_thw: torch.Tensor | None = None,
    second_per_grid_ts: Sequence[float] | torch.Tensor | None = None,
    tokens_per_second: float = 2.0,
    sample_index: int | None = None,
) -> tuple[torch.Tensor, int]:
    """Position ids ``[3, L]`` (int64) and the M-RoPE delta ``max(pos) + 1 - L`` for ONE unpadded sample.

    ``image_grid_thw`` / ``video_grid_thw``: ``[n, 3]`` patch grids (before merging) of the images / videos
    in the order they appear. ``second_per_grid_ts``: seconds per temporal grid step for each video
    (default 1.0). ``vision_start_token_id`` is checked: every image/video must directly follow one.
    ``sample_index`` only labels error messages.
    """
    where = f" (sample {sample_index})" if sample_index is not None else ""
    if input_ids.dim() != 1:
        raise ValueError(f"get_rope_index expects one unpadded sample [L], got shape {tuple(input_ids.shape)}{where}")
    ids = input_ids.detach().to("cpu", torch.long)
    kind = torch.zeros_like(ids)
    kind[ids == image_token_id] = 1
    if video_token_id is not None:
        kind[ids == video_token_id] = 2
    grids = {
        1: [] if image_grid_thw is None else image_grid_thw.detach().to("cpu", torch.long).reshape(-1, 3).tolist(),
        2: [] if video_grid_thw is None else video_grid_thw.detach().to("cpu", torch.long).reshape(-1, 3).tolist(),
    }
    used = {1: 0, 2: 0}
    if second_per_grid_ts is None:
        sec = [1.0] * len(grids[2])
    else:
        sec = torch.as_tensor(second_per_grid_ts, dtype=torch.float32).flatten().tolist()
    m = spatial_merge_size
    pieces: list[torch.Tensor] = []
    pos = 0
    for modality, start, end in _runs(kind):
        if modality == 0:
            n = end - start
            pieces.append(torch.arange(pos, pos + n, dtype=torch.long).expand(3, n))
            pos += n
            continue
        name = "image" if modality == 1 else "video"
        if start == 0 or ids[start - 1].item() != vision_start_token_id:
            raise ValueError(
                f"{name} placeholder run at token {start}{where} is not preceded by the vision-start token "
                f"{vision_start_token_id}"
            )
        i = start
        while i < end:
            k = used[modality]
            if k >= len(grids[modality]):
                raise ValueError(
                    f"{name} placeholder tokens at {i}..{end - 1}{where} have no grid left: "
                    f"{len(grids[modality])} {name} grid(s) given"
                )
            t, h, w = grids[modality][k]
            if h % m or w % m:
                raise ValueError(f"{name} {k}{where}: grid {t}x{h}x{w} is not divisible by merge size {m}")
            gt, gh, gw = t, h // m, w // m
            n = gt * gh * gw
            if i + n > end:
                raise ValueError(
                    f"{name} {k}{where}: grid {t}x{h}x{w} needs {n} placeholder tokens from index {i}, "
                    f"but the run ends at {end} ({end - i} left)"
                )
            # Still images have no temporal extent to space out; videos use tokens_per_second * seconds.
            interval = tokens_per_second * sec[k] if modality == 2 else 1
            # float32 like HF (arange * float tensor), so the truncation to int matches bit for bit.
            tt = (torch.arange(gt) * torch.tensor(interval, dtype=torch.float32)).long() + pos
            hh = torch.arange(gh, dtype=torch.long) + pos
            ww = torch.arange(gw, dtype=torch.long) + pos
            grid = torch.stack(torch.meshgrid(tt, hh, ww, indexing="ij")).reshape(3, -1)
            pieces.append(grid)
            pos += max(h, w) // m
            used[modality] += 1
            i += n
    for modality, name in ((1, "image"), (2, "video")):
        if used[modality] != len(grids[modality]):
            raise ValueError(
                f"{len(grids[modality])} {name} grid(s) given{where} but only {used[modality]} {name}(s) "
                f"found in input_ids"
            )
    if not pieces:
        return torch.zeros(3, 0, dtype=torch.long, device=input_ids.device), 0
    position_ids = torch.cat(pieces, dim=1)
    delta = int(position_ids.max().item()) + 1 - ids.numel()
    return position_ids.to(input_ids.device), delta


def _count_items(ids: torch.Tensor, token_id: int | None, grids: torch.Tensor | None, m: int, offset: int,
                 total: int) -> int:
    """How many grids (starting at ``offset``) the placeholder tokens of one sample consume."""
    if token_id is None or grids is None:
        return 0
    need = int((ids == token_id).sum().item())
    k, got = offset, 0
    while got < need:
        if k >= total:
            raise ValueError(f"placeholder tokens outnumber the grids given ({need} tokens, grids exhausted)")
        t, h, w = grids[k].tolist()
        got += t * (h // m) * (w // m)
        k += 1
    if got != need:
        raise ValueError(f"{need} placeholder tokens do not match whole grids (grids cover {got})")
    return k - offset


def get_rope_index_packed(
    input_ids_list: Sequence[torch.Tensor],
    image_grid_thw: torch.Tensor | None,
    *,
    image_token_id: int,
    video_token_id: int | None = None,
    vision_start_token_id: int,
    spatial_merge_size: int = 2,
    video_grid_thw: torch.Tensor | None = None,
    second_per_grid_ts: Sequence[float] | torch.Tensor | None = None,
    tokens_per_second: float = 2.0,
) -> tuple[torch.Tensor, list[int]]:
    """THD packing: positions ``[3, sum(L_i)]`` (each sample restarts at 0) and each sample's delta.

    ``image_grid_thw`` holds the grids of all samples in order (sample 0's images first), as the packed
    vision tower consumes them.
    """
    m = spatial_merge_size
    n_img = 0 if image_grid_thw is None else image_grid_thw.shape[0]
    n_vid = 0 if video_grid_thw is None else video_grid_thw.shape[0]
    sec_all = None if second_per_grid_ts is None else torch.as_tensor(second_per_grid_ts).flatten()
    out, deltas = [], []
    io = vo = 0
    for b, ids in enumerate(input_ids_list):
        try:
            ni = _count_items(ids, image_token_id, image_grid_thw, m, io, n_img)
            nv = _count_items(ids, video_token_id, video_grid_thw, m, vo, n_vid)
        except ValueError as e:
            raise ValueError(f"sample {b}: {e}") from None
        pos, delta = get_rope_index(
            ids,
            None if image_grid_thw is None else image_grid_thw[io : io + ni],
            image_token_id=image_token_id,
            video_token_id=video_token_id,
            vision_start_token_id=vision_start_token_id,
            spatial_merge_size=m,
            video_grid_thw=None if video_grid_thw is None else video_grid_thw[vo : vo + nv],
            second_per_grid_ts=None if sec_all is None else sec_all[vo : vo + nv],
            tokens_per_second=tokens_per_second,
            sample_index=b,
        )
        out.append(pos)
        deltas.append(delta)
        io += ni
        vo += nv
    if io != n_img or vo != n_vid:
        raise ValueError(f"{n_img} image / {n_vid} video grids given, samples use {io} / {vo}")
    if not out:
        return torch.zeros(3, 0, dtype=torch.long), []
    return torch.cat(out, dim=1), deltas


def get_rope_index_batch(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    image_grid_thw: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded batch ``[B, S]``: positions ``[3, B, S]`` (0 at padding) and deltas ``[B, 1]``, as HF returns.

    Padding may be on either side; ``attention_mask`` (1 = real token) selects each sample's tokens.
    Other keyword arguments are those of :func:`get_rope_index_packed`.
    """
    B, S = input_ids.shape
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    samples = [input_ids[b][mask[b]] for b in range(B)]
    pos, deltas = get_rope_index_packed(samples, image_grid_thw, **kwargs)
    out = torch.zeros(3, B, S, dtype=torch.long, device=input_ids.device)
    off = 0
    for b in range(B):
        n = samples[b].numel()
        out[:, b, mask[b]] = pos[:, off : off + n].to(out.device)
        off += n
    return out, torch.tensor(deltas, dtype=torch.long, device=input_ids.device).unsqueeze(1)
