"""Vision packing (csrc/ extension and torch reference) against HF's Qwen2-VL processor and vision tower.

HF's slow processor (PIL backend) is the oracle for pixels and grids; transformers.vision_utils (what
Qwen2_5_VisionTransformerPretrainedModel calls) is the oracle for cu_seqlens, window index and rotary ids.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from m2mega.ops import PackedImages, pack_images, smart_resize, vision_metadata
from m2mega.ops import vision_pack as vp
from m2mega.ops.vision_resample import pil_resize_bicubic, vertical_first

transformers = pytest.importorskip("transformers")
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_pil  # noqa: E402
from transformers.vision_utils import (  # noqa: E402
    get_vision_cu_seqlens,
    get_vision_position_ids,
    get_vision_window_index,
)

PIL = pytest.importorskip("PIL.Image")

BACKENDS = ["torch"] + (["ext"] if vp.extension_available() else [])
META_FIELDS = ("cu_seqlens", "window_index", "cu_window_seqlens", "rot_pos_ids")


def _hf_processor(**kw):
    return hf_pil.Qwen2VLImageProcessorPil(**kw)


def _hf_pack(images: list[np.ndarray], **kw):
    out = _hf_processor(**kw)(images=images, return_tensors="pt", input_data_format="channels_last")
    return out["pixel_values"], out["image_grid_thw"]


def _hf_metadata(grid_thw: torch.Tensor):
    window_index, cu_window = get_vision_window_index(grid_thw, spatial_merge_size=2, window_size=112, patch_size=14)
    return get_vision_cu_seqlens(grid_thw), window_index, cu_window, get_vision_position_ids(grid_thw, 2)


def _random_images(rng: np.random.Generator, sizes) -> list[np.ndarray]:
    images = []
    for k, (h, w) in enumerate(sizes):
        if k % 2:  # smooth content too, so resampling is not only fed noise
            yy, xx = np.mgrid[0:h, 0:w]
            base = (np.sin(yy / 7.0)[..., None] * 90 + np.cos(xx / 11.0)[..., None] * 90 + 128)
            img = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        else:
            img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        images.append(img)
    return images


def _assert_same_meta(packed: PackedImages, expected) -> None:
    for name, want in zip(META_FIELDS, expected):
        got = getattr(packed, name)
        assert got.dtype == want.dtype, (name, got.dtype, want.dtype)
        assert torch.equal(got, want), name


# ------------------------------------------------------------------------------------------------
# smart_resize and the Pillow-exact resize
# ------------------------------------------------------------------------------------------------


def test_smart_resize_matches_hf():
    rng = np.random.default_rng(0)
    cases = [(h, w) for h in (1, 2, 13, 14, 27, 28, 29, 42, 70, 111, 1000) for w in (1, 5, 28, 42, 150, 4000)]
    cases += [tuple(int(v) for v in rng.integers(1, 5000, 2)) for _ in range(400)]
    cases = [(h, w) for h, w in cases if max(h, w) / min(h, w) <= 200]
    bounds = [(56 * 56, 28 * 28 * 1280), (4 * 28 * 28, 16384 * 28 * 28), (100 * 28 * 28, 300 * 28 * 28)]
    for min_p, max_p in bounds:
        for h, w in cases:
            want = hf_pil.smart_resize(h, w, 28, min_p, max_p)
            assert smart_resize(h, w, 28, min_p, max_p) == want, (h, w, min_p, max_p)
            if vp.extension_available():
                assert tuple(vp._ext.smart_resize(h, w, 28, min_p, max_p)) == want, (h, w, min_p, max_p)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2001)
    if vp.extension_available():
        with pytest.raises(ValueError, match="aspect ratio"):
            vp._ext.smart_resize(2001, 10, 28, 3136, 1003520)


def test_torch_resize_is_bit_exact_with_pillow():
    rng = np.random.default_rng(1)
    cases = [(1, 1, 56, 56), (7, 3, 56, 84), (300, 40, 28, 280), (40, 300, 280, 28), (500, 500, 500, 501)]
    cases += [tuple(int(v) for v in rng.integers(1, 300, 4)) for _ in range(25)]
    seen_vertical_first = False
    for h, w, oh, ow in cases:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        want = np.asarray(PIL.fromarray(img).resize((ow, oh), PIL.BICUBIC))
        got = pil_resize_bicubic(torch.from_numpy(img), oh, ow).numpy()
        assert np.array_equal(got, want), (h, w, oh, ow, int((got != want).sum()))
        seen_vertical_first |= vertical_first(h, w, oh, ow) and ow != w
    assert seen_vertical_first  # both of Pillow 13's pass orders are covered


# ------------------------------------------------------------------------------------------------
# Full packing vs HF
# ------------------------------------------------------------------------------------------------

# tiny, below min_pixels, exact multiples, non-square both ways, near the 200:1 limit, and two
# images large enough that max_pixels forces a downscale (one with height shrinking > 2x the width,
# which makes Pillow 13 run the vertical pass first).
HF_SIZES = [(1, 1), (5, 9), (28, 28), (56, 56), (33, 100), (140, 37), (3, 590), (250, 1234), (1531, 1210),
            (3000, 400), (613, 611)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_pack_matches_hf_processor_and_vision_tower(backend):
    images = _random_images(np.random.default_rng(2), HF_SIZES)
    want_pixels, want_grid = _hf_pack(images)
    got = pack_images([torch.from_numpy(a) for a in images], backend=backend)
    assert got.grid_thw.dtype == torch.int64 and torch.equal(got.grid_thw, want_grid)
    assert got.pixel_values.dtype == torch.float32 and got.pixel_values.shape == want_pixels.shape
    assert (got.pixel_values - want_pixels).abs().max().item() == 0.0  # bit-exact (spec: < 1e-5)
    _assert_same_meta(got, _hf_metadata(want_grid))
    assert got.window_index.numel() == got.pixel_values.shape[0] // 4
    assert got.rot_pos_ids.shape == (got.pixel_values.shape[0], 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pack_custom_bounds_stats_and_bf16(backend):
    images = _random_images(np.random.default_rng(3), [(300, 200), (90, 700), (64, 64)])
    kw = dict(min_pixels=8 * 28 * 28, max_pixels=60 * 28 * 28, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3])
    want_pixels, want_grid = _hf_pack(images, **kw)
    tensors = [torch.from_numpy(a) for a in images]
    got = pack_images(tensors, backend=backend, **kw)
    assert torch.equal(got.grid_thw, want_grid) and torch.equal(got.pixel_values, want_pixels)
    bf = pack_images(tensors, backend=backend, dtype=torch.bfloat16, **kw)
    assert bf.pixel_values.dtype == torch.bfloat16
    assert torch.equal(bf.pixel_values, want_pixels.to(torch.bfloat16))  # HF's fp32 values, rounded once


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("frames", [4, 5, 1])
def test_video_frames_grouped_like_hf(backend, frames):
    """Frame group g holds frames 2g, 2g+1 in its two temporal slots (HF video patchify); an odd count
    repeats the last frame. Oracle: HF's image processor on each frame (which fills both slots with that
    frame), recombined slot by slot."""
    rng = np.random.default_rng(4 + frames)
    video = rng.integers(0, 256, (frames, 90, 130, 3), dtype=np.uint8)
    per_frame, grid = _hf_pack(list(video))
    n = int(grid[0, 1] * grid[0, 2])
    per_frame = per_frame.view(frames, n, 3, 2, 14, 14)
    groups = math.ceil(frames / 2)
    want = torch.empty(groups, n, 3, 2, 14, 14)
    for g in range(groups):
        for slot in range(2):
            f = min(2 * g + slot, frames - 1)
            want[g, :, :, slot] = per_frame[f, :, :, slot]
    got = pack_images([torch.from_numpy(video)], backend=backend)
    want_grid = torch.tensor([[groups, int(grid[0, 1]), int(grid[0, 2])]])
    assert torch.equal(got.grid_thw, want_grid)
    assert torch.equal(got.pixel_values, want.reshape(groups * n, 3 * 2 * 14 * 14))
    _assert_same_meta(got, _hf_metadata(want_grid))


def test_single_image_equals_two_frame_video_of_it():
    img = torch.from_numpy(np.random.default_rng(5).integers(0, 256, (77, 150, 3), dtype=np.uint8))
    for backend in BACKENDS:
        a = pack_images([img], backend=backend)
        b = pack_images([torch.stack([img, img])], backend=backend)
        assert torch.equal(a.pixel_values, b.pixel_values) and torch.equal(a.grid_thw, b.grid_thw)


# ------------------------------------------------------------------------------------------------
# Extension vs reference (mixed batches, videos, threads, layouts, the CUDA indexing on CPU)
# ------------------------------------------------------------------------------------------------


def _mixed_batch(seed: int):
    rng = np.random.default_rng(seed)
    sizes = [(int(rng.integers(1, 700)), int(rng.integers(1, 700))) for _ in range(10)] + [(1200, 300), (60, 1000)]
    batch = [torch.from_numpy(a) for a in _random_images(rng, [(h, w) for h, w in sizes if max(h, w) / min(h, w) <= 200])]
    batch.insert(3, torch.from_numpy(rng.integers(0, 256, (3, 200, 150, 3), dtype=np.uint8)))  # odd-length video
    batch.append(torch.from_numpy(rng.integers(0, 256, (2, 57, 300, 3), dtype=np.uint8)))
    return batch


def _assert_packed_equal(a: PackedImages, b: PackedImages) -> None:
    for name in ("pixel_values", "grid_thw") + META_FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x.cpu(), y.cpu()), name


@pytest.mark.skipif(not vp.extension_available(), reason="m2mega._C not built")
def test_extension_matches_torch_reference_on_mixed_batch():
    batch = _mixed_batch(6)
    kw = dict(min_pixels=4 * 28 * 28, max_pixels=400 * 28 * 28)
    ref = pack_images(batch, backend="torch", **kw)
    _assert_packed_equal(pack_images(batch, backend="ext", **kw), ref)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _assert_packed_equal(pack_images(batch, backend="ext", **kw), ref)
    finally:
        torch.set_num_threads(threads)
    # non-contiguous inputs (a strided crop) are accepted and give the same result as a copy
    view = batch[0][:, ::2] if batch[0].shape[1] > 2 else batch[0]
    _assert_packed_equal(pack_images([view], backend="ext", **kw), pack_images([view.contiguous()], backend="torch", **kw))


@pytest.mark.skipif(not vp.extension_available(), reason="m2mega._C not built")
def test_extension_baseline_isa_matches(monkeypatch):
    """The CPU kernels are built twice (baseline and AVX2, picked at run time); both are exact."""
    batch = _mixed_batch(10)[:6]
    kw = dict(min_pixels=4 * 28 * 28, max_pixels=300 * 28 * 28)
    fast = pack_images(batch, backend="ext", **kw)
    monkeypatch.setenv("M2MEGA_VISION_PACK_NO_AVX2", "1")
    _assert_packed_equal(pack_images(batch, backend="ext", **kw), fast)
    _assert_packed_equal(pack_images(batch, backend="torch", **kw), fast)


@pytest.mark.skipif(not vp.extension_available(), reason="m2mega._C not built")
@pytest.mark.parametrize("bf16", [False, True])
def test_cuda_kernel_code_emulated_on_cpu_matches(bf16):
    """The CUDA kernels' per-element functions (csrc/vision_pack_kernels.h), run on the CPU: checks the
    GPU path's indexing, stage split and temporal slots without a GPU."""
    batch = _mixed_batch(7)
    kw = dict(min_pixels=4 * 28 * 28, max_pixels=200 * 28 * 28)
    ref = pack_images(batch, backend="ext", dtype=torch.bfloat16 if bf16 else torch.float32, **kw)
    lut = vp.normalize_lut(vp.CLIP_MEAN, vp.CLIP_STD)
    got = vp._ext.vision_pack_emulate_cuda(batch, kw["min_pixels"], kw["max_pixels"], 14, 2, 2, 112, lut, bf16)
    _assert_packed_equal(PackedImages(*got), ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vision_metadata_matches_hf(backend):
    rng = np.random.default_rng(8)
    grids = [[1, 2, 2], [1, 16, 16], [3, 8, 12], [2, 34, 10], [1, 2, 200], [4, 18, 6]]
    grids += [[int(rng.integers(1, 4)), 2 * int(rng.integers(1, 40)), 2 * int(rng.integers(1, 40))] for _ in range(20)]
    g = torch.tensor(grids)
    got = vision_metadata(g, backend=backend)
    for name, x, y in zip(META_FIELDS, got, _hf_metadata(g)):
        assert x.dtype == y.dtype and torch.equal(x, y), name
    with pytest.raises(ValueError, match=r"grid_thw\[1\]"):
        vision_metadata(torch.tensor([[1, 4, 4], [1, 3, 4]]), backend=backend)


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------

_OK = torch.zeros(40, 50, 3, dtype=torch.uint8)
BAD = {
    "dtype": (torch.zeros(40, 50, 3, dtype=torch.float32), r"image 1: .*uint8"),
    "channels": (torch.zeros(40, 50, 4, dtype=torch.uint8), r"image 1: .*3 channels"),
    "gray": (torch.zeros(40, 50, dtype=torch.uint8), r"image 1: "),
    "zero_size": (torch.zeros(0, 50, 3, dtype=torch.uint8), r"image 1: zero-size"),
    "zero_frames": (torch.zeros(0, 40, 50, 3, dtype=torch.uint8), r"image 1: zero-size"),
    "aspect": (torch.zeros(2, 401, 3, dtype=torch.uint8), r"image 1: .*aspect ratio"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_input_raises_value_error_naming_the_image(backend, kind):
    bad, pattern = BAD[kind]
    with pytest.raises(ValueError, match=pattern):
        pack_images([_OK, bad, _OK], backend=backend)


@pytest.mark.skipif(not vp.extension_available(), reason="m2mega._C not built")
@pytest.mark.parametrize("kind", sorted(BAD))
def test_extension_validates_on_its_own(kind):
    """Called directly (no Python checks in front), the C++ binding raises the same ValueErrors."""
    bad, pattern = BAD[kind]
    lut = vp.normalize_lut(vp.CLIP_MEAN, vp.CLIP_STD)
    with pytest.raises(ValueError, match=pattern):
        vp._ext.vision_pack([_OK, bad, _OK], 3136, 1003520, 14, 2, 2, 112, lut, False)


def test_bad_arguments():
    with pytest.raises(ValueError, match="non-empty"):
        pack_images([])
    with pytest.raises(ValueError, match="image 0: expected a torch.Tensor"):
        pack_images([np.zeros((4, 4, 3), np.uint8)])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="dtype"):
        pack_images([_OK], dtype=torch.float16)
    with pytest.raises(ValueError, match="backend"):
        pack_images([_OK], backend="cuda")


# ------------------------------------------------------------------------------------------------
# GPU (skipped without CUDA)
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not vp.extension_has_cuda(), reason="m2mega._C built without CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(dtype):
    batch = _mixed_batch(9)
    kw = dict(min_pixels=4 * 28 * 28, max_pixels=800 * 28 * 28, dtype=dtype)
    cpu = pack_images(batch, backend="ext", **kw)
    gpu = pack_images([b.cuda() for b in batch], backend="ext", **kw)
    assert gpu.pixel_values.is_cuda and gpu.window_index.is_cuda
    _assert_packed_equal(gpu, cpu)
