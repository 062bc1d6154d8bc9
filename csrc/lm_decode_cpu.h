// Fused CPU decode step of the rollout engine's LM stage (see lm_decode_cpu.cpp).
#pragma once

#include <torch/extension.h>

#include <vector>

at::Tensor lm_decode_cpu(const at::Tensor& x, const at::Tensor& cos_table, const at::Tensor& sin_table,
                         const at::Tensor& rope_pos, const std::vector<at::Tensor>& weights,
                         const at::Tensor& k_slab, const at::Tensor& v_slab, const at::Tensor& cache_pos,
                         const at::Tensor& mask, int64_t span, int64_t groups, int64_t qpg, double eps,
                         double scale, const at::Tensor& final_ln, const at::Tensor& out_t);

// Adds lm_decode_cpu to the m2mega._C module (whose PYBIND11_MODULE is in vision_pack.cpp).
void register_lm_decode(pybind11::module& m);
