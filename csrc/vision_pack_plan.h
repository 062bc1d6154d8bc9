// Host-side planning for the vision packer (plain C++, no torch): HF's smart_resize, Pillow's bicubic
// coefficients, and the per-image ImagePlan table shared by the CPU and CUDA paths.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "vision_pack_kernels.h"

namespace m2vp {

constexpr double kMaxAspectRatio = 200.0;

// HF Qwen2-VL smart_resize with the same float64 operations. Python's round() is round-half-even,
// which is std::nearbyint under the default rounding mode; int / int true division is exact-rounded
// double division for operands below 2**53.
inline std::pair<int64_t, int64_t> smart_resize(int64_t height, int64_t width, int64_t factor, int64_t min_pixels,
                                                int64_t max_pixels) {
  if (height <= 0 || width <= 0) {
    throw std::invalid_argument("image size must be positive, got " + std::to_string(height) + "x" +
                                std::to_string(width));
  }
  const double ratio = static_cast<double>(std::max(height, width)) / static_cast<double>(std::min(height, width));
  if (ratio > kMaxAspectRatio) {
    throw std::invalid_argument("absolute aspect ratio must be smaller than 200, got " + std::to_string(ratio));
  }
  const double f = static_cast<double>(factor);
  int64_t h_bar = static_cast<int64_t>(std::nearbyint(static_cast<double>(height) / f)) * factor;
  int64_t w_bar = static_cast<int64_t>(std::nearbyint(static_cast<double>(width) / f)) * factor;
  const double area = static_cast<double>(height * width);
  if (h_bar * w_bar > max_pixels) {
    const double beta = std::sqrt(area / static_cast<double>(max_pixels));
    h_bar = std::max(factor, static_cast<int64_t>(std::floor(static_cast<double>(height) / beta / f)) * factor);
    w_bar = std::max(factor, static_cast<int64_t>(std::floor(static_cast<double>(width) / beta / f)) * factor);
  } else if (h_bar * w_bar < min_pixels) {
    const double beta = std::sqrt(static_cast<double>(min_pixels) / area);
    h_bar = static_cast<int64_t>(std::ceil(static_cast<double>(height) * beta / f)) * factor;
    w_bar = static_cast<int64_t>(std::ceil(static_cast<double>(width) * beta / f)) * factor;
  }
  return {h_bar, w_bar};
}

// The coefficient math must be plain IEEE double, one rounding per operation, as in Pillow's C: no
// contraction into fused multiply-adds (which would change last bits of the weights, hence pixels).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#elif defined(__clang__)
#pragma clang fp contract(off)
#endif

inline double pil_bicubic_filter(double x) {
  const double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

// Pillow's precompute_coeffs + normalize_coeffs_8bpc (full-image box), appended to `table` as one row
// per output position: [first source index, tap count, ksize fixed-point weights]. Returns the row length.
inline int32_t append_pil_bicubic_coeffs(int32_t in_size, int32_t out_size, std::vector<int32_t>& table) {
  const float in0 = 0.0f, in1 = static_cast<float>(in_size);
  const double scale = static_cast<double>(in1 - in0) / out_size;
  const double filterscale = scale < 1.0 ? 1.0 : scale;
  const double support = 2.0 * filterscale;
  const int32_t ksize = static_cast<int32_t>(std::ceil(support)) * 2 + 1;
  const double inv_filterscale = 1.0 / filterscale;
  std::vector<double> k(ksize);
  for (int32_t xx = 0; xx < out_size; ++xx) {
    const double center = in0 + (xx + 0.5) * scale;
    double ww = 0.0;
    int32_t xmin = static_cast<int32_t>(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int32_t xmax = static_cast<int32_t>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    int32_t x = 0;
    for (; x < xmax; ++x) {
      const double w = pil_bicubic_filter((x + xmin - center + 0.5) * inv_filterscale);
      k[x] = w;
      ww += w;
    }
    if (ww != 0.0) {
      for (x = 0; x < xmax; ++x) k[x] /= ww;
    }
    for (x = xmax; x < ksize; ++x) k[x] = 0;
    table.push_back(xmin);
    table.push_back(xmax);
    for (x = 0; x < ksize; ++x) {
      const double v = k[x] * (1 << kPrecisionBits);
      table.push_back(static_cast<int32_t>(k[x] < 0 ? -0.5 + v : 0.5 + v));
    }
  }
  return ksize + 2;
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

// One input of the batch as the planner sees it: frames x height x width x 3 uint8.
struct InputShape {
  int64_t frames, height, width;
};

struct BatchPlan {
  std::vector<ImagePlan> images;
  std::vector<int32_t> coefs;  // every image's coefficient rows (shared between equal size pairs)
  int64_t num_patches = 0;
  int64_t tmp_pixels = 0;  // stage-1 intermediate pixels (GPU path; the CPU path works in bands)
};

// Pillow 13's pass order: vertical first when the height loses more than twice as many pixels as the
// width (older Pillow always ran horizontal first).
inline bool pil_vertical_first(int64_t in_h, int64_t in_w, int64_t out_h, int64_t out_w) {
  return (in_h - out_h) > 0 && (in_h - out_h) > (in_w - out_w) * 2;
}

inline BatchPlan make_plan(const std::vector<InputShape>& shapes, int64_t min_pixels, int64_t max_pixels,
                           int32_t patch, int32_t tp, int32_t merge) {
  BatchPlan plan;
  std::map<std::pair<int32_t, int32_t>, std::pair<int64_t, int32_t>> cache;  // (in, out) -> (offset, stride)
  auto coeffs = [&](int64_t in, int64_t out) {
    const auto key = std::make_pair(static_cast<int32_t>(in), static_cast<int32_t>(out));
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
    const int64_t off = static_cast<int64_t>(plan.coefs.size());
    const int32_t stride = append_pil_bicubic_coeffs(key.first, key.second, plan.coefs);
    return cache[key] = {off, stride};
  };
  const int64_t factor = static_cast<int64_t>(patch) * merge;
  for (size_t i = 0; i < shapes.size(); ++i) {
    const InputShape& s = shapes[i];
    std::pair<int64_t, int64_t> out;
    try {
      out = smart_resize(s.height, s.width, factor, min_pixels, max_pixels);
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument("image " + std::to_string(i) + ": " + e.what());
    }
    if (out.first <= 0 || out.second <= 0) {
      throw std::invalid_argument("image " + std::to_string(i) + ": resizes to an empty image");
    }
    ImagePlan im{};
    im.frames = static_cast<int32_t>(s.frames);
    im.in_h = static_cast<int32_t>(s.height);
    im.in_w = static_cast<int32_t>(s.width);
    im.out_h = static_cast<int32_t>(out.first);
    im.out_w = static_cast<int32_t>(out.second);
    im.gt = static_cast<int32_t>((s.frames + tp - 1) / tp);
    im.gh = im.out_h / patch;
    im.gw = im.out_w / patch;
    const bool need_h = im.out_w != im.in_w, need_v = im.out_h != im.in_h;
    if (need_h) std::tie(im.h_coef, im.h_stride) = coeffs(im.in_w, im.out_w);
    if (need_v) std::tie(im.v_coef, im.v_stride) = coeffs(im.in_h, im.out_h);
    if (need_h && need_v) {
      if (pil_vertical_first(im.in_h, im.in_w, im.out_h, im.out_w)) {
        im.stage1 = kVert;
        im.stage2 = kHoriz;
        im.tmp_rows = im.out_h;
        im.tmp_cols = im.in_w;
        im.tmp_row0 = 0;
      } else {
        // Pillow resamples horizontally only the source rows the vertical pass will read.
        const int32_t* first = plan.coefs.data() + im.v_coef;
        const int32_t* last = first + static_cast<int64_t>(im.out_h - 1) * im.v_stride;
        im.stage1 = kHoriz;
        im.stage2 = kVert;
        im.tmp_row0 = first[0];
        im.tmp_rows = last[0] + last[1] - first[0];
        im.tmp_cols = im.out_w;
      }
    } else {  // one pass (or none): run it as stage 2, straight from the input
      im.stage1 = kNone;
      im.stage2 = need_h ? kHoriz : (need_v ? kVert : kNone);
    }
    im.patch_off = plan.num_patches;
    im.tmp_pix_off = plan.tmp_pixels;
    plan.num_patches += static_cast<int64_t>(im.gt) * im.gh * im.gw;
    if (im.stage1 != kNone) plan.tmp_pixels += s.frames * im.tmp_rows * im.tmp_cols;
    plan.images.push_back(im);
  }
  return plan;
}

}  // namespace m2vp
