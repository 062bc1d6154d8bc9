// torch binding of m2mega._C: the vision packer: input checks, planning, CPU / CUDA dispatch and the
// vision-tower metadata. Bad input raises std::invalid_argument, which pybind11 turns into ValueError.
#include <torch/extension.h>

#include <array>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "lm_decode_cpu.h"
#include "vision_pack_cpu.h"
#include "vision_pack_kernels.h"
#include "vision_pack_plan.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

#ifdef M2MEGA_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "vision_pack_cuda.h"
#endif

namespace {

using m2vp::ImagePlan;
using Grid = std::array<int64_t, 3>;
using Metadata = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

[[noreturn]] void bad(const std::string& msg) { throw std::invalid_argument(msg); }

std::string shape_str(const at::Tensor& t) {
  std::string s = "(";
  for (int64_t d = 0; d < t.dim(); ++d) s += (d ? ", " : "") + std::to_string(t.size(d));
  return s + ")";
}

// The output is large (about 8 bytes per resized pixel and channel) and freshly allocated, so on 4 KiB
// pages its first touch costs more than computing it (one fault per page). Asking for transparent huge
// pages on the 2 MiB-aligned interior (best effort, the output is ours) makes that 512x fewer faults
// and also relieves the TLB during the patch-order scatter.
void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t huge = uintptr_t{2} << 20;
  if (bytes < 2 * huge) return;
  const uintptr_t b = (reinterpret_cast<uintptr_t>(p) + huge - 1) & ~(huge - 1);
  const uintptr_t e = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(huge - 1);
  if (e > b) (void)madvise(reinterpret_cast<void*>(b), e - b, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

std::vector<m2vp::InputShape> check_images(const std::vector<at::Tensor>& images) {
  if (images.empty()) bad("images must be a non-empty list of uint8 [H, W, 3] / [T, H, W, 3] tensors");
  std::vector<m2vp::InputShape> shapes;
  for (size_t i = 0; i < images.size(); ++i) {
    const at::Tensor& t = images[i];
    const std::string tag = "image " + std::to_string(i) + ": ";
    if (t.scalar_type() != at::kByte) bad(tag + "expected dtype torch.uint8, got " + std::string(c10::toString(t.scalar_type())));
    if (t.dim() != 3 && t.dim() != 4) bad(tag + "expected [H, W, 3] or [T, H, W, 3], got shape " + shape_str(t));
    if (t.size(-1) != 3) bad(tag + "expected 3 channels (RGB, channels last), got shape " + shape_str(t));
    if (t.device() != images[0].device()) bad(tag + "not on the same device as image 0");
    const int64_t frames = t.dim() == 4 ? t.size(0) : 1;
    if (frames == 0 || t.size(-3) == 0 || t.size(-2) == 0) bad(tag + "zero-size image, shape " + shape_str(t));
    if (t.size(-3) > INT32_MAX / 4 || t.size(-2) > INT32_MAX / 4 || frames > INT32_MAX / 4) bad(tag + "too large");
    shapes.push_back({frames, t.size(-3), t.size(-2)});
  }
  return shapes;
}

void check_geometry(int64_t patch, int64_t tp, int64_t merge, int64_t window) {
  if (patch <= 0 || tp <= 0 || merge <= 0) bad("patch_size, temporal_patch_size and merge_size must be positive");
  if (window <= 0 || window % (merge * patch) != 0) {
    bad("window_size " + std::to_string(window) + " must be a positive multiple of merge*patch = " +
        std::to_string(merge * patch));
  }
}

// cu_seqlens / window index / cu_window_seqlens / rotary ids exactly as HF's Qwen2.5-VL vision tower
// derives them (get_vision_cu_seqlens, get_vision_window_index, get_vision_position_ids). HF pads each
// image to whole windows and drops the empty ones with unique_consecutive; skipping empty windows here
// gives the same list.
Metadata metadata_from_grids(const std::vector<Grid>& grids, int64_t merge, int64_t window, int64_t patch) {
  const int64_t unit = merge * merge, ws = window / merge / patch;
  int64_t frames = 0, patches = 0;
  for (const Grid& g : grids) {
    frames += g[0];
    patches += g[0] * g[1] * g[2];
  }
  at::Tensor cu = at::empty({frames + 1}, at::kInt);
  at::Tensor widx = at::empty({patches / unit}, at::kLong);
  at::Tensor rot = at::empty({patches, 2}, at::kLong);
  std::vector<int32_t> cuw{0};
  int32_t* cu_p = cu.data_ptr<int32_t>();
  int64_t* w_p = widx.data_ptr<int64_t>();
  int64_t* r_p = rot.data_ptr<int64_t>();
  int64_t total = 0, base = 0;
  cu_p[0] = 0;
  for (const Grid& g : grids) {
    const int64_t t = g[0], h = g[1], w = g[2], lh = h / merge, lw = w / merge;
    for (int64_t tt = 0; tt < t; ++tt) {
      total += h * w;
      *++cu_p = static_cast<int32_t>(total);
      for (int64_t wh = 0; wh * ws < lh; ++wh) {
        for (int64_t ww = 0; ww * ws < lw; ++ww) {
          int64_t count = 0;
          for (int64_t r = wh * ws; r < std::min(lh, (wh + 1) * ws); ++r) {
            for (int64_t c = ww * ws; c < std::min(lw, (ww + 1) * ws); ++c, ++count) {
              *w_p++ = base + tt * lh * lw + r * lw + c;
            }
          }
          cuw.push_back(static_cast<int32_t>(cuw.back() + count * unit));
        }
      }
      for (int64_t q = 0; q < h * w; ++q) {
        const int64_t blk = q / unit, inb = q % unit;
        *r_p++ = (blk / lw) * merge + inb / merge;
        *r_p++ = (blk % lw) * merge + inb % merge;
      }
    }
    base += t * lh * lw;
  }
  at::Tensor cuw_t = at::empty({static_cast<int64_t>(cuw.size())}, at::kInt);
  std::copy(cuw.begin(), cuw.end(), cuw_t.data_ptr<int32_t>());
  return {cu, widx, cuw_t, rot};
}

Metadata vision_metadata(const at::Tensor& grid_thw, int64_t merge, int64_t window, int64_t patch) {
  check_geometry(patch, 1, merge, window);
  if (grid_thw.dim() != 2 || grid_thw.size(1) != 3) bad("grid_thw must be [n, 3], got shape " + shape_str(grid_thw));
  at::Tensor g = grid_thw.to(at::kCPU, at::kLong).contiguous();
  std::vector<Grid> grids;
  const int64_t* p = g.data_ptr<int64_t>();
  for (int64_t i = 0; i < g.size(0); ++i) {
    const Grid gr{p[3 * i], p[3 * i + 1], p[3 * i + 2]};
    if (gr[0] <= 0 || gr[1] <= 0 || gr[2] <= 0 || gr[1] % merge || gr[2] % merge) {
      bad("grid_thw[" + std::to_string(i) + "]: need t, h, w > 0 and h, w multiples of " + std::to_string(merge));
    }
    grids.push_back(gr);
  }
  pybind11::gil_scoped_release no_gil;
  return metadata_from_grids(grids, merge, window, patch);
}

using PackResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// mode: 0 = the native path for the images' device, 1 = CPU emulation of the CUDA kernels (tests).
PackResult vision_pack_impl(const std::vector<at::Tensor>& images_in, int64_t min_pixels, int64_t max_pixels,
                            int64_t patch, int64_t tp, int64_t merge, int64_t window, const at::Tensor& lut_in,
                            bool bf16, int mode) {
  check_geometry(patch, tp, merge, window);
  if (min_pixels <= 0 || max_pixels < min_pixels) bad("need 0 < min_pixels <= max_pixels");
  if (lut_in.scalar_type() != at::kFloat || lut_in.numel() != 3 * 256) bad("lut must be float32 [3, 256]");
  const std::vector<m2vp::InputShape> shapes = check_images(images_in);
  const m2vp::BatchPlan plan = m2vp::make_plan(shapes, min_pixels, max_pixels, static_cast<int32_t>(patch),
                                               static_cast<int32_t>(tp), static_cast<int32_t>(merge));
  std::vector<at::Tensor> images;
  for (const at::Tensor& t : images_in) images.push_back(t.contiguous());
  const at::Device device = images[0].device();

  at::Tensor lut = lut_in.to(at::kCPU).contiguous();
  at::Tensor lut_bf16 = at::empty({3 * 256}, at::kShort);
  for (int64_t k = 0; k < 3 * 256; ++k) {
    lut_bf16.data_ptr<int16_t>()[k] = static_cast<int16_t>(m2vp::float_to_bf16_bits(lut.data_ptr<float>()[k]));
  }
  const int64_t dim = 3 * tp * patch * patch;
  const auto out_dtype = bf16 ? at::kBFloat16 : at::kFloat;

  std::vector<Grid> grids;
  at::Tensor grid_thw = at::empty({static_cast<int64_t>(shapes.size()), 3}, at::kLong);
  for (size_t i = 0; i < plan.images.size(); ++i) {
    const ImagePlan& im = plan.images[i];
    grids.push_back({im.gt, im.gh, im.gw});
    for (int k = 0; k < 3; ++k) grid_thw.data_ptr<int64_t>()[3 * i + k] = grids.back()[k];
  }

  at::Tensor out;
  if (device.is_cpu()) {
    out = at::empty({plan.num_patches, dim}, at::TensorOptions().dtype(out_dtype));
    advise_huge_pages(out.data_ptr(), out.nbytes());
    std::vector<const uint8_t*> srcs;
    for (const at::Tensor& t : images) srcs.push_back(t.data_ptr<uint8_t>());
    const void* l = bf16 ? static_cast<const void*>(lut_bf16.data_ptr<int16_t>()) : lut.data_ptr<float>();
    const int threads = at::get_num_threads();
    pybind11::gil_scoped_release no_gil;
    if (mode == 1) {
      m2vp::pack_emulate_cuda(plan.images, srcs, plan.coefs, plan.tmp_pixels, plan.num_patches, l, bf16,
                              out.data_ptr(), patch, tp, merge, threads);
    } else {
      m2vp::pack_cpu(plan.images, srcs, plan.coefs, l, bf16, out.data_ptr(), patch, tp, merge, threads);
    }
  } else {
#ifdef M2MEGA_WITH_CUDA
    if (!device.is_cuda() || mode != 0) bad("the CUDA packer needs CUDA tensors");
    const c10::cuda::CUDAGuard guard(device);
    const auto on_dev = [&](const at::Tensor& t) { return t.to(device); };
    at::Tensor plans_d = on_dev(at::from_blob(const_cast<ImagePlan*>(plan.images.data()),
                                              {static_cast<int64_t>(plan.images.size() * sizeof(ImagePlan))},
                                              at::kByte).clone());
    at::Tensor coefs_d = on_dev(at::from_blob(const_cast<int32_t*>(plan.coefs.data()),
                                              {static_cast<int64_t>(std::max<size_t>(plan.coefs.size(), 1))},
                                              at::kInt).clone());
    at::Tensor ptrs = at::empty({static_cast<int64_t>(images.size())}, at::kLong);
    for (size_t i = 0; i < images.size(); ++i) {
      ptrs.data_ptr<int64_t>()[i] = reinterpret_cast<int64_t>(images[i].data_ptr<uint8_t>());
    }
    at::Tensor ptrs_d = on_dev(ptrs);
    at::Tensor lut_d = on_dev(lut), lut_bf16_d = on_dev(lut_bf16);
    at::Tensor tmp = at::empty({std::max<int64_t>(plan.tmp_pixels, 1) * 3}, at::TensorOptions().dtype(at::kByte).device(device));
    out = at::empty({plan.num_patches, dim}, at::TensorOptions().dtype(out_dtype).device(device));
    void* stream = c10::cuda::getCurrentCUDAStream().stream();
    const auto* plans_p = reinterpret_cast<const ImagePlan*>(plans_d.data_ptr<uint8_t>());
    const auto* srcs_p = reinterpret_cast<const uint8_t* const*>(ptrs_d.data_ptr<int64_t>());
    const int n = static_cast<int>(plan.images.size());
    if (const char* err = m2vp::launch_stage1_cuda(plans_p, n, srcs_p, coefs_d.data_ptr<int32_t>(),
                                                   tmp.data_ptr<uint8_t>(), plan.tmp_pixels, stream)) {
      throw std::runtime_error(std::string("vision_pack stage-1 kernel: ") + err);
    }
    if (const char* err = m2vp::launch_pack_cuda(
            plans_p, n, srcs_p, coefs_d.data_ptr<int32_t>(), tmp.data_ptr<uint8_t>(), lut_d.data_ptr<float>(),
            reinterpret_cast<const uint16_t*>(lut_bf16_d.data_ptr<int16_t>()), out.data_ptr(), bf16,
            plan.num_patches, static_cast<int>(patch), static_cast<int>(tp), static_cast<int>(merge), stream)) {
      throw std::runtime_error(std::string("vision_pack kernel: ") + err);
    }
#else
    bad("images are on " + device.str() + " but m2mega._C was built without CUDA");
#endif
  }
  Metadata meta;
  {
    pybind11::gil_scoped_release no_gil;
    meta = metadata_from_grids(grids, merge, window, patch);
  }
  if (!device.is_cpu()) {
    return {out, grid_thw.to(device), std::get<0>(meta).to(device), std::get<1>(meta).to(device),
            std::get<2>(meta).to(device), std::get<3>(meta).to(device)};
  }
  return {out, grid_thw, std::get<0>(meta), std::get<1>(meta), std::get<2>(meta), std::get<3>(meta)};
}

PackResult vision_pack(const std::vector<at::Tensor>& images, int64_t min_pixels, int64_t max_pixels, int64_t patch,
                       int64_t tp, int64_t merge, int64_t window, const at::Tensor& lut, bool bf16) {
  return vision_pack_impl(images, min_pixels, max_pixels, patch, tp, merge, window, lut, bf16, 0);
}

PackResult vision_pack_emulate_cuda(const std::vector<at::Tensor>& images, int64_t min_pixels, int64_t max_pixels,
                                    int64_t patch, int64_t tp, int64_t merge, int64_t window, const at::Tensor& lut,
                                    bool bf16) {
  for (size_t i = 0; i < images.size(); ++i) {
    if (!images[i].device().is_cpu()) bad("image " + std::to_string(i) + ": the CUDA emulation runs on CPU tensors");
  }
  return vision_pack_impl(images, min_pixels, max_pixels, patch, tp, merge, window, lut, bf16, 1);
}

bool vision_pack_has_cuda() {
#ifdef M2MEGA_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "m2mega compiled ops (see m2mega/ops)";
  m.def("vision_pack", &vision_pack, "Pack a ragged batch of uint8 images for the Qwen2.5-VL vision tower");
  m.def("vision_pack_emulate_cuda", &vision_pack_emulate_cuda,
        "Run the CUDA packer's per-element code on the CPU (tests the GPU indexing without a GPU)");
  m.def("vision_metadata", &vision_metadata, "cu_seqlens, window index, cu_window_seqlens, rotary ids from grids");
  m.def("vision_pack_has_cuda", &vision_pack_has_cuda, "Whether the CUDA kernels were compiled in");
  m.def("smart_resize", [](int64_t h, int64_t w, int64_t factor, int64_t min_p, int64_t max_p) {
    return m2vp::smart_resize(h, w, factor, min_p, max_p);
  }, "HF Qwen2-VL smart_resize (C++ twin of m2mega.ops.smart_resize)");
  register_lm_decode(m);  // the rollout engine's fused CPU decode step (lm_decode_cpu.cpp)
}
