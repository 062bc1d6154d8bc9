"""Decode, validate and resize input images exactly as HF's Qwen2-VL image processor does.

``load_image`` returns the image already resized to its smart-resize grid as uint8 HWC: HF's processor
itself rounds the bicubic resize to uint8 before normalising (Pillow resamples 8-bit images), so storing
this array loses nothing, and the vision packing op applied to it later (``pack_images``: its smart
resize is then the identity) yields bit-for-bit the patches it would give on the original file.

Failures raise :class:`~m2mega.data.schema.RejectError` with codes ``image_missing``, ``image_corrupt``
(undecodable or truncated), ``image_aspect`` (aspect ratio > 200, which Qwen2-VL refuses) and
``image_too_large`` (over Pillow's decompression-bomb limit, or over ``max_pixels`` after resizing).
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from .schema import RejectError

__all__ = ["PATCH_SIZE", "MERGE_SIZE", "FACTOR", "DEFAULT_MIN_PIXELS", "DEFAULT_MAX_PIXELS", "IMAGE_FORMATS",
           "smart_resize", "open_rgb", "load_image", "grid_of", "vision_tokens"]

PATCH_SIZE = 14
MERGE_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE
TEMPORAL_PATCH = 2
DEFAULT_MIN_PIXELS = 56 * 56  # Qwen2.5-VL image processor defaults
DEFAULT_MAX_PIXELS = 28 * 28 * 1280
IMAGE_FORMATS = ("pixels", "patches")  # how preprocessing stores images: resized uint8, or packed patches


def smart_resize(h: int, w: int, min_pixels: int, max_pixels: int, factor: int = FACTOR) -> tuple[int, int]:
    """Target (height, width): multiples of ``factor``, area in [min_pixels, max_pixels], aspect kept
    (the vision packing op's ``smart_resize``, HF's formula)."""
    # Imported here: the vision op pulls in torch, which `tools/preprocess_data.py --help` must not wait for.
    from m2mega.ops.vision_pack import smart_resize as _smart_resize

    return _smart_resize(h, w, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)


def grid_of(h: int, w: int) -> tuple[int, int, int]:
    """Patch grid (t, h, w) of a resized still image (one temporal patch of two identical frames)."""
    return 1, h // PATCH_SIZE, w // PATCH_SIZE


def vision_tokens(grid: tuple[int, int, int] | np.ndarray) -> int:
    """Number of ``<|image_pad|>`` tokens an image of patch grid (t, h, w) occupies after 2x2 merging."""
    t, h, w = (int(x) for x in grid)
    return t * h * w // (MERGE_SIZE * MERGE_SIZE)


def _to_rgb(img):
    from PIL import Image

    # HF's convert_to_rgb: transparency is composited onto white, everything else converted.
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def open_rgb(path: str, kind: str = "image"):
    """Decode ``path`` fully, apply its EXIF orientation, convert to RGB (a PIL image). Failures raise
    ``{kind}_missing`` / ``{kind}_corrupt`` / ``{kind}_too_large`` (video frame lists use ``kind="video"``)."""
    from PIL import Image, ImageOps

    if not os.path.isfile(path):
        raise RejectError(f"{kind}_missing", f"{path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()  # full decode now: truncated files raise here, not later
                # A phone photo stored sideways with an orientation tag is shown upright by every viewer and
                # by transformers' load_image (exif_transpose): the model must see it upright too.
                return _to_rgb(ImageOps.exif_transpose(img))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise RejectError(f"{kind}_too_large", f"{path}: {e}") from None
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise RejectError(f"{kind}_corrupt", f"{path}: {type(e).__name__}: {e}") from None


def load_image(path: str, min_pixels: int = DEFAULT_MIN_PIXELS, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode ``path``, apply its EXIF orientation, convert to RGB, bicubic-resize to the smart-resize size;
    uint8 [H, W, 3]."""
    from PIL import Image

    rgb = open_rgb(path)
    w, h = rgb.size
    try:
        rh, rw = smart_resize(h, w, min_pixels=min_pixels, max_pixels=max_pixels)
    except ValueError as e:
        raise RejectError("image_aspect", f"{path} ({w}x{h}): {e}") from None
    if rh * rw > max_pixels:
        raise RejectError("image_too_large", f"{path} ({w}x{h}) resizes to {rw}x{rh} > max_pixels={max_pixels}")
    if (rh, rw) != (h, w):
        rgb = rgb.resize((rw, rh), resample=Image.BICUBIC)
    return np.array(rgb, dtype=np.uint8).reshape(rh, rw, 3)
