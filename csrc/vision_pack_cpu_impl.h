// The CPU packer's kernels (see vision_pack_cpu.h). Deliberately no include guard and no #includes:
// vision_pack_cpu.cpp includes this file twice, into namespace m2vp::cpu_generic (baseline x86-64 /
// any ISA) and, on x86-64 with GCC/Clang, into m2vp::cpu_avx2 under `#pragma GCC target("avx2")`, and
// picks one at run time. Integer arithmetic and table lookups only, so both builds are bit-identical.

// Output rows per task: whole 2x2-merge rows (merge * patch = 28 rows) so a task emits complete
// patches, contiguously; 56 rows keep the horizontal-first halo rework small and tasks numerous.
constexpr int32_t kBandMergeRows = 2;
constexpr int32_t kMaxFixedTaps = 8;
constexpr int64_t kStreamBytes = int64_t{32} << 20;  // outputs larger than this bypass the caches
constexpr int64_t kSlack = 32;  // spare bytes after scratch rows (vector stores may spill past the end)

// Horizontal Pillow pass over one row, any tap count: `in` is [in_w, 3], `out` is [out_w, 3], `coefs`
// the plan's rows [first, count, w...] of length `stride`.
inline void hpass_row(const uint8_t* __restrict__ in, uint8_t* __restrict__ out, const int32_t* coefs,
                      int32_t stride, int32_t out_w) {
  for (int32_t x = 0; x < out_w; ++x) {
    const int32_t* c = coefs + static_cast<int64_t>(x) * stride;
    const uint8_t* p = in + static_cast<int64_t>(c[0]) * 3;
    const int32_t n = c[1];
    const int32_t* w = c + 2;
    int32_t a0 = 1 << (kPrecisionBits - 1), a1 = a0, a2 = a0;
    for (int32_t j = 0; j < n; ++j) {
      a0 += p[3 * j + 0] * w[j];
      a1 += p[3 * j + 1] * w[j];
      a2 += p[3 * j + 2] * w[j];
    }
    out[3 * x + 0] = clip8(a0);
    out[3 * x + 1] = clip8(a1);
    out[3 * x + 2] = clip8(a2);
  }
}

// The same pass with exactly K taps per output (rows [first, w0..wK-1], see pad_hcoefs): the compiler
// unrolls the 3K multiply-adds. Extra taps carry weight 0, so the integer sums are unchanged.
template <int K>
void hpass_fixed(const uint8_t* __restrict__ in, uint8_t* __restrict__ out, const int32_t* rows, int32_t out_w) {
  for (int32_t x = 0; x < out_w; ++x) {
    const int32_t* c = rows + static_cast<int64_t>(x) * (K + 1);
    const uint8_t* p = in + static_cast<int64_t>(c[0]) * 3;
    int32_t a0 = 1 << (kPrecisionBits - 1), a1 = a0, a2 = a0;
    for (int j = 0; j < K; ++j) {
      a0 += p[3 * j + 0] * c[1 + j];
      a1 += p[3 * j + 1] * c[1 + j];
      a2 += p[3 * j + 2] * c[1 + j];
    }
    out[3 * x + 0] = clip8(a0);
    out[3 * x + 1] = clip8(a1);
    out[3 * x + 2] = clip8(a2);
  }
}

// Horizontal coefficients re-laid for hpass_fixed: K = the largest tap count, each row's window moved
// left where it would run past the row end (weights shifted to match, zeros elsewhere). k = 0 when
// the generic pass must be used (K too large, or a source narrower than K). For the AVX2 pass the same
// taps are also stored 8 outputs at a time: `off3` = first * 3 per output, `wt` = [block][tap][8 lanes];
// outputs [0, vec_end) are those whose 4-byte gathers stay inside the row.
struct HCoefs {
  int32_t k = 0;
  int32_t vec_end = 0;
  std::vector<int32_t> rows, off3, wt;
};

HCoefs pad_hcoefs(const ImagePlan& im, const int32_t* coefs) {
  HCoefs h;
  const int32_t* c = coefs + im.h_coef;
  int32_t k = 0;
  for (int32_t x = 0; x < im.out_w; ++x) k = std::max(k, c[static_cast<int64_t>(x) * im.h_stride + 1]);
  if (k > kMaxFixedTaps || k > im.in_w) return h;
  h.k = k;
  h.rows.assign(static_cast<size_t>(im.out_w) * (k + 1), 0);
  const int32_t blocks = (im.out_w + 7) / 8;
  h.off3.assign(static_cast<size_t>(blocks) * 8, 0);
  h.wt.assign(static_cast<size_t>(blocks) * k * 8, 0);
  h.vec_end = im.out_w;
  for (int32_t x = 0; x < im.out_w; ++x) {
    const int32_t* src = c + static_cast<int64_t>(x) * im.h_stride;
    int32_t* dst = h.rows.data() + static_cast<int64_t>(x) * (k + 1);
    const int32_t first = std::min(src[0], im.in_w - k);
    dst[0] = first;
    for (int32_t j = 0; j < src[1]; ++j) dst[1 + (src[0] - first) + j] = src[2 + j];
    h.off3[x] = first * 3;
    for (int32_t j = 0; j < k; ++j) h.wt[(static_cast<size_t>(x / 8) * k + j) * 8 + x % 8] = dst[1 + j];
    // a gather reads 4 bytes from the last tap's pixel: it must not be the row's last pixel
    if (first + k > im.in_w - 1 && h.vec_end == im.out_w) h.vec_end = x / 8 * 8;
  }
  return h;
}

#if VP_IMPL_AVX2
// AVX2 horizontal pass, 8 outputs per step: one 4-byte gather per tap brings each output's (r, g, b)
// source pixel, three 32-bit multiply-adds accumulate the channels, and the clipped bytes are packed
// back to interleaved RGB (24 bytes; the two 16-byte stores spill 4 bytes past them, which the next
// step or the scalar tail overwrites and the buffers' slack absorbs at the end).
template <int K>
void hpass_fixed_avx2(const uint8_t* __restrict__ in, uint8_t* __restrict__ out, const HCoefs& h, int32_t out_w) {
  const __m256i mask = _mm256_set1_epi32(0xff);
  const __m256i half = _mm256_set1_epi32(1 << (kPrecisionBits - 1));
  const __m256i zero = _mm256_setzero_si256(), top = _mm256_set1_epi32(255);
  const __m256i squeeze = _mm256_setr_epi8(0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1,  //
                                           0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1);
  for (int32_t xb = 0; xb < h.vec_end; xb += 8) {
    const __m256i offs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(h.off3.data() + xb));
    const int32_t* w = h.wt.data() + static_cast<size_t>(xb / 8) * K * 8;
    __m256i ar = half, ag = half, ab = half;
    for (int j = 0; j < K; ++j) {
      const __m256i v = _mm256_i32gather_epi32(reinterpret_cast<const int*>(in + 3 * j), offs, 1);
      const __m256i wj = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * 8));
      ar = _mm256_add_epi32(ar, _mm256_mullo_epi32(_mm256_and_si256(v, mask), wj));
      ag = _mm256_add_epi32(ag, _mm256_mullo_epi32(_mm256_and_si256(_mm256_srli_epi32(v, 8), mask), wj));
      ab = _mm256_add_epi32(ab, _mm256_mullo_epi32(_mm256_and_si256(_mm256_srli_epi32(v, 16), mask), wj));
    }
    const auto clip = [&](__m256i a) {
      return _mm256_max_epi32(_mm256_min_epi32(_mm256_srai_epi32(a, kPrecisionBits), top), zero);
    };
    const __m256i pix = _mm256_or_si256(clip(ar), _mm256_or_si256(_mm256_slli_epi32(clip(ag), 8),
                                                                  _mm256_slli_epi32(clip(ab), 16)));
    const __m256i packed = _mm256_shuffle_epi8(pix, squeeze);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 3 * xb), _mm256_castsi256_si128(packed));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 3 * xb + 12), _mm256_extracti128_si256(packed, 1));
  }
  for (int32_t x = h.vec_end; x < out_w; ++x) {
    const int32_t* c = h.rows.data() + static_cast<int64_t>(x) * (K + 1);
    const uint8_t* p = in + static_cast<int64_t>(c[0]) * 3;
    int32_t a0 = 1 << (kPrecisionBits - 1), a1 = a0, a2 = a0;
    for (int j = 0; j < K; ++j) {
      a0 += p[3 * j + 0] * c[1 + j];
      a1 += p[3 * j + 1] * c[1 + j];
      a2 += p[3 * j + 2] * c[1 + j];
    }
    out[3 * x + 0] = clip8(a0);
    out[3 * x + 1] = clip8(a1);
    out[3 * x + 2] = clip8(a2);
  }
}
#define VP_HPASS_FIXED(K) hpass_fixed_avx2<K>(in, out, h, im.out_w)
#else
#define VP_HPASS_FIXED(K) hpass_fixed<K>(in, out, h.rows.data(), im.out_w)
#endif

void hpass(const uint8_t* in, uint8_t* out, const ImagePlan& im, const int32_t* coefs, const HCoefs& h) {
  switch (h.k) {
    case 1: return VP_HPASS_FIXED(1);
    case 2: return VP_HPASS_FIXED(2);
    case 3: return VP_HPASS_FIXED(3);
    case 4: return VP_HPASS_FIXED(4);
    case 5: return VP_HPASS_FIXED(5);
    case 6: return VP_HPASS_FIXED(6);
    case 7: return VP_HPASS_FIXED(7);
    case 8: return VP_HPASS_FIXED(8);
    default: return hpass_row(in, out, coefs + im.h_coef, im.h_stride, im.out_w);
  }
}
#undef VP_HPASS_FIXED

// Vertical Pillow pass producing one row of `width3` bytes: source row r of the taps is at
// base + (r - row_shift) * row_bytes. Tap-outer loop so the inner loop is a contiguous widening
// multiply-add the compiler vectorises.
inline void vpass_row(const uint8_t* base, int64_t row_bytes, int64_t row_shift, const int32_t* c, int64_t width3,
                      int32_t* __restrict__ acc, uint8_t* __restrict__ out) {
  std::fill(acc, acc + width3, 1 << (kPrecisionBits - 1));
  for (int32_t j = 0; j < c[1]; ++j) {
    const uint8_t* __restrict__ r = base + (static_cast<int64_t>(c[0]) + j - row_shift) * row_bytes;
    const int32_t w = c[2 + j];
    for (int64_t i = 0; i < width3; ++i) acc[i] += r[i] * w;
  }
  for (int64_t i = 0; i < width3; ++i) out[i] = clip8(acc[i]);
}

// Copy `bytes` to `dst`, with non-temporal stores when asked and aligned: the packed output is written
// once and is far larger than the caches, so bypassing them saves the read-for-ownership traffic.
inline void store_chunk(void* dst, const void* src, size_t bytes, bool stream) {
#if defined(__SSE2__)
  if (stream) {
    const uintptr_t d = reinterpret_cast<uintptr_t>(dst);
    if ((d & 15) == 0 && (bytes & 15) == 0) {
      auto* o = static_cast<__m128i*>(dst);
      const auto* i = static_cast<const __m128i*>(src);
      for (size_t k = 0; k < bytes / 16; ++k) _mm_stream_si128(o + k, _mm_loadu_si128(i + k));
      return;
    }
#if defined(__x86_64__)
    if ((d & 7) == 0 && (bytes & 7) == 0) {
      auto* o = static_cast<long long*>(dst);
      const auto* i = static_cast<const unsigned char*>(src);
      for (size_t k = 0; k < bytes / 8; ++k) {
        long long v;
        std::memcpy(&v, i + 8 * k, 8);
        _mm_stream_si64(o + k, v);
      }
      return;
    }
#endif
  }
#endif
  (void)stream;
  std::memcpy(dst, src, bytes);
}

inline void store_fence(bool stream) {
#if defined(__SSE2__)
  if (stream) _mm_sfence();  // non-temporal stores are weakly ordered: publish before the task ends
#endif
  (void)stream;
}

// Normalise (lookup) the resized rows [y0, y1) of frame f (whole merge rows; row y at
// rows + (y - y0) * row_stride, [out_w, 3] uint8) and write them in HF patch order. Patches of a
// merge row are consecutive in the output, and each (patch, channel, slot) is patch*patch contiguous
// values: the frame goes into its temporal slot and, for the last frame, every remaining slot.
template <typename T>
void emit_band(const ImagePlan& im, const uint8_t* rows, int64_t row_stride, int64_t f, int64_t y0, int64_t y1,
               const T* lut, T* out, int32_t patch, int32_t tp, int32_t merge, bool stream) {
  const int64_t pp = static_cast<int64_t>(patch) * patch;
  const int64_t dim = 3 * tp * pp;
  const int64_t tt = f / tp;
  const int32_t s0 = static_cast<int32_t>(f % tp);
  const int32_t s1 = f == im.frames - 1 ? tp : s0 + 1;
  const int64_t blocks_w = im.gw / merge;
  const int64_t group = im.patch_off + tt * static_cast<int64_t>(im.gh) * im.gw;
  alignas(16) T buf[32 * 32];
  for (int64_t bh = y0 / (patch * merge); bh < y1 / (patch * merge); ++bh) {
    for (int64_t bw = 0; bw < blocks_w; ++bw) {
      for (int32_t mh = 0; mh < merge; ++mh) {
        for (int32_t mw = 0; mw < merge; ++mw) {
          const int64_t gy = bh * merge + mh, gx = bw * merge + mw;
          T* dst = out + (group + (bh * blocks_w + bw) * merge * merge + mh * merge + mw) * dim;
          const uint8_t* src = rows + (gy * patch - y0) * row_stride + gx * patch * 3;
          for (int32_t ch = 0; ch < 3; ++ch) {
            const T* l = lut + ch * 256;
            for (int32_t py = 0; py < patch; ++py) {
              const uint8_t* r = src + py * row_stride + ch;
              T* b = buf + py * patch;
              for (int32_t px = 0; px < patch; ++px) b[px] = l[r[3 * px]];
            }
            for (int32_t s = s0; s < s1; ++s) store_chunk(dst + (ch * tp + s) * pp, buf, sizeof(T) * pp, stream);
          }
        }
      }
    }
  }
}

struct Task {
  int32_t image, frame, y0, y1;
};

struct Scratch {
  std::vector<uint8_t> rows, band, row_a;
  std::vector<int32_t> acc;
};

template <typename T>
void run_band(const ImagePlan& im, const uint8_t* src, const int32_t* coefs, const HCoefs& hc, const Task& t,
              const T* lut, T* out, int32_t patch, int32_t tp, int32_t merge, bool stream, Scratch& s) {
  const int64_t in_row = static_cast<int64_t>(im.in_w) * 3, out_row = static_cast<int64_t>(im.out_w) * 3;
  const uint8_t* in = src + static_cast<int64_t>(t.frame) * im.in_h * in_row;
  const int32_t* vc = coefs + im.v_coef;
  const int64_t rows = t.y1 - t.y0;
  const uint8_t* band = in + static_cast<int64_t>(t.y0) * in_row;  // no pass at all: emit the input rows
  if (im.stage1 != kNone || im.stage2 != kNone) {
    s.band.resize(rows * out_row + kSlack);
    band = s.band.data();
  }
  uint8_t* b = s.band.data();
  if (im.stage1 == kHoriz) {  // horizontal first: resample the band's source rows, then vertical
    const int32_t* c_first = vc + static_cast<int64_t>(t.y0) * im.v_stride;
    const int32_t* c_last = vc + static_cast<int64_t>(t.y1 - 1) * im.v_stride;
    const int64_t r_lo = c_first[0], r_hi = c_last[0] + c_last[1];
    s.rows.resize((r_hi - r_lo) * out_row + kSlack);
    s.acc.resize(out_row);
    for (int64_t r = r_lo; r < r_hi; ++r) hpass(in + r * in_row, s.rows.data() + (r - r_lo) * out_row, im, coefs, hc);
    for (int64_t y = t.y0; y < t.y1; ++y) {
      vpass_row(s.rows.data(), out_row, r_lo, vc + y * im.v_stride, out_row, s.acc.data(), b + (y - t.y0) * out_row);
    }
  } else if (im.stage1 == kVert) {  // vertical first (Pillow 13 when the height shrinks much more)
    s.row_a.resize(in_row + kSlack);
    s.acc.resize(in_row);
    for (int64_t y = t.y0; y < t.y1; ++y) {
      vpass_row(in, in_row, 0, vc + y * im.v_stride, in_row, s.acc.data(), s.row_a.data());
      hpass(s.row_a.data(), b + (y - t.y0) * out_row, im, coefs, hc);
    }
  } else if (im.stage2 == kHoriz) {  // a single pass, straight from the input
    for (int64_t y = t.y0; y < t.y1; ++y) hpass(in + y * in_row, b + (y - t.y0) * out_row, im, coefs, hc);
  } else if (im.stage2 == kVert) {
    s.acc.resize(out_row);
    for (int64_t y = t.y0; y < t.y1; ++y) {
      vpass_row(in, in_row, 0, vc + y * im.v_stride, out_row, s.acc.data(), b + (y - t.y0) * out_row);
    }
  }
  emit_band<T>(im, band, out_row, t.frame, t.y0, t.y1, lut, out, patch, tp, merge, stream);
  store_fence(stream);
}

template <typename T>
void pack_cpu_typed(const std::vector<ImagePlan>& plans, const std::vector<const uint8_t*>& srcs,
                    const std::vector<int32_t>& coefs, const T* lut, T* out, int32_t patch, int32_t tp,
                    int32_t merge, int num_threads) {
  const int32_t band_rows = kBandMergeRows * patch * merge;
  std::vector<Task> tasks;
  std::vector<HCoefs> hcoefs(plans.size());
  int64_t out_elems = 0;
  for (int32_t i = 0; i < static_cast<int32_t>(plans.size()); ++i) {
    const ImagePlan& im = plans[i];
    if (im.stage1 == kHoriz || im.stage1 == kVert || im.stage2 == kHoriz) hcoefs[i] = pad_hcoefs(im, coefs.data());
    out_elems += static_cast<int64_t>(im.gt) * im.gh * im.gw * 3 * tp * patch * patch;
    for (int32_t f = 0; f < im.frames; ++f) {
      for (int32_t y0 = 0; y0 < im.out_h; y0 += band_rows) tasks.push_back({i, f, y0, std::min(y0 + band_rows, im.out_h)});
    }
  }
  const bool stream = out_elems * static_cast<int64_t>(sizeof(T)) > kStreamBytes;
  const int64_t n = static_cast<int64_t>(tasks.size());
#pragma omp parallel num_threads(std::max(1, num_threads))
  {
    Scratch scratch;
#pragma omp for schedule(dynamic, 1)
    for (int64_t k = 0; k < n; ++k) {
      const Task& t = tasks[k];
      run_band<T>(plans[t.image], srcs[t.image], coefs.data(), hcoefs[t.image], t, lut, out, patch, tp, merge, stream,
                  scratch);
    }
  }
}

