"""Pillow's bicubic resampling, reproduced bit-exactly in plain torch (the reference for ``csrc/``).

HF's slow Qwen2-VL image processor resizes with ``PIL.Image.resize(..., BICUBIC)`` on uint8 RGB. Pillow's
algorithm (``libImaging/Resample.c``) is fully specified and integer after the coefficient step:

1. per output position, a window ``[xmin, xmin + xmax)`` of source pixels and double-precision weights of
   the Keys cubic (a = -0.5) stretched by the downscale factor, normalised by their sequential sum;
2. weights converted to fixed point with ``PRECISION_BITS = 22`` (round half away from zero);
3. two 1-D passes, each accumulating ``uint8 * int32`` in int32 starting at ``1 << 21`` and clipping
   ``acc >> 22`` to [0, 255] (so the intermediate image is uint8-rounded). The pass order matters for the
   last bit: Pillow 13 runs the vertical pass first when the height shrinks by more than twice as many
   pixels as the width (``H - h > 0 and H - h > 2 * (W - w)``), else horizontal first (older Pillow
   releases always ran horizontal first). ``vertical_first`` below is that rule; a pass whose size does
   not change is skipped, as in Pillow.

Every double operation here is a single IEEE op in the same order as the C code (no fused multiply-add,
sums accumulated tap by tap), so the coefficients, and hence the integer results, are identical to
Pillow's. The C++ (``csrc/pil_resample.h``) computes the same coefficients; the CUDA kernels receive them
precomputed from the host, so ``--use_fast_math`` in nvcc cannot change a single pixel.
"""

from __future__ import annotations

import math

import torch

PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed-point precision for 8-bit images
BICUBIC_SUPPORT = 2.0


def _bicubic_filter(x: torch.Tensor) -> torch.Tensor:
    """Pillow's ``bicubic_filter`` (a = -0.5) on float64, op-by-op as in C (left-to-right, no FMA)."""
    x = x.abs()
    a = -0.5
    near = (((a + 2.0) * x - (a + 3.0)) * x) * x + 1.0
    far = ((((x - 5.0) * x + 8.0) * x) - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def pil_bicubic_coeffs(in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pillow's ``precompute_coeffs`` + ``normalize_coeffs_8bpc`` for a full-image box.

    Returns ``(bounds, weights)``: ``bounds`` int64 [out_size, 2] = (first source index, tap count),
    ``weights`` int32 [out_size, ksize] fixed-point (taps past the count are 0).
    """
    scale = float(in_size) / out_size  # (double)(in1 - in0) / outSize, in0 = 0.0f, in1 = (float)in_size
    filterscale = max(scale, 1.0)
    support = BICUBIC_SUPPORT * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    ss = 1.0 / filterscale

    xx = torch.arange(out_size, dtype=torch.float64)
    center = 0.0 + (xx + 0.5) * scale
    # (int)(v + 0.5) in C truncates toward zero, which torch.trunc reproduces for negative v too.
    xmin = torch.trunc(center - support + 0.5).to(torch.int64).clamp(min=0)
    xmax = torch.trunc(center + support + 0.5).to(torch.int64).clamp(max=in_size) - xmin

    taps = torch.arange(ksize, dtype=torch.int64)
    src = (taps[None, :] + xmin[:, None]).to(torch.float64)
    w = _bicubic_filter(((src - center[:, None]) + 0.5) * ss)
    valid = taps[None, :] < xmax[:, None]
    w = torch.where(valid, w, torch.zeros_like(w))
    # ww accumulates tap by tap (C loop order); torch.sum would reassociate and change the last bit.
    ww = torch.zeros(out_size, dtype=torch.float64)
    for j in range(ksize):
        ww = ww + w[:, j]
    w = torch.where((ww != 0.0)[:, None], w / ww[:, None], w)
    scaled = w * float(1 << PRECISION_BITS)
    fixed = torch.where(w < 0, torch.trunc(-0.5 + scaled), torch.trunc(0.5 + scaled)).to(torch.int32)
    return torch.stack([xmin, xmax], dim=1), fixed


def _clip8(acc: torch.Tensor) -> torch.Tensor:
    # Pillow's clip8: >= 1 << 30 -> 255, <= 0 -> 0, else acc >> 22 (arithmetic shift = same clamp).
    return (acc >> PRECISION_BITS).clamp_(0, 255).to(torch.uint8)


def _resample_axis(img: torch.Tensor, axis: int, bounds: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One Pillow 8bpc pass along ``axis`` of a uint8 tensor, exact int32 accumulation."""
    in_size = img.shape[axis]
    x = img.to(torch.int32)
    out_shape = list(img.shape)
    out_shape[axis] = bounds.shape[0]
    acc = torch.full(out_shape, 1 << (PRECISION_BITS - 1), dtype=torch.int32)
    view = [1] * img.dim()
    view[axis] = bounds.shape[0]
    # Loop over taps, vectorised over everything else: the integer sum is order-independent, and this
    # keeps memory at one output-sized temporary (a gather of all taps at once would not fit for big images).
    for j in range(weights.shape[1]):
        idx = (bounds[:, 0] + j).clamp(max=in_size - 1)  # taps past the count have weight 0
        w = weights[:, j]
        if not bool((w != 0).any()):
            continue
        acc += x.index_select(axis, idx) * w.view(view)
    return _clip8(acc)


def vertical_first(in_h: int, in_w: int, out_h: int, out_w: int) -> bool:
    """Pillow 13's pass order: vertical first iff the height shrinks by > 2x the width's pixel loss."""
    return (in_h - out_h) > 0 and (in_h - out_h) > (in_w - out_w) * 2


def pil_resize_bicubic(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize uint8 ``[..., H, W, C]`` to ``[..., height, width, C]`` exactly as Pillow's BICUBIC does."""
    in_h, in_w = frames.shape[-3], frames.shape[-2]
    h_axis, w_axis = frames.dim() - 3, frames.dim() - 2
    passes = []
    if width != in_w:  # a pass whose size is unchanged is skipped (full-image box)
        passes.append((w_axis, pil_bicubic_coeffs(in_w, width)))
    if height != in_h:
        passes.append((h_axis, pil_bicubic_coeffs(in_h, height)))
    if vertical_first(in_h, in_w, height, width):
        passes.reverse()
    out = frames
    for axis, (bounds, weights) in passes:
        out = _resample_axis(out, axis, bounds, weights)
    return out
