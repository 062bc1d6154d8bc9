// Fused CPU decode step of the rollout engine's language model (m2mega.inference.stage.LMStage.decode on
// a KVSlab, fp32, TP1): every layer of one decode step in one call.
//
// Why: on CPU at rollout batch sizes (8-64 rows) a decode step's matmuls are only about 60% of its time;
// the rest was about 30 small torch calls per layer (RMSNorm's ~10-op composite, rotary, the KV writes,
// the masked attention's views, matmuls and softmax), each paying Python and dispatcher overhead larger
// than its arithmetic. Here the matmuls stay ATen's (the same MKL calls as the torch path),
// softmax and SiLU stay ATen's vectorised kernels, and the glue is hand-written loops: RMSNorm, rotary
// fused with the KV-slab write, and attention that skips the masked columns of the slab (a slot's
// padding up to the step's span costs nothing). The loops are compiled for AVX-512, AVX2 and baseline
// x86-64 (GCC target_clones, picked at load time), since the extension is built without -march.
//
// Semantics are those of LMStage._layers + _slab_attend + _logits (the Python path stays the reference
// and the fallback; tests/test_fused_decode.py compares the two): RMSNorm -> QKV (+bias) -> rotary on the
// queries and key of each KV group (megatron's per-group [q.., k, v] layout; non-interleaved rotate-half
// with the sin table stored as [-sin, sin]) -> the key/value written at the slot's cache position ->
// softmax(q k^T * scale + mask) v over slab columns 0..span-1 -> output projection -> residual ->
// RMSNorm -> SwiGLU MLP -> residual; then the final RMSNorm and the output layer when given.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "lm_decode_cpu.h"

namespace {

// GCC >= 11 names the x86-64 levels; older GCC (a GPU image's toolchain may be one) gets the ISA names.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define M2_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#elif defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 6
#define M2_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define M2_CLONES
#endif

constexpr int kPerLayer = 10;  // ln1, wqkv_t, bqkv, wproj_t, bproj, ln2, wfc1_t, bfc1, wfc2_t, bfc2

[[noreturn]] void bad(const std::string& msg) { throw std::invalid_argument("lm_decode_cpu: " + msg); }

void need_f32(const at::Tensor& t, const char* name, int64_t dim) {
  if (!t.defined() || t.scalar_type() != at::kFloat || !t.device().is_cpu() || !t.is_contiguous() ||
      t.dim() != dim)
    bad(std::string(name) + " must be a contiguous fp32 CPU tensor of " + std::to_string(dim) + " dims");
}

// y = x * 1/sqrt(mean(x^2) + eps) * w, row by row (the model's RMSNorm: (x * rsqrt(...)) * w).
M2_CLONES void rms_rows(const float* x, const float* w, float* y, int64_t rows, int64_t width, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * width;
    float* yr = y + r * width;
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t c = 0; c < width; ++c) ss += xr[c] * xr[c];
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(width) + eps);
#pragma omp simd
    for (int64_t c = 0; c < width; ++c) yr[c] = (xr[c] * inv) * w[c];
  }
}

// out = t * cos + roll(t, D/2) * sin_signed (rotate-half with the sign folded into the table).
M2_CLONES void rope_row(const float* t, const float* cs, const float* sn, float* out, int64_t D) {
  const int64_t half = D / 2;
#pragma omp simd
  for (int64_t c = 0; c < half; ++c) out[c] = t[c] * cs[c] + t[c + half] * sn[c];
#pragma omp simd
  for (int64_t c = half; c < D; ++c) out[c] = t[c] * cs[c] + t[c - half] * sn[c];
}

// Scores of one (slot, KV group): s[h, t] = (q_h . k_t) * scale + mask[t]; -inf where the mask is.
M2_CLONES void group_scores(const float* q, const float* k, const float* mask, float* s, int64_t heads,
                            int64_t span, int64_t D, float scale) {
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < span; ++t) {
    const float* kt = k + t * D;
    for (int64_t h = 0; h < heads; ++h) {
      if (mask[t] == ninf) {
        s[h * span + t] = ninf;
        continue;
      }
      const float* qh = q + h * D;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t c = 0; c < D; ++c) dot += qh[c] * kt[c];
      s[h * span + t] = dot * scale + mask[t];
    }
  }
}

// o[h] = sum_t p[h, t] v_t over the open columns (masked ones have p = 0 exactly).
M2_CLONES void group_values(const float* p, const float* v, const float* mask, float* o, int64_t heads,
                            int64_t span, int64_t D) {
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < heads * D; ++i) o[i] = 0.f;
  for (int64_t t = 0; t < span; ++t) {
    if (mask[t] == ninf) continue;
    const float* vt = v + t * D;
    for (int64_t h = 0; h < heads; ++h) {
      const float ph = p[h * span + t];
      float* oh = o + h * D;
#pragma omp simd
      for (int64_t c = 0; c < D; ++c) oh[c] += ph * vt[c];
    }
  }
}

M2_CLONES void add_rows(float* x, const float* y, const float* bias, int64_t rows, int64_t width) {
  for (int64_t r = 0; r < rows; ++r) {
    float* xr = x + r * width;
    const float* yr = y + r * width;
    if (bias) {
#pragma omp simd
      for (int64_t c = 0; c < width; ++c) xr[c] = xr[c] + (yr[c] + bias[c]);
    } else {
#pragma omp simd
      for (int64_t c = 0; c < width; ++c) xr[c] = xr[c] + yr[c];
    }
  }
}

// out = a @ w (+ bias): ATen's addmm/mm, the calls the torch path makes (same MKL kernels).
void linear_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& w, const at::Tensor& bias) {
  if (bias.numel())
    at::addmm_out(out, bias, a, w);
  else
    at::mm_out(out, a, w);
}

}  // namespace

at::Tensor lm_decode_cpu(const at::Tensor& x_in, const at::Tensor& cos_table, const at::Tensor& sin_table,
                         const at::Tensor& rope_pos, const std::vector<at::Tensor>& weights,
                         const at::Tensor& k_slab, const at::Tensor& v_slab, const at::Tensor& cache_pos,
                         const at::Tensor& mask, int64_t span, int64_t groups, int64_t qpg, double eps,
                         double scale, const at::Tensor& final_ln, const at::Tensor& out_t) {
  need_f32(x_in, "x", 2);
  need_f32(cos_table, "cos table", 2);
  need_f32(sin_table, "sin table", 2);
  need_f32(k_slab, "key slab", 5);
  need_f32(v_slab, "value slab", 5);
  need_f32(mask, "mask", 2);
  if (weights.size() % kPerLayer) bad("weights must hold 10 tensors per layer");
  const int64_t L = static_cast<int64_t>(weights.size()) / kPerLayer;
  const int64_t n = x_in.size(0), H = x_in.size(1), D = k_slab.size(4), cap = k_slab.size(3);
  const int64_t slots = k_slab.size(1), heads = groups * qpg, W = groups * (qpg + 2) * D;
  if (k_slab.sizes() != v_slab.sizes() || k_slab.size(0) != L || k_slab.size(2) != groups)
    bad("slab shapes do not match the layers / KV groups");
  if (n > slots || mask.size(0) != slots || mask.size(1) != cap || span < 1 || span > cap)
    bad("rows " + std::to_string(n) + " / span " + std::to_string(span) + " do not fit the slab (" +
        std::to_string(slots) + " slots x " + std::to_string(cap) + ")");
  if (cos_table.size(1) != D || sin_table.sizes() != cos_table.sizes())
    bad("rotary tables must be [positions, head_dim]");
  if (rope_pos.numel() != n || cache_pos.numel() != n || rope_pos.scalar_type() != at::kLong ||
      cache_pos.scalar_type() != at::kLong)
    bad("rope_pos and cache_pos must be int64 with one entry per row");
  const auto rp = rope_pos.contiguous(), cp = cache_pos.contiguous();
  const int64_t* rpos = rp.data_ptr<int64_t>();
  const int64_t* cpos = cp.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    if (rpos[i] < 0 || rpos[i] >= cos_table.size(0))
      bad("rotary position " + std::to_string(rpos[i]) + " outside the table");
    if (cpos[i] < 0 || cpos[i] >= span) bad("cache position " + std::to_string(cpos[i]) + " outside the span");
  }
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor* w = weights.data() + l * kPerLayer;
    for (int idx : {0, 5}) need_f32(w[idx], "layer norm weight", 1);
    for (int idx : {1, 3, 6, 8}) need_f32(w[idx], "layer matmul weight ([in, out])", 2);
    if (w[1].size(0) != H || w[1].size(1) != W || w[3].size(0) != heads * D || w[3].size(1) != H ||
        w[6].size(0) != H || w[6].size(1) % 2 || w[8].size(0) != w[6].size(1) / 2 || w[8].size(1) != H)
      bad("layer " + std::to_string(l) + " weights do not match hidden " + std::to_string(H) + " / QKV width " +
          std::to_string(W));
  }

  const auto opts = x_in.options();
  at::Tensor x = x_in.clone();
  at::Tensor h = at::empty({n, H}, opts), tmp = at::empty({n, H}, opts);
  at::Tensor qkv = at::empty({n, W}, opts), q = at::empty({n, heads * D}, opts);
  at::Tensor o = at::empty({n, heads * D}, opts);
  at::Tensor scores = at::empty({n * heads, span}, opts), probs = at::empty({n * heads, span}, opts);
  const float* cosp = cos_table.data_ptr<float>();
  const float* sinp = sin_table.data_ptr<float>();
  const float* maskp = mask.data_ptr<float>();
  const float feps = static_cast<float>(eps), fscale = static_cast<float>(scale);
  const int64_t slot_stride = groups * cap * D;  // one slot of one layer's slab
  at::Tensor f, act;

  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor* w = weights.data() + l * kPerLayer;
    float* kl = k_slab.data_ptr<float>() + l * slots * slot_stride;
    float* vl = v_slab.data_ptr<float>() + l * slots * slot_stride;
    rms_rows(x.data_ptr<float>(), w[0].data_ptr<float>(), h.data_ptr<float>(), n, H, feps);
    linear_into(qkv, h, w[1], w[2]);
    const float* qkvp = qkv.data_ptr<float>();
    float* qp = q.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) {
      const float* cs = cosp + rpos[i] * D;
      const float* sn = sinp + rpos[i] * D;
      for (int64_t j = 0; j < groups; ++j) {
        const float* g = qkvp + i * W + j * (qpg + 2) * D;
        for (int64_t hh = 0; hh < qpg; ++hh) rope_row(g + hh * D, cs, sn, qp + (i * heads + j * qpg + hh) * D, D);
        const int64_t at_ = i * slot_stride + (j * cap + cpos[i]) * D;
        rope_row(g + qpg * D, cs, sn, kl + at_, D);
        std::copy(g + (qpg + 1) * D, g + (qpg + 2) * D, vl + at_);
      }
    }
    float* sp = scores.data_ptr<float>();
    at::parallel_for(0, n * groups, 1, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const int64_t i = r / groups, j = r % groups;
        group_scores(qp + r * qpg * D, kl + i * slot_stride + j * cap * D, maskp + i * cap, sp + r * qpg * span,
                     qpg, span, D, fscale);
      }
    });
    at::_softmax_out(probs, scores, -1, false);
    const float* pp = probs.data_ptr<float>();
    float* op = o.data_ptr<float>();
    at::parallel_for(0, n * groups, 1, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const int64_t i = r / groups, j = r % groups;
        group_values(pp + r * qpg * span, vl + i * slot_stride + j * cap * D, maskp + i * cap, op + r * qpg * D,
                     qpg, span, D);
      }
    });
    at::mm_out(tmp, o, w[3]);
    add_rows(x.data_ptr<float>(), tmp.data_ptr<float>(), w[4].numel() ? w[4].data_ptr<float>() : nullptr, n, H);
    rms_rows(x.data_ptr<float>(), w[5].data_ptr<float>(), h.data_ptr<float>(), n, H, feps);
    if (!f.defined() || f.size(1) != w[6].size(1)) f = at::empty({n, w[6].size(1)}, opts);
    linear_into(f, h, w[6], w[7]);
    const int64_t I = f.size(1) / 2;
    act = at::silu(f.narrow(1, 0, I));
    act.mul_(f.narrow(1, I, I));
    at::mm_out(tmp, act, w[8]);
    add_rows(x.data_ptr<float>(), tmp.data_ptr<float>(), w[9].numel() ? w[9].data_ptr<float>() : nullptr, n, H);
  }
  if (!out_t.numel()) return x;
  need_f32(final_ln, "final norm weight", 1);
  need_f32(out_t, "output weight ([hidden, vocab])", 2);
  rms_rows(x.data_ptr<float>(), final_ln.data_ptr<float>(), h.data_ptr<float>(), n, H, feps);
  return at::mm(h, out_t);
}

void register_lm_decode(pybind11::module& m) {
  // No Python object is touched inside, so other Python threads (data loader prefetch, TensorBoard
  // writers) run while a step computes.
  m.def("lm_decode_cpu", &lm_decode_cpu,
        "One fused decode step of the rollout engine's LM stage on a KV slab (fp32 CPU, TP1)",
        pybind11::call_guard<pybind11::gil_scoped_release>());
}
