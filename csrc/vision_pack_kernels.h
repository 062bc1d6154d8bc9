// Per-element arithmetic of the vision packer, shared verbatim by the CUDA kernels
// (vision_pack_cuda.cu), the CPU emulation of those kernels (vision_pack.cpp, used by the tests to
// check the GPU indexing on machines without a GPU) and, for the resample taps, the CPU fast path.
// Plain C++ only (no torch, no CUDA headers) so nvcc and g++ both compile it.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define VP_HD __host__ __device__ __forceinline__
#else
#define VP_HD inline
#endif

namespace m2vp {

// Which 1-D Pillow pass a stage runs. Stage 1 writes a uint8 intermediate; stage 2 reads it (or the
// input directly when stage 1 is kNone) and feeds normalise + patchify.
enum Pass : int32_t { kNone = 0, kHoriz = 1, kVert = 2 };

constexpr int kPrecisionBits = 22;  // Pillow: 32 - 8 - 2

// One image (or video) of the batch. Plain old data: copied as bytes to the GPU, so the layout is
// fixed (int64 fields first, no padding) and checked by the static_assert below.
struct ImagePlan {
  int64_t patch_off;    // first row of this image in pixel_values
  int64_t tmp_pix_off;  // first stage-1 pixel of this image in the batch intermediate buffer
  int64_t h_coef;       // offset of the horizontal coefficient rows in the coefficient table
  int64_t v_coef;       // offset of the vertical coefficient rows
  int32_t frames, in_h, in_w, out_h, out_w;
  int32_t gt, gh, gw;  // grid in patches (gt = frame groups)
  int32_t stage1, stage2;
  int32_t tmp_rows, tmp_cols, tmp_row0;  // stage-1 output: rows x cols pixels; first source row used
  int32_t h_stride, v_stride;            // coefficient row length: 2 + ksize ([first, count, w...])
  int32_t pad_;
};
static_assert(sizeof(ImagePlan) == 4 * 8 + 16 * 4, "ImagePlan layout must be identical on host and device");

VP_HD uint8_t clip8(int32_t acc) {
  // Pillow's clip8: acc >> 22 clamped to [0, 255] (its lookup table covers exactly this).
  int32_t v = acc >> kPrecisionBits;
  return static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
}

// One output sample of a Pillow 8bpc pass: taps p[0], p[step], ... weighted by the fixed-point row
// `c` = [first, count, w0, w1, ...]; `p` already points at the first tap. Integer math: exact on any
// device, in any order.
VP_HD uint8_t resample_taps(const uint8_t* p, int64_t step, const int32_t* c) {
  int32_t acc = 1 << (kPrecisionBits - 1);
  const int32_t n = c[1];
  for (int32_t j = 0; j < n; ++j) acc += static_cast<int32_t>(p[j * step]) * c[2 + j];
  return clip8(acc);
}

// Stage 1: the intermediate pixel `local` (flat over frames x tmp_rows x tmp_cols) of one image, three
// channels. `src` is the image's uint8 [frames, in_h, in_w, 3], `dst` its slice of the intermediate.
VP_HD void stage1_pixel(const ImagePlan& im, const uint8_t* src, const int32_t* coefs, uint8_t* dst,
                        int64_t local) {
  const int64_t per_frame = static_cast<int64_t>(im.tmp_rows) * im.tmp_cols;
  const int64_t f = local / per_frame;
  const int64_t rem = local - f * per_frame;
  const int64_t r = rem / im.tmp_cols;
  const int64_t x = rem - r * im.tmp_cols;
  const int64_t row_bytes = static_cast<int64_t>(im.in_w) * 3;
  const uint8_t* frame = src + f * im.in_h * row_bytes;
  uint8_t* out = dst + local * 3;
  if (im.stage1 == kHoriz) {
    const int32_t* c = coefs + im.h_coef + x * im.h_stride;
    const uint8_t* p = frame + (r + im.tmp_row0) * row_bytes + static_cast<int64_t>(c[0]) * 3;
    for (int ch = 0; ch < 3; ++ch) out[ch] = resample_taps(p + ch, 3, c);
  } else {  // kVert
    const int32_t* c = coefs + im.v_coef + r * im.v_stride;
    const uint8_t* p = frame + static_cast<int64_t>(c[0]) * row_bytes + x * 3;
    for (int ch = 0; ch < 3; ++ch) out[ch] = resample_taps(p + ch, row_bytes, c);
  }
}

// Stage 2: the three resized uint8 channels of output pixel (f, y, x). `tmp` is this image's stage-1
// slice (ignored when stage1 == kNone, then the pass reads `src`).
VP_HD void stage2_pixel(const ImagePlan& im, const uint8_t* src, const uint8_t* tmp, const int32_t* coefs,
                        int64_t f, int64_t y, int64_t x, uint8_t out[3]) {
  const bool from_tmp = im.stage1 != kNone;
  const uint8_t* base = from_tmp ? tmp : src;
  const int64_t rows = from_tmp ? im.tmp_rows : im.in_h;
  const int64_t cols = from_tmp ? im.tmp_cols : im.in_w;
  const int64_t row0 = from_tmp ? im.tmp_row0 : 0;
  const int64_t row_bytes = cols * 3;
  const uint8_t* frame = base + f * rows * row_bytes;
  if (im.stage2 == kHoriz) {
    const int32_t* c = coefs + im.h_coef + x * im.h_stride;
    const uint8_t* p = frame + (y - row0) * row_bytes + static_cast<int64_t>(c[0]) * 3;
    for (int ch = 0; ch < 3; ++ch) out[ch] = resample_taps(p + ch, 3, c);
  } else if (im.stage2 == kVert) {
    const int32_t* c = coefs + im.v_coef + y * im.v_stride;
    const uint8_t* p = frame + (static_cast<int64_t>(c[0]) - row0) * row_bytes + x * 3;
    for (int ch = 0; ch < 3; ++ch) out[ch] = resample_taps(p + ch, row_bytes, c);
  } else {
    const uint8_t* p = frame + (y - row0) * row_bytes + x * 3;
    for (int ch = 0; ch < 3; ++ch) out[ch] = p[ch];
  }
}

// float -> bfloat16 bits, round to nearest even (torch's Tensor.to(torch.bfloat16) for finite values).
VP_HD uint16_t float_to_bf16_bits(float v) {
  union {
    float f;
    uint32_t u;
  } b;
  b.f = v;
  const uint32_t rounding = 0x7FFFu + ((b.u >> 16) & 1u);
  return static_cast<uint16_t>((b.u + rounding) >> 16);
}

// Index of the plan whose [offset, next offset) range holds `key` (offsets ascending, plans[0] = 0).
template <typename Get>
VP_HD int find_image(int n, int64_t key, Get offset_of) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (offset_of(mid) <= key) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Where pixel (py, px) of patch `q` (patch index within the image) comes from: the output row/column
// and the frame group. HF order: frame group, then 2x2-merge blocks row-major, then row-major inside a
// block.
struct PatchPos {
  int64_t tt, y, x;
};
VP_HD PatchPos patch_pixel(const ImagePlan& im, int64_t q, int32_t py, int32_t px, int32_t patch, int32_t merge) {
  const int64_t per_group = static_cast<int64_t>(im.gh) * im.gw;
  const int64_t tt = q / per_group;
  const int64_t q2 = q - tt * per_group;
  const int64_t unit = static_cast<int64_t>(merge) * merge;
  const int64_t blk = q2 / unit;
  const int64_t inb = q2 - blk * unit;
  const int64_t bw_count = im.gw / merge;
  const int64_t bh = blk / bw_count, bw = blk - (blk / bw_count) * bw_count;
  const int64_t mh = inb / merge, mw = inb - (inb / merge) * merge;
  return {tt, (bh * merge + mh) * patch + py, (bw * merge + mw) * patch + px};
}

// Stage-1 work item `e` of the whole batch (flat over all images' intermediate pixels).
VP_HD void stage1_element(const ImagePlan* plans, int n_images, const uint8_t* const* srcs, const int32_t* coefs,
                          uint8_t* tmp, int64_t e) {
  const int i = find_image(n_images, e, [&](int k) { return plans[k].tmp_pix_off; });
  const ImagePlan& im = plans[i];
  stage1_pixel(im, srcs[i], coefs, tmp + im.tmp_pix_off * 3, e - im.tmp_pix_off);
}

// Stage-2 work item: pixel `tid` = py * patch + px of global patch `gp`. Computes the resized pixel once
// per distinct source frame and writes its 3 channels x temporal_patch copies through the lookup table
// (`lut` = [3][256] output values). Slot t of frame group tt reads frame min(tt * tp + t, frames - 1):
// single images are duplicated, videos repeat their last frame to fill the last group (HF).
template <typename T>
VP_HD void pack_element(const ImagePlan* plans, int n_images, const uint8_t* const* srcs, const int32_t* coefs,
                        const uint8_t* tmp, const T* lut, T* out, int64_t gp, int32_t tid, int32_t patch,
                        int32_t tp, int32_t merge) {
  const int i = find_image(n_images, gp, [&](int k) { return plans[k].patch_off; });
  const ImagePlan& im = plans[i];
  const int32_t pp = patch * patch;
  const int32_t py = tid / patch, px = tid - (tid / patch) * patch;
  const PatchPos pos = patch_pixel(im, gp - im.patch_off, py, px, patch, merge);
  T* dst = out + gp * (static_cast<int64_t>(3) * tp * pp) + tid;
  int64_t last_f = -1;
  uint8_t v[3] = {0, 0, 0};
  for (int32_t t = 0; t < tp; ++t) {
    int64_t f = pos.tt * tp + t;
    if (f > im.frames - 1) f = im.frames - 1;
    if (f != last_f) {
      stage2_pixel(im, srcs[i], tmp + im.tmp_pix_off * 3, coefs, f, pos.y, pos.x, v);
      last_f = f;
    }
    for (int ch = 0; ch < 3; ++ch) dst[(static_cast<int64_t>(ch) * tp + t) * pp] = lut[ch * 256 + v[ch]];
  }
}

}  // namespace m2vp
