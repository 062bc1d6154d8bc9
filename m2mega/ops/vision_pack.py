"""Native-resolution image packing for the Qwen2.5-VL vision tower, for a whole ragged batch at once.

``pack_images`` fuses what HF's slow ``Qwen2VLImageProcessor`` does per image in Python/numpy (smart
resize with Pillow's bicubic, rescale by 1/255, CLIP normalisation, temporal duplication of single images,
14x14 patchify in 2x2-merge-window order) and adds what ``Qwen2_5_VisionTransformerPretrainedModel``
derives from the grids (full-attention ``cu_seqlens``, window index and ``cu_window_seqlens``, 2D rotary
position ids). Outputs are bit-identical to HF's (see ``docs/vision_pack.md``).

Backends: ``"ext"`` is the compiled ``m2mega._C`` (C++/OpenMP on CPU tensors, CUDA kernels on CUDA
tensors when built with CUDA); ``"torch"`` is the plain-torch reference in this file; ``"auto"`` picks the
extension when it was built. Both produce identical bits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from m2mega.ops.vision_resample import pil_resize_bicubic

# OpenAI CLIP statistics, as HF's OPENAI_CLIP_MEAN / OPENAI_CLIP_STD.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280
MAX_ASPECT_RATIO = 200  # HF's smart_resize refuses anything wider/taller than 200:1
RESCALE_FACTOR = 1 / 255  # HF's rescale_factor (a Python double)

try:  # the extension is optional: M2MEGA_NO_EXT=1 builds, or a tree that was never compiled
    from m2mega import _C as _ext  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - depends on the build
    _ext = None


def extension_available() -> bool:
    """True when ``m2mega._C`` (the compiled packer) is importable."""
    return _ext is not None


def extension_has_cuda() -> bool:
    """True when the compiled packer also carries the CUDA kernels."""
    return _ext is not None and bool(_ext.vision_pack_has_cuda())


@dataclass
class PackedImages:
    """One packed batch; field names and layouts follow HF's processor and vision tower."""

    pixel_values: torch.Tensor  # [num_patches, 3*temporal_patch*patch*patch] fp32 or bf16, HF order
    grid_thw: torch.Tensor  # [n_images, 3] int64 (t, h, w) in patches
    cu_seqlens: torch.Tensor  # int32 [sum(t) + 1]: one full-attention segment per frame group
    window_index: torch.Tensor  # int64 [num_patches // merge**2], HF get_window_index order
    cu_window_seqlens: torch.Tensor  # int32, after unique_consecutive
    rot_pos_ids: torch.Tensor  # int64 [num_patches, 2] (h, w) as HF's rot_pos_emb builds them


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[int, int]:
    """HF Qwen2-VL ``smart_resize``: sides multiples of ``factor``, area within the pixel bounds.

    Same arithmetic as HF (Python ``round`` is round-half-even, float64 throughout), so the C++ twin in
    ``csrc/vision_pack_common.h`` can match it exactly. Raises ``ValueError`` on aspect ratio > 200 or a
    non-positive side.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, "
            f"got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# ----------------------------------------------------------------------------------------------------
# Metadata: pure functions of the grids
# ----------------------------------------------------------------------------------------------------


def _check_grids(grid_thw: torch.Tensor, merge_size: int, window_size: int, patch_size: int) -> torch.Tensor:
    if grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
        raise ValueError(f"grid_thw must be [n, 3], got shape {tuple(grid_thw.shape)}")
    if window_size % (merge_size * patch_size) != 0:
        raise ValueError(f"window_size {window_size} must be a multiple of merge*patch = {merge_size * patch_size}")
    g = grid_thw.detach().to("cpu", torch.int64)
    for i, (t, h, w) in enumerate(g.tolist()):
        if t <= 0 or h <= 0 or w <= 0 or h % merge_size or w % merge_size:
            raise ValueError(f"grid_thw[{i}] = {(t, h, w)}: need t, h, w > 0 and h, w multiples of {merge_size}")
    return g


def _vision_metadata_torch(g: torch.Tensor, merge_size: int, window_size: int, patch_size: int):
    m, unit = merge_size, merge_size * merge_size
    ws = window_size // merge_size // patch_size  # window side in merged units (112 px -> 4)
    seqlens = torch.repeat_interleave(g[:, 1] * g[:, 2], g[:, 0])
    cu_seqlens = F.pad(seqlens.cumsum(0, dtype=torch.int32), (1, 0))
    window_index, cu_window, rot = [], [torch.zeros(1, dtype=torch.int64)], []
    base, total = 0, 0
    for t, h, w in g.tolist():
        lh, lw = h // m, w // m
        # Pad to whole windows exactly as HF (a full extra window when divisible: empty, dropped below).
        pad_h, pad_w = ws - lh % ws, ws - lw % ws
        nwh, nww = (lh + pad_h) // ws, (lw + pad_w) // ws
        idx = torch.arange(t * lh * lw).reshape(t, lh, lw)
        idx = F.pad(idx, (0, pad_w, 0, pad_h), value=-100)
        idx = idx.reshape(t, nwh, ws, nww, ws).permute(0, 1, 3, 2, 4).reshape(t, nwh * nww, ws * ws)
        keep = idx != -100
        counts = keep.sum(-1).reshape(-1)
        window_index.append(idx[keep] + base)
        cu_window.append(counts.cumsum(0) * unit + total)
        base += t * lh * lw
        total += t * h * w
        # (h, w) ids in merge-block order: row-major over blocks, row-major inside each m x m block.
        hp = torch.arange(h).view(lh, m, 1, 1).expand(lh, m, lw, m)
        wp = torch.arange(w).view(1, 1, lw, m).expand(lh, m, lw, m)
        ids = torch.stack([hp.permute(0, 2, 1, 3).reshape(-1), wp.permute(0, 2, 1, 3).reshape(-1)], dim=-1)
        rot.append(ids.repeat(t, 1))
    cu_window_seqlens = torch.unique_consecutive(torch.cat(cu_window).to(torch.int32))
    return cu_seqlens, torch.cat(window_index), cu_window_seqlens, torch.cat(rot)


def vision_metadata(
    grid_thw: torch.Tensor,
    *,
    merge_size: int = 2,
    window_size: int = 112,
    patch_size: int = 14,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(cu_seqlens, window_index, cu_window_seqlens, rot_pos_ids)`` from ``grid_thw`` alone.

    Identical to HF's ``get_vision_attention_seqlens`` / ``get_vision_window_index`` /
    ``get_vision_position_ids`` for Qwen2.5-VL. Results live on ``grid_thw``'s device. ``backend``: "auto"
    (extension when built), "ext" or "torch".
    """
    g = _check_grids(grid_thw, merge_size, window_size, patch_size)
    if _pick_backend(backend) == "ext":
        out = tuple(_ext.vision_metadata(g, merge_size, window_size, patch_size))
    else:
        out = _vision_metadata_torch(g, merge_size, window_size, patch_size)
    return tuple(x.to(grid_thw.device) for x in out)  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------
# Input checks and the torch reference packer
# ----------------------------------------------------------------------------------------------------


def _pick_backend(backend: str) -> str:
    if backend not in ("auto", "ext", "torch"):
        raise ValueError(f"backend must be 'auto', 'ext' or 'torch', got {backend!r}")
    if backend == "ext" and _ext is None:
        raise RuntimeError("backend='ext' but m2mega._C is not built (pip install --no-build-isolation -e .)")
    if backend == "auto":
        return "ext" if _ext is not None else "torch"
    return backend


def _validate(images: Sequence[torch.Tensor], min_pixels: int, max_pixels: int, factor: int):
    """Return per-image (frames, H, W, out_h, out_w); ValueError naming the image index otherwise."""
    if not isinstance(images, (list, tuple)) or len(images) == 0:
        raise ValueError("images must be a non-empty list of uint8 [H, W, 3] / [T, H, W, 3] tensors")
    if min_pixels <= 0 or max_pixels < min_pixels:
        raise ValueError(f"need 0 < min_pixels <= max_pixels, got {min_pixels}, {max_pixels}")
    shapes = []
    device = None
    for i, img in enumerate(images):
        if not isinstance(img, torch.Tensor):
            raise ValueError(f"image {i}: expected a torch.Tensor, got {type(img).__name__}")
        if img.dtype != torch.uint8:
            raise ValueError(f"image {i}: expected dtype torch.uint8 (decoded 0..255 pixels), got {img.dtype}")
        if img.dim() not in (3, 4):
            raise ValueError(f"image {i}: expected [H, W, 3] or [T, H, W, 3], got shape {tuple(img.shape)}")
        if img.shape[-1] != 3:
            raise ValueError(f"image {i}: expected 3 channels (RGB, channels last), got shape {tuple(img.shape)}")
        t = img.shape[0] if img.dim() == 4 else 1
        h, w = img.shape[-3], img.shape[-2]
        if t == 0 or h == 0 or w == 0:
            raise ValueError(f"image {i}: zero-size image, shape {tuple(img.shape)}")
        if max(h, w) / min(h, w) > MAX_ASPECT_RATIO:
            raise ValueError(
                f"image {i}: aspect ratio {max(h, w) / min(h, w):.1f} of a {h}x{w} image exceeds "
                f"{MAX_ASPECT_RATIO} (HF's smart_resize refuses it too)"
            )
        if device is None:
            device = img.device
        elif img.device != device:
            raise ValueError(f"image {i}: on {img.device}, but image 0 is on {device}")
        oh, ow = smart_resize(h, w, factor, min_pixels, max_pixels)
        shapes.append((t, h, w, oh, ow))
    return shapes


def normalize_lut(image_mean: Sequence[float], image_std: Sequence[float]) -> torch.Tensor:
    """float32 [3, 256]: the value HF produces for each uint8 level and channel.

    HF: ``float32(float64(u) * (1/255))`` then ``(x - float32(mean)) / float32(std)`` in float32. Every
    later step only moves these values, so a lookup table makes normalisation exact in every backend.
    """
    levels = (torch.arange(256, dtype=torch.float64) * RESCALE_FACTOR).to(torch.float32)
    mean = torch.tensor(list(image_mean), dtype=torch.float32)
    std = torch.tensor(list(image_std), dtype=torch.float32)
    if mean.numel() != 3 or std.numel() != 3:
        raise ValueError(f"image_mean and image_std need 3 values, got {list(image_mean)}, {list(image_std)}")
    return (levels[None, :] - mean[:, None]) / std[:, None]


def _pack_torch(images, shapes, patch: int, tp: int, merge: int, lut: torch.Tensor, dtype: torch.dtype):
    chunks, grids = [], []
    for img, (t, _h, _w, oh, ow) in zip(images, shapes):
        frames = img.reshape(t, img.shape[-3], img.shape[-2], 3).cpu()
        resized = pil_resize_bicubic(frames, oh, ow).to(torch.int64)  # [t, oh, ow, 3]
        x = torch.stack([lut[c][resized[..., c]] for c in range(3)], dim=1)  # [t, 3, oh, ow] float32
        if pad := -t % tp:  # videos: repeat the last frame up to a whole temporal patch (HF video)
            x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)], dim=0)
        gt, gh, gw = x.shape[0] // tp, oh // patch, ow // patch
        x = x.view(gt, tp, 3, gh // merge, merge, patch, gw // merge, merge, patch)
        # -> (gt, block_h, block_w, in_h, in_w, C, tp, patch_h, patch_w): HF's patch order and layout
        x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(gt * gh * gw, 3 * tp * patch * patch)
        chunks.append(x)
        grids.append((gt, gh, gw))
    return torch.cat(chunks).to(dtype), torch.tensor(grids, dtype=torch.int64)


def pack_images(
    images: Sequence[torch.Tensor],
    *,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    patch_size: int = 14,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
    window_size: int = 112,
    image_mean: Sequence[float] = CLIP_MEAN,
    image_std: Sequence[float] = CLIP_STD,
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
) -> PackedImages:
    """Pack decoded images / video frame stacks into Qwen2.5-VL vision-tower inputs, whole batch at once.

    ``images``: uint8 tensors, ``[H, W, 3]`` (an image, duplicated ``temporal_patch_size`` times) or
    ``[T, H, W, 3]`` (video frames, grouped by ``temporal_patch_size``, the last frame repeated to fill
    the last group). All on one device; CUDA tensors need the extension built with CUDA. Outputs are on
    the images' device. ``dtype``: ``torch.float32`` or ``torch.bfloat16`` (HF's fp32 values, rounded).
    """
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    if window_size % (merge_size * patch_size) != 0:
        raise ValueError(f"window_size {window_size} must be a multiple of merge*patch = {merge_size * patch_size}")
    factor = patch_size * merge_size
    shapes = _validate(images, min_pixels, max_pixels, factor)
    lut = normalize_lut(image_mean, image_std)
    device = images[0].device
    if _pick_backend(backend) == "ext":
        if device.type == "cuda" and not extension_has_cuda():
            raise RuntimeError("CUDA images given but m2mega._C was built without CUDA")
        pixel_values, grid_thw, cu, widx, cuw, rot = _ext.vision_pack(
            list(images), min_pixels, max_pixels, patch_size, temporal_patch_size, merge_size, window_size,
            lut, dtype == torch.bfloat16,
        )
        return PackedImages(pixel_values, grid_thw, cu, widx, cuw, rot)
    pixel_values, grid_thw = _pack_torch(images, shapes, patch_size, temporal_patch_size, merge_size, lut, dtype)
    cu, widx, cuw, rot = _vision_metadata_torch(grid_thw, merge_size, window_size, patch_size)
    return PackedImages(*(x.to(device) for x in (pixel_values, grid_thw, cu, widx, cuw, rot)))
