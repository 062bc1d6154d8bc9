// CPU vision packer: see vision_pack_cpu.h. Plain C++ + OpenMP; the torch binding is vision_pack.cpp.
#include "vision_pack_cpu.h"

#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

// A second copy of the kernels compiled for AVX2 (wider integer multiply-adds), chosen at run time.
#if defined(__x86_64__) && defined(__GNUC__)
#define VP_HAVE_AVX2_BUILD 1
#else
#define VP_HAVE_AVX2_BUILD 0
#endif

namespace m2vp {
namespace {

namespace cpu_generic {
#define VP_IMPL_AVX2 0
#include "vision_pack_cpu_impl.h"
#undef VP_IMPL_AVX2
}  // namespace cpu_generic

#if VP_HAVE_AVX2_BUILD
#pragma GCC push_options
#pragma GCC target("avx2")
namespace cpu_avx2 {
#define VP_IMPL_AVX2 1
#include "vision_pack_cpu_impl.h"
#undef VP_IMPL_AVX2
}  // namespace cpu_avx2
#pragma GCC pop_options
#endif

// M2MEGA_VISION_PACK_NO_AVX2=1 forces the baseline kernels (tests compare the two builds).
bool use_avx2() {
#if VP_HAVE_AVX2_BUILD
  static const bool cpu_has_avx2 = __builtin_cpu_supports("avx2");
  const char* off = std::getenv("M2MEGA_VISION_PACK_NO_AVX2");
  return cpu_has_avx2 && !(off != nullptr && off[0] == '1');
#else
  return false;
#endif
}

template <typename T>
void pack_cpu_dispatch(const std::vector<ImagePlan>& plans, const std::vector<const uint8_t*>& srcs,
                       const std::vector<int32_t>& coefs, const T* lut, T* out, int32_t patch, int32_t tp,
                       int32_t merge, int num_threads) {
#if VP_HAVE_AVX2_BUILD
  if (use_avx2()) {
    return cpu_avx2::pack_cpu_typed<T>(plans, srcs, coefs, lut, out, patch, tp, merge, num_threads);
  }
#endif
  cpu_generic::pack_cpu_typed<T>(plans, srcs, coefs, lut, out, patch, tp, merge, num_threads);
}

template <typename T>
void emulate_typed(const std::vector<ImagePlan>& plans, const std::vector<const uint8_t*>& srcs,
                   const std::vector<int32_t>& coefs, int64_t tmp_pixels, int64_t num_patches, const T* lut,
                   T* out, int32_t patch, int32_t tp, int32_t merge, int num_threads) {
  std::vector<uint8_t> tmp(static_cast<size_t>(std::max<int64_t>(tmp_pixels, 1)) * 3);
  const int n = static_cast<int>(plans.size());
  const int32_t pp = patch * patch;
#pragma omp parallel for num_threads(std::max(1, num_threads)) schedule(static)
  for (int64_t e = 0; e < tmp_pixels; ++e) {
    stage1_element(plans.data(), n, srcs.data(), coefs.data(), tmp.data(), e);
  }
#pragma omp parallel for num_threads(std::max(1, num_threads)) schedule(static)
  for (int64_t gp = 0; gp < num_patches; ++gp) {
    for (int32_t tid = 0; tid < pp; ++tid) {
      pack_element<T>(plans.data(), n, srcs.data(), coefs.data(), tmp.data(), lut, out, gp, tid, patch, tp, merge);
    }
  }
}

}  // namespace

void pack_cpu(const std::vector<ImagePlan>& plans, const std::vector<const uint8_t*>& srcs,
              const std::vector<int32_t>& coefs, const void* lut, bool bf16, void* out, int32_t patch,
              int32_t tp, int32_t merge, int num_threads) {
  if (bf16) {
    pack_cpu_dispatch<uint16_t>(plans, srcs, coefs, static_cast<const uint16_t*>(lut), static_cast<uint16_t*>(out),
                             patch, tp, merge, num_threads);
  } else {
    pack_cpu_dispatch<float>(plans, srcs, coefs, static_cast<const float*>(lut), static_cast<float*>(out), patch, tp,
                          merge, num_threads);
  }
}

void pack_emulate_cuda(const std::vector<ImagePlan>& plans, const std::vector<const uint8_t*>& srcs,
                       const std::vector<int32_t>& coefs, int64_t tmp_pixels, int64_t num_patches,
                       const void* lut, bool bf16, void* out, int32_t patch, int32_t tp, int32_t merge,
                       int num_threads) {
  if (bf16) {
    emulate_typed<uint16_t>(plans, srcs, coefs, tmp_pixels, num_patches, static_cast<const uint16_t*>(lut),
                            static_cast<uint16_t*>(out), patch, tp, merge, num_threads);
  } else {
    emulate_typed<float>(plans, srcs, coefs, tmp_pixels, num_patches, static_cast<const float*>(lut),
                         static_cast<float*>(out), patch, tp, merge, num_threads);
  }
}

}  // namespace m2vp
