// CPU vision packer (OpenMP): the same plan and integer arithmetic as the CUDA kernels, organised for
// caches instead of threads: each task is a band of output rows of one frame, resampled row by row
// into thread-local buffers and scattered straight into patch order.
#pragma once

#include <cstdint>
#include <vector>

#include "vision_pack_kernels.h"

namespace m2vp {

// `srcs[i]` is image i's contiguous uint8 [frames, in_h, in_w, 3]; `lut` holds [3][256] output values
// (float, or bfloat16 bits when `bf16`); `out` is [num_patches, 3 * tp * patch * patch].
void pack_cpu(const std::vector<ImagePlan>& plans, const std::vector<const uint8_t*>& srcs,
              const std::vector<int32_t>& coefs, const void* lut, bool bf16, void* out, int32_t patch,
              int32_t tp, int32_t merge, int num_threads);

// The CUDA kernels' per-element functions (stage1_element / pack_element) run on the CPU, so the
// GPU indexing is exercised by CPU tests. Slow (one pixel at a time); for tests only.
void pack_emulate_cuda(const std::vector<ImagePlan>& plans, const std::vector<const uint8_t*>& srcs,
                       const std::vector<int32_t>& coefs, int64_t tmp_pixels, int64_t num_patches,
                       const void* lut, bool bf16, void* out, int32_t patch, int32_t tp, int32_t merge,
                       int num_threads);

}  // namespace m2vp
