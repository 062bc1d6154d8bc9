"""Decode, sample and resize videos as Qwen's ``qwen-vl-utils`` (0.0.14, ``vision_process.py``) does.

A video is a file (``{"type": "video", "video": "clip.mp4"}``) or a list of frame images
(``{"type": "video", "video": ["f0.jpg", ...]}``). :func:`load_video` returns its frames at their final
size as uint8 ``[T, H, W, 3]`` (``T`` even, ``H`` and ``W`` multiples of 28) plus the rate they represent;
the vision packing op (``pack_images``) turns them into ``pixel_values_videos`` later, and
``second_per_grid = 2 / fps`` spaces the temporal M-RoPE positions.

Files are decoded with PyAV (FFmpeg): its manylinux wheels bundle FFmpeg (decoders for H.264/HEVC/VP9/
AV1/MPEG-4/..., and the libx264 encoder the synthetic data uses), so nothing has to be installed on the
system; torchcodec needs a system FFmpeg and a torch-matched build. Sampling follows qwen-vl-utils'
decord/torchcodec path: ``total`` = the stream's frame count (its packets, as decord indexes them),
``nframes`` from :func:`smart_nframes`, indices ``linspace(0, total - 1, nframes).round()`` (float32 torch
linspace, as there), sampled rate ``nframes / total * fps_source``. Frames are resized with torchvision's
tensor rule (float32 bicubic with antialias, clamp, round; no-op at the same size), re-implemented on
``torch.nn.functional.interpolate`` so torchvision is not needed. Only the sampled frames are converted and
kept, each resized as it is decoded; the token count is checked against the budget before decoding.

Frame lists use every frame, in order; ``fps`` is their rate (default 2, qwen-vl-utils' ``sample_fps``).
Unlike qwen-vl-utils, which first resizes each listed frame with the *image* bounds to multiples of 56 (PIL)
and then the stack with the video bounds, frames are resized once, with the video bounds (identical results
for frames whose sides are multiples of 56 within both bounds). Rotation metadata of a file is not applied,
as in decord (qwen-vl-utils' default reader).

Failures raise :class:`~m2mega.data.schema.RejectError`: ``video_missing``, ``video_corrupt`` (cannot be
opened or decoded, no video stream), ``video_codec`` (no decoder for the codec), ``video_truncated``
(fewer frames than the container's index lists, or than were sampled), ``video_empty`` (fewer than two
frames), ``video_duration`` (no usable frame rate, or an absurd one or length), ``video_aspect``,
``video_frame_size`` (a frame list with frames of different sizes), ``video_too_large`` (a frame over
Pillow's decompression-bomb limit, files and frame lists alike) and ``too_long`` (more vision tokens than
the budget).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from .schema import RejectError

__all__ = ["VIDEO_DEFAULTS", "VideoOptions", "VideoSpec", "Video", "parse_video_part", "smart_nframes",
           "sample_indices", "frame_pixel_bounds", "video_smart_resize", "resize_frames", "load_video",
           "video_tokens", "encode_video"]

FACTOR = 28  # patch 14 x spatial merge 2
FRAME_FACTOR = 2  # temporal patch: frames per temporal grid step
MAX_SOURCE_FPS = 1000.0  # beyond this a stream's rate is a broken header, not a video
MAX_DURATION_S = 24 * 3600.0
MAX_ASPECT = 200


@dataclass(frozen=True)
class VideoOptions:
    """Sampling and size settings of one video. Defaults: qwen-vl-utils' (2 fps, 4..768 frames) and
    M2-Reasoning's per-frame bounds 128*28*28 .. 768*28*28. ``total_pixels``: the cap on frames x pixels
    (qwen-vl-utils' ``MODEL_SEQ_LEN * 28 * 28 * 0.9``); None = the preprocessing default."""

    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 768 * 28 * 28
    total_pixels: int | None = None


VIDEO_DEFAULTS = VideoOptions()
_KEYS = {f.name for f in fields(VideoOptions)}


@dataclass(frozen=True)
class VideoSpec:
    """A video part of a row: ``source`` is an absolute file path or a tuple of absolute frame paths;
    ``overrides`` the per-video settings given in the row."""

    source: str | tuple[str, ...]
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def is_file(self) -> bool:
        return isinstance(self.source, str)

    def options(self, defaults: VideoOptions = VIDEO_DEFAULTS) -> VideoOptions:
        return replace(defaults, **dict(self.overrides))

    def describe(self) -> str:
        return self.source if self.is_file else f"frame list [{self.source[0]}, ... ({len(self.source)} frames)]"


def _resolve(path: str, base_dir: str) -> str:
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base_dir, path))


def parse_video_part(part: dict, base_dir: str, where: str) -> VideoSpec:
    """Validate a ``{"type": "video", ...}`` content part (``bad_message`` naming ``where`` otherwise)."""
    src = part.get("video")
    if isinstance(src, str) and src:
        source: str | tuple[str, ...] = _resolve(src, base_dir)
    elif isinstance(src, list) and src and all(isinstance(p, str) and p for p in src):
        source = tuple(_resolve(p, base_dir) for p in src)
    else:
        raise RejectError("bad_message", f"{where}: video part needs 'video': a path or a non-empty list of frame "
                                         f"paths, got {src!r}"[:300])
    unknown = sorted(set(part) - _KEYS - {"type", "video"})
    if unknown:
        raise RejectError("bad_message", f"{where}: unknown video key(s) {unknown} (allowed: {sorted(_KEYS)})")
    over = {}
    for k in sorted(_KEYS & set(part)):
        v = part[k]
        if k == "fps":
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= MAX_SOURCE_FPS
        else:
            ok = isinstance(v, int) and not isinstance(v, bool) and v > 0
        if not ok:
            want = f"a number in (0, {MAX_SOURCE_FPS:g}]" if k == "fps" else "a positive integer"
            raise RejectError("bad_message", f"{where}: video '{k}' must be {want}, got {v!r}")
        over[k] = float(v) if k == "fps" else v
    if not isinstance(source, str) and {"min_frames", "max_frames"} & set(over):
        raise RejectError("bad_message", f"{where}: min_frames/max_frames apply to video files; a frame list "
                                         "uses every frame it lists")
    if over.get("min_pixels", 1) > over.get("max_pixels", math.inf):
        raise RejectError("bad_message", f"{where}: video min_pixels {over['min_pixels']} > max_pixels "
                                         f"{over['max_pixels']}")
    return VideoSpec(source, tuple(sorted(over.items())))


# ----------------------------------------------------------------------------------- qwen-vl-utils rules


def _ceil(x: float, f: int) -> int:
    return math.ceil(x / f) * f


def _floor(x: float, f: int) -> int:
    return math.floor(x / f) * f


def smart_nframes(total_frames: int, video_fps: float, opts: VideoOptions) -> int:
    """How many frames to sample from a file (qwen-vl-utils ``smart_nframes``, ``fps`` mode)."""
    min_frames = _ceil(opts.min_frames, FRAME_FACTOR)
    max_frames = _floor(min(opts.max_frames, total_frames), FRAME_FACTOR)
    n = total_frames / video_fps * opts.fps
    n = _floor(min(min(max(n, min_frames), max_frames), total_frames), FRAME_FACTOR)
    if not FRAME_FACTOR <= n <= total_frames:
        raise ValueError(f"nframes should be in [{FRAME_FACTOR}, {total_frames}], got {n}")
    return n


def sample_indices(total_frames: int, nframes: int) -> list[int]:
    """``torch.linspace(0, total - 1, nframes).round()`` (float32, round half to even, as qwen-vl-utils)."""
    import torch

    return torch.linspace(0, total_frames - 1, nframes).round().long().tolist()


def frame_pixel_bounds(nframes: int, opts: VideoOptions, total_pixels: float) -> tuple[int, float]:
    """Per-frame (min_pixels, max_pixels) for ``nframes`` frames (qwen-vl-utils ``fetch_video``).

    qwen-vl-utils caps a requested ``max_pixels`` at its default 768*28*28; here a larger request is
    honoured (the cap is the larger of the two), otherwise the rule is the same."""
    cap = max(opts.max_pixels, VIDEO_DEFAULTS.max_pixels)
    limit = max(min(cap, total_pixels / nframes * FRAME_FACTOR), int(opts.min_pixels * 1.05))
    return opts.min_pixels, min(opts.max_pixels, limit)


def video_smart_resize(h: int, w: int, min_pixels: float, max_pixels: float) -> tuple[int, int]:
    """qwen-vl-utils' ``smart_resize`` (its variant: sides rounded up to at least 28 before the bounds)."""
    if max(h, w) / min(h, w) > MAX_ASPECT:
        raise ValueError(f"aspect ratio {max(h, w) / min(h, w):.1f} exceeds {MAX_ASPECT}")
    hb, wb = max(FACTOR, round(h / FACTOR) * FACTOR), max(FACTOR, round(w / FACTOR) * FACTOR)
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb, wb = _floor(h / beta, FACTOR), _floor(w / beta, FACTOR)
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb, wb = _ceil(h * beta, FACTOR), _ceil(w * beta, FACTOR)
    if hb < FACTOR or wb < FACTOR:
        raise ValueError(f"{w}x{h} resizes to {wb}x{hb}, below one {FACTOR}-pixel patch")
    return hb, wb


def resize_frames(frames: np.ndarray, h: int, w: int) -> np.ndarray:
    """uint8 ``[T, H, W, 3]`` -> ``[T, h, w, 3]`` as torchvision's ``resize(BICUBIC, antialias=True)`` on a
    uint8 tensor (float32 interpolate, clamp, round); the same size is returned as is, as there."""
    import torch
    import torch.nn.functional as F

    if frames.shape[1:3] == (h, w):
        return frames
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    y = F.interpolate(x, size=[h, w], mode="bicubic", align_corners=False, antialias=True)
    return y.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def video_tokens(nframes: int, h: int, w: int) -> int:
    """``<|video_pad|>`` tokens of ``nframes`` frames (padded to the temporal patch) at ``h x w`` pixels."""
    return _ceil(nframes, FRAME_FACTOR) // FRAME_FACTOR * (h // FACTOR) * (w // FACTOR)


# ----------------------------------------------------------------------------------- loading


@dataclass
class Video:
    """A sampled, resized video: ``frames`` uint8 ``[T, H, W, 3]`` (T even), ``fps`` the rate they stand
    for, ``indices`` the source frames used, ``source_fps`` / ``total_frames`` of the source."""

    frames: np.ndarray
    fps: float
    indices: list[int]
    source_fps: float
    total_frames: int

    @property
    def second_per_grid(self) -> float:
        """Seconds per temporal grid step (HF's ``second_per_grid_ts``: temporal patch / fps)."""
        return FRAME_FACTOR / self.fps

    @property
    def grid(self) -> tuple[int, int, int]:
        t, h, w = self.frames.shape[:3]
        return t // FRAME_FACTOR, h // 14, w // 14


def _check_budget(spec: VideoSpec, n: int, h: int, w: int, max_tokens: int | None) -> None:
    if max_tokens is not None and (need := video_tokens(n, h, w)) > max_tokens:
        raise RejectError("too_long", f"{spec.describe()}: {n} frames at {w}x{h} need {need} video tokens, "
                                      f"{max_tokens} left in --seq-length (lower the video's fps, max_frames "
                                      "or max_pixels)")


def _resized_size(spec: VideoSpec, h: int, w: int, lo: float, hi: float) -> tuple[int, int]:
    try:
        return video_smart_resize(h, w, lo, hi)
    except ValueError as e:
        raise RejectError("video_aspect", f"{spec.describe()} ({w}x{h}): {e}") from None


def load_video(spec: VideoSpec, defaults: VideoOptions = VIDEO_DEFAULTS, *, total_pixels: float,
               max_tokens: int | None = None, threads: int = 0) -> Video:
    """Decode, sample and resize ``spec`` (see the module docstring). ``total_pixels``: the frames x pixels
    cap when the video sets none; ``max_tokens``: the vision-token budget (checked before decoding);
    ``threads``: FFmpeg decoding threads (0 = FFmpeg's choice; 1 in pool workers)."""
    opts = spec.options(defaults)
    cap = float(opts.total_pixels if opts.total_pixels is not None else total_pixels)
    if spec.is_file:
        return _load_file(spec, opts, cap, max_tokens, threads)
    return _load_frames(spec, opts, cap, max_tokens)


def _frame(spec: VideoSpec, k: int, path: str):
    from .images import open_rgb

    try:
        return open_rgb(path, kind="video")
    except RejectError as e:
        raise RejectError(e.code, f"frame {k} of {spec.describe()}: {e.reason.split(': ', 1)[1]}") from None


def _load_frames(spec: VideoSpec, opts: VideoOptions, cap: float, max_tokens: int | None) -> Video:
    from PIL import Image

    paths = spec.source
    n = _ceil(len(paths), FRAME_FACTOR)
    try:  # the header alone: the budget is checked before any frame is decoded
        with Image.open(paths[0]) as im:
            w0, h0 = im.size
            if (im.getexif().get(0x0112) or 1) in (5, 6, 7, 8):  # EXIF orientations that swap the sides
                w0, h0 = h0, w0
    except Exception:
        _frame(spec, 0, paths[0])  # raises the reject that names the problem
        raise
    rh, rw = _resized_size(spec, h0, w0, *frame_pixel_bounds(n, opts, cap))
    _check_budget(spec, n, rh, rw, max_tokens)
    out: list[np.ndarray] = []
    for k, p in enumerate(paths):
        img = _frame(spec, k, p)
        if img.size != (w0, h0):
            raise RejectError("video_frame_size", f"{spec.describe()}: frame {k} is {img.size[0]}x{img.size[1]}, "
                                                  f"frame 0 is {w0}x{h0} (a frame list needs one size)")
        out.append(resize_frames(np.asarray(img, dtype=np.uint8)[None], rh, rw)[0])
    out += [out[-1]] * (n - len(out))  # an odd count: the last frame fills the temporal patch
    return Video(np.stack(out), opts.fps, list(range(len(paths))), opts.fps, len(paths))


def _probe(spec: VideoSpec):
    """(total frames, fps, height, width) from the container, without decoding."""
    import av

    path = spec.source
    try:
        with av.open(path) as c:
            if not c.streams.video:
                raise RejectError("video_corrupt", f"{path}: no video stream")
            s = c.streams.video[0]
            if s.codec_context is None:
                raise RejectError("video_codec", f"{path}: no decoder for codec tag "
                                                 f"{getattr(s, 'codec_tag', '?')!r} in this FFmpeg build")
            h, w = s.codec_context.height, s.codec_context.width
            listed = int(s.frames or 0)
            rate = s.average_rate or s.guessed_rate
            # decord and torchcodec index the packets; counting them needs no decoding.
            total = sum(1 for p in c.demux(s) if p.size)
    except RejectError:
        raise
    except av.error.FFmpegError as e:
        raise RejectError("video_corrupt", f"{path}: {type(e).__name__}: {e}") from None
    if listed and total < listed:
        raise RejectError("video_truncated", f"{path}: the index lists {listed} frames, {total} are present")
    if total < FRAME_FACTOR:
        raise RejectError("video_empty", f"{path}: {total} frame(s); a video needs at least {FRAME_FACTOR}")
    fps = float(rate) if rate else 0.0
    if not (0 < fps <= MAX_SOURCE_FPS) or not math.isfinite(fps):
        raise RejectError("video_duration", f"{path}: frame rate {fps!r} (header) is unusable")
    if total / fps > MAX_DURATION_S:
        raise RejectError("video_duration", f"{path}: {total} frames at {fps:g} fps = {total / fps:.0f} s "
                                            f"> {MAX_DURATION_S:.0f} s")
    if not (h > 0 and w > 0):
        raise RejectError("video_corrupt", f"{path}: frame size {w}x{h}")
    from PIL import Image

    if h * w > (Image.MAX_IMAGE_PIXELS or math.inf):  # the limit images have: one decoded frame is held
        raise RejectError("video_too_large", f"{path}: {w}x{h} frames exceed {Image.MAX_IMAGE_PIXELS} pixels")
    return total, fps, h, w


def _load_file(spec: VideoSpec, opts: VideoOptions, cap: float, max_tokens: int | None, threads: int) -> Video:
    import av

    path = spec.source
    if not os.path.isfile(path):
        raise RejectError("video_missing", path)
    total, fps, h, w = _probe(spec)
    try:
        n = smart_nframes(total, fps, opts)
    except ValueError as e:
        raise RejectError("video_empty", f"{path}: {e}") from None
    idx = sample_indices(total, n)
    lo, hi = frame_pixel_bounds(n, opts, cap)
    rh, rw = _resized_size(spec, h, w, lo, hi)
    _check_budget(spec, n, rh, rw, max_tokens)
    want: dict[int, list[int]] = {}
    for j, i in enumerate(idx):  # source frame -> output slot(s)
        want.setdefault(i, []).append(j)
    frames: list[np.ndarray | None] = [None] * n
    k = -1
    try:
        with av.open(path) as c:
            s = c.streams.video[0]
            s.codec_context.thread_count = threads
            for frame in c.decode(s):
                k += 1
                if k in want:
                    img = resize_frames(frame.to_ndarray(format="rgb24")[None], rh, rw)[0]
                    for j in want[k]:
                        frames[j] = img
                if k >= idx[-1]:
                    break
    except av.error.FFmpegError as e:
        raise RejectError("video_corrupt", f"{path}: frame {k + 1}: {type(e).__name__}: {e}") from None
    if k < idx[-1]:
        raise RejectError("video_truncated", f"{path}: decoded {k + 1} of {total} frames, frame {idx[-1]} is "
                                             "sampled")
    return Video(np.stack(frames), n / total * fps, idx, fps, total)


def encode_video(path: str, frames: np.ndarray, fps: float, codec: str = "libx264",
                 container_options: dict[str, str] | None = None, **options: str) -> None:
    """Write uint8 ``[T, H, W, 3]`` RGB frames as a video file at ``fps`` (PyAV; H.264 / yuv420p by
    default, H and W even). ``options``: codec options, e.g. ``crf="0"``; ``container_options``: the
    muxer's, e.g. ``{"movflags": "faststart"}``. Written under a temporary name and renamed, so a killed
    run leaves no half-written file."""
    import av

    frames = np.asarray(frames, dtype=np.uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"frames must be uint8 [T, H, W, 3] with T >= 1, got shape {frames.shape}")
    tmp = f"{path}.tmp{os.getpid()}{os.path.splitext(path)[1]}"
    try:
        with av.open(tmp, "w", options=container_options or {}) as c:
            s = c.add_stream(codec, rate=_fraction(fps), options=options)
            s.height, s.width = frames.shape[1:3]
            s.pix_fmt = "yuv420p" if codec in ("libx264", "h264", "mpeg4", "libvpx-vp9") else s.pix_fmt
            for f in frames:
                c.mux(s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
            c.mux(s.encode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _fraction(fps: float):
    from fractions import Fraction

    r = Fraction(fps).limit_denominator(1_000_000)
    if r <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    return r
