// Plain C++ launchers for the CUDA vision packer (vision_pack_cuda.cu). No torch types cross this
// boundary: the torch binding (vision_pack.cpp, under M2MEGA_WITH_CUDA) allocates device buffers and
// passes raw pointers plus the current stream. Each function returns nullptr on success or the CUDA
// error string.
#pragma once

#include <cstdint>

#include "vision_pack_kernels.h"

namespace m2vp {

// Stage 1 (first Pillow pass) for every image of the batch in one launch: `total_tmp_pix` threads
// write the uint8 intermediate `tmp` (3 bytes per pixel). Skipped images (stage1 == kNone) own no
// pixels in the flat range.
const char* launch_stage1_cuda(const ImagePlan* plans, int n_images, const uint8_t* const* srcs,
                               const int32_t* coefs, uint8_t* tmp, int64_t total_tmp_pix, void* stream);

// Stage 2 (second pass) + rescale/normalise (lookup table) + temporal duplication + patchify, one
// block per output patch for the whole batch. `lut_f32` is float[3][256]; `lut_bf16` the same values
// as bfloat16 bits. `out` is float or bfloat16 [num_patches, 3 * tp * patch * patch].
const char* launch_pack_cuda(const ImagePlan* plans, int n_images, const uint8_t* const* srcs,
                             const int32_t* coefs, const uint8_t* tmp, const float* lut_f32,
                             const uint16_t* lut_bf16, void* out, bool bf16, int64_t num_patches, int patch,
                             int temporal_patch, int merge, void* stream);

}  // namespace m2vp
