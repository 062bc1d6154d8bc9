// CUDA vision packer: Pillow-exact bicubic resize + rescale/normalise + temporal duplication + patchify
// for a ragged batch, two launches total (stage 1 for all images, then stage 2 fused with the rest).
// Includes only CUDA headers and the plain-C++ kernel header: torch is not needed to compile this file
// (`nvcc -gencode=arch=compute_90a,code=sm_90a -c csrc/vision_pack_cuda.cu` is a CI test).
//
// All floating point happens on the host (coefficients, lookup table), so --use_fast_math cannot change
// a single output bit: the kernels do integer taps and table lookups only.
#include <cuda_runtime.h>

#include <cstdint>

#include "vision_pack_cuda.h"
#include "vision_pack_kernels.h"

namespace m2vp {
namespace {

constexpr int kStage1Threads = 256;

__global__ void stage1_kernel(const ImagePlan* __restrict__ plans, int n_images,
                              const uint8_t* const* __restrict__ srcs, const int32_t* __restrict__ coefs,
                              uint8_t* __restrict__ tmp, int64_t total) {
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    stage1_element(plans, n_images, srcs, coefs, tmp, e);
  }
}

// One block per output patch, thread = pixel (py, px) of the patch (pack_element). For a fixed
// (channel, slot) consecutive threads write consecutive addresses, so the stores (the dominant
// traffic) coalesce.
template <typename T>
__global__ void pack_kernel(const ImagePlan* __restrict__ plans, int n_images,
                            const uint8_t* const* __restrict__ srcs, const int32_t* __restrict__ coefs,
                            const uint8_t* __restrict__ tmp, const T* __restrict__ lut, T* __restrict__ out,
                            int64_t num_patches, int patch, int tp, int merge) {
  const int tid = threadIdx.x;
  if (tid >= patch * patch) return;
  for (int64_t gp = blockIdx.x; gp < num_patches; gp += gridDim.x) {
    pack_element<T>(plans, n_images, srcs, coefs, tmp, lut, out, gp, tid, patch, tp, merge);
  }
}

int grid_for(int64_t work, int per_block) {
  int64_t blocks = (work + per_block - 1) / per_block;
  const int64_t cap = 1 << 30;  // grid-stride loops cover the rest
  return static_cast<int>(blocks < 1 ? 1 : (blocks > cap ? cap : blocks));
}

}  // namespace

const char* launch_stage1_cuda(const ImagePlan* plans, int n_images, const uint8_t* const* srcs,
                               const int32_t* coefs, uint8_t* tmp, int64_t total_tmp_pix, void* stream) {
  if (total_tmp_pix == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  stage1_kernel<<<grid_for(total_tmp_pix, kStage1Threads), kStage1Threads, 0, s>>>(plans, n_images, srcs, coefs,
                                                                                   tmp, total_tmp_pix);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

const char* launch_pack_cuda(const ImagePlan* plans, int n_images, const uint8_t* const* srcs,
                             const int32_t* coefs, const uint8_t* tmp, const float* lut_f32,
                             const uint16_t* lut_bf16, void* out, bool bf16, int64_t num_patches, int patch,
                             int temporal_patch, int merge, void* stream) {
  if (num_patches == 0) return nullptr;
  const int pp = patch * patch;
  if (pp > 1024) return "patch_size * patch_size must be <= 1024 for the CUDA packer";
  const int threads = (pp + 31) / 32 * 32;
  auto s = static_cast<cudaStream_t>(stream);
  const int blocks = grid_for(num_patches, 1);
  if (bf16) {
    pack_kernel<uint16_t><<<blocks, threads, 0, s>>>(plans, n_images, srcs, coefs, tmp, lut_bf16,
                                                     static_cast<uint16_t*>(out), num_patches, patch,
                                                     temporal_patch, merge);
  } else {
    pack_kernel<float><<<blocks, threads, 0, s>>>(plans, n_images, srcs, coefs, tmp, lut_f32,
                                                  static_cast<float*>(out), num_patches, patch, temporal_patch,
                                                  merge);
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace m2vp
