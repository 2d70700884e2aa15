// The sLSTM CPU kernels: the recurrence over a sequence (forward and backward), a decoding step of whole blocks and
// the LM head's matrix-vector product. No torch headers here: `modeling_slstm/slstm_cpu.py` calls the scan through
// ctypes from the registered ops `slstm::scan` and `slstm::scan_backward`, and `slstm_ops.cpp` is the torch boundary
// of `slstm::block_decode` and `slstm::linear_decode` (slstm_cpu.h). Both check every tensor (shape, dtype, plain dense
// CPU memory) before a pointer reaches this file.
//
// Per head and step: pre-activation = W·x + b + h @ R[head] (four rows of R per pass, vectorised), then the gate math
// with polynomial exp/log1p/tanh (a few ulp from libm). Denormals are flushed (FTZ/DAZ) inside each entry point. The
// backward walks the steps in reverse from the activations the forward saved (i', f', tanh z, sigmoid(o), c, n, and
// the tie weight of the stabiliser max), writes dL/d(gates) and carries dh through R^T.

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

#include "slstm_cpu.h"
#if defined(_OPENMP)
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#include <xmmintrin.h>
#include <pmmintrin.h>
#define SLSTM_FTZ 1
#endif

namespace {

// exp(x) for x <= 0 (0 below -87.3): Cephes-style range reduction and polynomial, branch-free so loops vectorise.
inline float exp_neg(float x) {
  float xc = x < -87.3f ? -87.3f : (x > 0.0f ? 0.0f : x);
  float k = std::floor(xc * 1.44269504088896341f + 0.5f);
  float r = xc - k * 0.693359375f + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  float y = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(float));
  return x < -87.3f ? 0.0f : y * scale;
}

// log(1 + u) for u in [0, 1]: 2 atanh(s), s = u / (2 + u) in [0, 1/3].
inline float log1p_unit(float u) {
  float s = u / (2.0f + u);
  float s2 = s * s;
  float p = 1.0f / 17.0f;
  p = p * s2 + 1.0f / 15.0f;
  p = p * s2 + 1.0f / 13.0f;
  p = p * s2 + 1.0f / 11.0f;
  p = p * s2 + 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  return 2.0f * s * (1.0f + s2 * p);
}

inline float tanh_(float x) {
  float ax = std::fabs(x);
  float x2 = x * x;
  float small = ((((-5.70498872745e-3f * x2 + 2.06390887954e-2f) * x2 - 5.37397155531e-2f) * x2 +
                  1.33314422036e-1f) * x2 - 3.33332819422e-1f) * x2 * x + x;
  float e = exp_neg(-2.0f * ax);
  float big = (1.0f - e) / (1.0f + e);
  big = x < 0.0f ? -big : big;
  return ax < 0.625f ? small : big;
}

inline float sigmoid_(float x) {
  float e = exp_neg(-std::fabs(x));
  float inv = 1.0f / (1.0f + e);
  return x >= 0.0f ? inv : e * inv;
}

// bfloat16 storage: the upper half of a float32. Decoding reads weights and activations as float32 or bf16 and does
// its arithmetic in float32, but for the products with bfloat16 weights where the CPU multiplies bfloat16 pairs
// (AVX512-BF16: dot1xR_pairs), whose other input is rounded to bfloat16 too, as a bfloat16 model's modules hold it;
// the FFN's and the LM head's weights may also be int8 with a float32 scale per row (weight-only quantisation:
// W[o, :] = scale[o] q[o, :]).
using bf16 = uint16_t;
inline float to_f(float v) { return v; }
inline float to_f(bf16 v) { return __builtin_bit_cast(float, static_cast<uint32_t>(v) << 16); }
inline float to_f(int8_t v) { return static_cast<float>(v); }
inline void store(float v, float* p) { *p = v; }
inline void store(float v, bf16* p) {  // round to nearest even, as torch; NaN stays NaN
  const uint32_t u = __builtin_bit_cast(uint32_t, v);
  *p = std::isnan(v) ? bf16(0x7fc0) : bf16((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
// v as storage of type T holds it: rounded to bf16 for T = bf16
template <typename T>
inline float as_stored(float v) {
  T held;
  store(v, &held);
  return to_f(held);
}

struct FlushDenormals {
#ifdef SLSTM_FTZ
  unsigned int saved;
  FlushDenormals() : saved(_mm_getcsr()) { _mm_setcsr(saved | 0x8040); }
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

// acc[b][0:E] += sum_d hin[b][d] * W[d][0:E] for b < nb; hin rows strided by hstride. Four rows of W at a time.
inline void gemm_rows(float* acc, int64_t E, const float* hin, int64_t hstride, int64_t nb, const float* W, int64_t D) {
  int64_t d = 0;
  for (; d + 4 <= D; d += 4) {
    const float* w0 = W + d * E;
    const float* w1 = w0 + E;
    const float* w2 = w1 + E;
    const float* w3 = w2 + E;
    for (int64_t b = 0; b < nb; ++b) {
      const float* hb = hin + b * hstride + d;
      float h0 = hb[0], h1 = hb[1], h2 = hb[2], h3 = hb[3];
      float* a = acc + b * E;
#pragma omp simd
      for (int64_t e = 0; e < E; ++e) a[e] += h0 * w0[e] + h1 * w1[e] + h2 * w2[e] + h3 * w3[e];
    }
  }
  for (; d < D; ++d) {
    const float* w0 = W + d * E;
    for (int64_t b = 0; b < nb; ++b) {
      float h0 = hin[b * hstride + d];
      float* a = acc + b * E;
#pragma omp simd
      for (int64_t e = 0; e < E; ++e) a[e] += h0 * w0[e];
    }
  }
}


// One step of the gate math for DH units. raw = [ĩ | f̃ | z̃ | õ]; the state (h, c, n, m) is updated in place.
template <bool SAVE>
inline void cell_step(const float* raw, float* h, float* c, float* n, float* m, float* out, float* sg, float* sa,
                      int64_t DH, int exp_forget) {
  const float* pi = raw;
  const float* pf = raw + DH;
  const float* pz = raw + 2 * DH;
  const float* po = raw + 3 * DH;
#pragma omp simd
  for (int64_t d = 0; d < DH; ++d) {
    float fx = pf[d];
    float ef = exp_neg(-std::fabs(fx));
    float log_f = exp_forget ? fx : (fx < 0.0f ? fx : 0.0f) - log1p_unit(ef);
    bool first = n[d] == 0.0f;
    float a_run = log_f + m[d];
    float iv = pi[d];
    float m_run = a_run > iv ? a_run : iv;
    float m_new = first ? iv : m_run;
    float ig = exp_neg(iv - m_new);
    float fg = first ? 0.0f : exp_neg(a_run - m_run);
    float zt = tanh_(pz[d]);
    float og = sigmoid_(po[d]);
    float c_new = fg * c[d] + ig * zt;
    float n_new = fg * n[d] + ig;
    float h_new = og * c_new / n_new;
    c[d] = c_new;
    n[d] = n_new;
    m[d] = m_new;
    h[d] = h_new;
    out[d] = h_new;
    if (SAVE) {
      sg[d] = ig;
      sg[DH + d] = fg;
      sg[2 * DH + d] = zt;
      sg[3 * DH + d] = og;
      sa[d] = c_new;
      sa[DH + d] = n_new;
      sa[2 * DH + d] = first ? 0.0f : (a_run > iv ? 1.0f : (a_run == iv ? 0.5f : 0.0f));  // ties split as torch.max
      sa[3 * DH + d] = exp_forget ? 1.0f : (fx >= 0.0f ? ef : 1.0f) / (1.0f + ef);  // d log f / d f̃ = sigmoid(-f̃)
    }
  }
}

// sum_d (x[d] - shift)^p for p = 1 or 2, in double, sixteen partial sums at a time with AVX-512 (one sum after
// another waited ~4 cycles per element: at batch 8 the norms and cells of a 125m step took ~1 ms).
template <int P>
inline double sum_powers(const float* x, int64_t n, double shift) {
  double s = 0.0;
  int64_t d = 0;
#if defined(__AVX512F__)
  const __m512d c = _mm512_set1_pd(shift);
  __m512d a0 = _mm512_setzero_pd(), a1 = _mm512_setzero_pd();
  for (; d + 16 <= n; d += 16) {
    const __m512d v0 = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(x + d)), c);
    const __m512d v1 = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(x + d + 8)), c);
    a0 = P == 1 ? _mm512_add_pd(a0, v0) : _mm512_fmadd_pd(v0, v0, a0);
    a1 = P == 1 ? _mm512_add_pd(a1, v1) : _mm512_fmadd_pd(v1, v1, a1);
  }
  s = _mm512_reduce_add_pd(_mm512_add_pd(a0, a1));
#endif
  for (; d < n; ++d) s += P == 1 ? x[d] - shift : (x[d] - shift) * (x[d] - shift);
  return s;
}

// LayerNorm without bias, offset weight: out = (x - mean) / sqrt(var + eps) * (1 + w), over D (a block norm, or one
// head of the per-head norm). Sums in double: the residual stream can sit far from zero, where a sequential float sum
// loses digits that torch's blocked sums keep.
template <typename W>
inline void offset_layer_norm(const float* x, const W* w, float eps, float* out, int64_t D) {
  const double mean = sum_powers<1>(x, D, 0.0) / D, var = sum_powers<2>(x, D, mean) / D;
  const float m = static_cast<float>(mean), inv = static_cast<float>(1.0 / std::sqrt(var + eps));
  for (int64_t d = 0; d < D; ++d) out[d] = (x[d] - m) * inv * (1.0f + to_f(w[d]));
}

// Sixteen partial sums (vector lanes) rather than an `omp simd reduction`: inlined into loop nests, GCC lowered that
// to scalar code here, 3x slower.
template <typename W>
inline float dot(const W* a, const float* b, int64_t n) {
  float part[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
#pragma omp simd
    for (int64_t j = 0; j < 16; ++j) part[j] += to_f(a[i + j]) * b[i + j];
  float acc = 0.0f;
  for (int64_t j = 0; j < 16; ++j) acc += part[j];
  for (; i < n; ++i) acc += to_f(a[i]) * b[i];
  return acc;
}

#if defined(__AVX512F__)
// Bytes of weights prefetched ahead into L2 when they stream from memory (where: kPrefetchRows, gemm_cols). Measured on
// the 125m preset: the LM head read at 35 -> 41 GB/s in float32 and 22 -> 45 GB/s in bfloat16 against
// 1 KiB ahead with the non-temporal hint (which was meant to spare the interpreter's cached working set: the whole
// step is faster anyway, 21.4 -> 20.4 ms in float32 and 16.0 -> 12.9 ms in bfloat16); batch 8 products 16 -> 25 G
// multiply-adds/s on one core.
constexpr int64_t kAhead = 8192;
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const bf16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
inline __m512 load16(const int8_t* p) {  // exact: every int8 is a float32
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// Float32 weights that stream without a software prefetch (kStreamLoads) are loaded with the non-temporal hint
// (vmovntdqa, p 64-byte aligned): the same values, but the lines pass through the caches with less eviction of what
// the interpreter reads between kernel calls. Alternated in one process at the 125m preset, batch 1, float32: a step
// 17.4 -> 16.9-17.2 ms (three runs, memory at ~30-34 GB/s); after a 248 MB stream the model's per-token Python checks
// took 683 instead of 963 us. Not for bfloat16, whose rows need the software prefetch (prefetched lines are cached).
template <bool kStreamLoad>
inline __m512 load16(const float* p) {
  if constexpr (kStreamLoad)
    return _mm512_castsi512_ps(_mm512_stream_load_si512(const_cast<float*>(p)));
  else
    return _mm512_loadu_ps(p);
}
template <bool kStreamLoad>
inline __m512 load16(const bf16* p) { return load16(p); }
template <bool kStreamLoad>
inline __m512 load16(const int8_t* p) { return load16(p); }
// Whether a weight's rows, each `row_bytes` from `w`, can be loaded with vmovntdqa (every 16 floats on a 64-byte line).
inline bool line_aligned(const void* w, int64_t row_bytes) {
  return reinterpret_cast<uintptr_t>(w) % 64 == 0 && row_bytes % 64 == 0;
}

// Whether dot1xR prefetches weights that stream: not for one row of x against float32 weights, where the hardware
// prefetchers alone read faster (the 125m preset at batch 1 in float32, alternated in one process: a step 15.9 -> 14.9
// ms with the host's memory at ~53 GB/s, 18.6 -> 18.2 ms at ~34 GB/s). bfloat16 and int8 rows (fewer bytes per
// instruction) and batches need the software prefetch: without it a bf16 step took 1.3 ms longer and a batch-8 step
// 12 ms.
template <typename W, int NR>
constexpr bool kPrefetchRows = !(NR == 1 && sizeof(W) == sizeof(float));
template <typename W, int NR>
constexpr bool kStreamLoads = !kPrefetchRows<W, NR>;

// res[r] = W[o, :] . x[r] for one row of W and NR rows of x (stride xs): each 16 weights loaded once for all NR rows,
// two sums per row in registers. The weights stream once per step, one row after the other (the order the
// prefetchers stream fastest; rows read side by side streamed at half the speed here). Each row's sum runs in the same
// order whatever NR is, so a batch row or a verified draft token gets the bits it gets alone.
template <typename W, int NR>
__attribute__((noinline)) void dot1xR(const W* w, int64_t I, const float* x, int64_t xs, float res[8], bool stream) {
  __m512 a0[NR], a1[NR];
  for (int r = 0; r < NR; ++r) a0[r] = a1[r] = _mm512_setzero_ps();
  int64_t i = 0;
  const auto pairs = [&](auto stream_load) {  // 32 weights at a time
    for (; i + 32 <= I; i += 32) {
      if (kPrefetchRows<W, NR> && stream && (sizeof(W) > 1 || i % 64 == 0))  // int8: a line every other pass
        for (int64_t k = 0; k < 32 * static_cast<int64_t>(sizeof(W)); k += 64)
          _mm_prefetch(reinterpret_cast<const char*>(w + i) + kAhead + k, _MM_HINT_T1);
      const __m512 u0 = load16<stream_load()>(w + i), u1 = load16<stream_load()>(w + i + 16);
      for (int r = 0; r < NR; ++r) {
        a0[r] = _mm512_fmadd_ps(u0, _mm512_loadu_ps(x + r * xs + i), a0[r]);
        a1[r] = _mm512_fmadd_ps(u1, _mm512_loadu_ps(x + r * xs + i + 16), a1[r]);
      }
    }
  };
  if (kStreamLoads<W, NR> && stream && line_aligned(w, 0))  // this row on a 64-byte line
    pairs(std::true_type{});
  else
    pairs(std::false_type{});
  for (; i + 16 <= I; i += 16) {
    const __m512 u0 = load16(w + i);
    for (int r = 0; r < NR; ++r) a0[r] = _mm512_fmadd_ps(u0, _mm512_loadu_ps(x + r * xs + i), a0[r]);
  }
  for (int r = 0; r < NR; ++r) res[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0[r], a1[r]));
  for (; i < I; ++i)  // fma, not a * b + c: the compiler would contract that in some instantiations and not others
    for (int r = 0; r < NR; ++r) res[r] = std::fma(to_f(w[i]), x[r * xs + i], res[r]);
}
#endif

// W[o, :] . x as the sum `dot` gave: times the row's scale for int8 weights (`scale` is read only for those), plus the
// bias b[o] if any. An explicit fma for int8: `dot * scale + b` was contracted into one in some of the callers'
// instantiations and not in others, and a batch row then got other bits than alone.
template <typename W, typename Bt>
inline float finish_row(float dot, const float* scale, const Bt* b, int64_t o) {
  const float bias = b ? to_f(b[o]) : 0.0f;
  if constexpr (std::is_same_v<W, int8_t>)
    return std::fma(dot, scale[o], bias);
  else
    return dot + bias;
}

#if defined(__AVX512F__)
#if defined(__AVX512BF16__)
// bfloat16 weights against x rounded to bfloat16 (as the modules of a bfloat16 model hold it), in pairs (vdpbf16ps:
// exact products, float32 sums): no widening of the weights, which bounds dot1xR's rate for them (from cache, per core:
// 45 against 28 G weights/s). res[r] = W[o, :] . x[r] as dot1xR's, for x in bfloat16, each row 64-byte aligned. (Where
// a pair's products overflow float32 with opposite signs the sum is the infinity of the one added last, where
// float32 products give NaN: |x w| > 3.4e38 only.)
constexpr bool kPairs = true;
template <int NR>
__attribute__((noinline)) void dot1xR_pairs(const bf16* w, int64_t I, const bf16* x, int64_t xs, float res[8],
                                            bool stream) {
  __m512 a0[NR], a1[NR];
  for (int r = 0; r < NR; ++r) a0[r] = a1[r] = _mm512_setzero_ps();
  const auto pairs = [](const bf16* p) { return reinterpret_cast<__m512bh>(_mm512_loadu_si512(p)); };
  int64_t i = 0;
  for (; i + 64 <= I; i += 64) {  // 64 weights at a time, 32 into each sum
    if (stream)
      for (int64_t k = 0; k < 64 * static_cast<int64_t>(sizeof(bf16)); k += 64)
        _mm_prefetch(reinterpret_cast<const char*>(w + i) + kAhead + k, _MM_HINT_T1);
    const __m512bh u0 = pairs(w + i), u1 = pairs(w + i + 32);
    for (int r = 0; r < NR; ++r) {
      a0[r] = _mm512_dpbf16_ps(a0[r], u0, pairs(x + r * xs + i));
      a1[r] = _mm512_dpbf16_ps(a1[r], u1, pairs(x + r * xs + i + 32));
    }
  }
  for (; i < I; i += 32) {  // the last 1 to 63, zeros beyond I
    const __mmask32 m = I - i >= 32 ? ~__mmask32{0} : (__mmask32{1} << (I - i)) - 1;
    const __m512bh u = reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(m, w + i));
    for (int r = 0; r < NR; ++r)
      a0[r] = _mm512_dpbf16_ps(a0[r], u, reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(m, x + r * xs + i)));
  }
  for (int r = 0; r < NR; ++r) res[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0[r], a1[r]));
}
#else
constexpr bool kPairs = false;
template <int NR>
void dot1xR_pairs(const bf16*, int64_t, const bf16*, int64_t, float*, bool) {}
#endif

// Rows [r0, r0 + NR) of gemv_rows, one output at a time; x in float32, or in bfloat16 for dot1xR_pairs.
template <typename W, int NR, typename Bt, typename X>
void gemv_group(const W* w, const float* scale, const Bt* b, const X* x, int64_t xs, float* out, int64_t os,
                int64_t O, int64_t I, bool accumulate, bool stream) {
  float res[8];
  for (int64_t o = 0; o < O; ++o) {
    if constexpr (std::is_same_v<X, bf16>)
      dot1xR_pairs<NR>(w + o * I, I, x, xs, res, stream);
    else
      dot1xR<W, NR>(w + o * I, I, x, xs, res, stream);
    for (int r = 0; r < NR; ++r) {
      float* dst = out + r * os + o;
      const float v = finish_row<W>(res[r], scale, b, o);
      *dst = accumulate ? *dst + v : v;
    }
  }
}

// gemv_rows for x (nr rows of I, strided by xs) in X.
template <typename W, typename Bt, typename X>
inline void gemv_rows_of(const W* w, const float* scale, const Bt* b, const X* x, int64_t xs, float* out, int64_t os,
                         int64_t nr, int64_t O, int64_t I, bool accumulate, bool stream) {
  for (int64_t r = 0; r < nr; r += 8) {
    const X* xr = x + r * xs;
    float* outr = out + r * os;
    switch (std::min<int64_t>(8, nr - r)) {
      case 1: gemv_group<W, 1>(w, scale, b, xr, xs, outr, os, O, I, accumulate, stream); break;
      case 2: gemv_group<W, 2>(w, scale, b, xr, xs, outr, os, O, I, accumulate, stream); break;
      case 3: gemv_group<W, 3>(w, scale, b, xr, xs, outr, os, O, I, accumulate, stream); break;
      case 4: gemv_group<W, 4>(w, scale, b, xr, xs, outr, os, O, I, accumulate, stream); break;
      case 5: gemv_group<W, 5>(w, scale, b, xr, xs, outr, os, O, I, accumulate, stream); break;
      case 6: gemv_group<W, 6>(w, scale, b, xr, xs, outr, os, O, I, accumulate, stream); break;
      case 7: gemv_group<W, 7>(w, scale, b, xr, xs, outr, os, O, I, accumulate, stream); break;
      default: gemv_group<W, 8>(w, scale, b, xr, xs, outr, os, O, I, accumulate, stream); break;
    }
  }
}

// out[r][o] (+)= b[o] + W[o, :] . x[r] for rows r < nr and o < O; W (O, I) row-major (int8 rows times scale[o]), rows
// of x and out strided by xs and os: groups of up to 8 rows of x per pass over W. Against bfloat16 weights x is
// rounded to bfloat16 first (kPairs), into rows on 64-byte lines of this thread's own buffer.
template <typename W, typename Bt>
inline void gemv_rows(const W* w, const float* scale, const Bt* b, const float* x, int64_t xs, float* out, int64_t os,
                      int64_t nr, int64_t O, int64_t I, bool accumulate, bool stream) {
  if constexpr (std::is_same_v<W, bf16> && kPairs) {
    constexpr int64_t kPerLine = 64 / sizeof(bf16);
    const int64_t row = (I + kPerLine - 1) / kPerLine * kPerLine;
    constexpr int64_t kKept = 8 << 20;  // bf16 kept by a thread from call to call (16 MiB, as Scratch keeps)
    thread_local std::vector<bf16> kept;
    std::vector<bf16> owned;  // a wider call's own, freed after it
    const int64_t need = nr * row + kPerLine;
    std::vector<bf16>& buffer = need > kKept ? owned : kept;
    if (static_cast<int64_t>(buffer.size()) < need) buffer.resize(need);
    const int64_t skip = (kPerLine - reinterpret_cast<uintptr_t>(buffer.data()) / sizeof(bf16) % kPerLine) % kPerLine;
    bf16* xb = buffer.data() + skip;  // on a line
    for (int64_t r = 0; r < nr; ++r)
      for (int64_t i = 0; i < I; ++i) store(x[r * xs + i], xb + r * row + i);  // rounded as torch rounds
    gemv_rows_of(w, scale, b, static_cast<const bf16*>(xb), row, out, os, nr, O, I, accumulate, stream);
  } else {
    gemv_rows_of(w, scale, b, x, xs, out, os, nr, O, I, accumulate, stream);
  }
}
#else
// out[r][o] (+)= b[o] + W[o, :] . x[r] for rows r < nr and o < O; W (O, I) row-major (int8 rows times scale[o]), rows
// of x and out strided by xs and os: one dot product per output, so a row's bits do not depend on the other rows.
template <typename W, typename Bt>
inline void gemv_rows(const W* w, const float* scale, const Bt* b, const float* x, int64_t xs, float* out, int64_t os,
                      int64_t nr, int64_t O, int64_t I, bool accumulate, bool) {
  for (int64_t r = 0; r < nr; ++r)
    for (int64_t o = 0; o < O; ++o) {
      const float v = finish_row<W>(dot(w + o * I, x + r * xs, I), scale, b, o);
      out[r * os + o] = accumulate ? out[r * os + o] + v : v;
    }
}
#endif

// The FFN activations of the config, by code: 0 gelu (erf), 1 relu, 2 relu², 3 silu, 4 sigmoid, 5 selu. The entry
// point refuses other codes before any work; NaN here would mark one that slipped through.
static_assert(slstm::kNumActivationCodes == 6, "ffn_act's codes");
inline float ffn_act(float x, int act) {
  switch (act) {
    case 0: return 0.5f * x * (1.0f + std::erf(x * 0.70710678118654752f));
    case 1: return x > 0.0f ? x : 0.0f;
    case 2: return x > 0.0f ? x * x : 0.0f;
    case 3: return x * sigmoid_(x);
    case 4: return sigmoid_(x);
    case 5: return 1.0507009873554805f * (x > 0.0f ? x : 1.6732632423543772f * std::expm1(x));
    default: return std::nanf("");
  }
}

}  // namespace

extern "C" {

// Heads [h_begin, h_end) x batch rows [b0, b1), one head at a time. Layouts (contiguous float32):
//   gates (B,S,NH,4DH), R (NH,DH,4DH), bias (NH,4DH) or null, state (4,B,NH,DH) [h,c,n,m] in: initial, out: final,
//   mask (B,S) uint8 or null, out (B,S,NH,DH), saved_g (B,S,NH,4DH) [i',f',tanh z,sigmoid o] or null,
//   saved_a (B,S,NH,4DH) [c, n, w (share of dL/dm going to log f + m_prev), dlogf/df] or null.
void slstm_forward(const float* gates, const float* R, const float* bias, float* state, const uint8_t* mask,
                   float* out, float* saved_g, float* saved_a, int64_t B, int64_t S, int64_t NH, int64_t DH,
                   int exp_forget, int64_t h_begin, int64_t h_end, int64_t b0, int64_t b1) {
  FlushDenormals ftz;
  const int64_t E = 4 * DH, nb = b1 - b0, HS = NH * DH;
  std::vector<float> raw(nb * E);
  for (int64_t hd = h_begin; hd < h_end; ++hd) {
    float* hs = state + (b0 * NH + hd) * DH;
    float* cs = hs + B * HS;
    float* ns = cs + B * HS;
    float* ms = ns + B * HS;
    const float* Rh = R + hd * DH * E;
    for (int64_t t = 0; t < S; ++t) {
      for (int64_t b = 0; b < nb; ++b) {
        const float* g = gates + (((b0 + b) * S + t) * NH + hd) * E;
        float* a = raw.data() + b * E;
        if (bias) {
          const float* bb = bias + hd * E;
#pragma omp simd
          for (int64_t e = 0; e < E; ++e) a[e] = g[e] + bb[e];
        } else {
          std::memcpy(a, g, E * sizeof(float));
        }
      }
      gemm_rows(raw.data(), E, hs, HS, nb, Rh, DH);
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t row = ((b0 + b) * S + t) * NH + hd;
        float* h = hs + b * HS;
        float* c = cs + b * HS;
        float* n = ns + b * HS;
        float* m = ms + b * HS;
        float* o_out = out + row * DH;
        if (mask && !mask[(b0 + b) * S + t]) {
          std::memcpy(o_out, h, DH * sizeof(float));
          if (saved_a) {
            float* sa = saved_a + row * E;
            std::memcpy(sa, c, DH * sizeof(float));
            std::memcpy(sa + DH, n, DH * sizeof(float));
          }
          continue;
        }
        const float* pi = raw.data() + b * E;
        if (saved_g)
          cell_step<true>(pi, h, c, n, m, o_out, saved_g + row * E, saved_a + row * E, DH, exp_forget);
        else
          cell_step<false>(pi, h, c, n, m, o_out, nullptr, nullptr, DH, exp_forget);
      }
    }
  }
}

// Backward over heads [h_begin, h_end) x batch rows [b0, b1). RT (NH,4DH,DH) = R transposed per head;
// state0 (4,B,NH,DH) the initial state;
// dout (B,S,NH,DH); dstate (4,B,NH,DH) in: dL/d(final state), out: dL/d(initial state); dgates (B,S,NH,4DH) out.
void slstm_backward(const float* RT, const float* state0, const uint8_t* mask, const float* saved_g,
                    const float* saved_a, const float* dout, float* dstate, float* dgates, int64_t B, int64_t S,
                    int64_t NH, int64_t DH, int64_t h_begin, int64_t h_end, int64_t b0, int64_t b1) {
  FlushDenormals ftz;
  const int64_t E = 4 * DH, nb = b1 - b0, HS = NH * DH;
  std::vector<float> draw(nb * E);
  std::vector<float> dh_next(nb * DH);
  for (int64_t hd = h_begin; hd < h_end; ++hd) {
    float* dhs = dstate + (b0 * NH + hd) * DH;
    float* dcs = dhs + B * HS;
    float* dns = dcs + B * HS;
    float* dms = dns + B * HS;
    const float* RTh = RT + hd * E * DH;
    for (int64_t t = S - 1; t >= 0; --t) {
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t row = ((b0 + b) * S + t) * NH + hd;
        float* dh = dhs + b * HS;
        float* dc = dcs + b * HS;
        float* dn = dns + b * HS;
        float* dm = dms + b * HS;
        float* dr = draw.data() + b * E;
        float* dg = dgates + row * E;
        const float* go = dout + row * DH;
        if (mask && !mask[(b0 + b) * S + t]) {
          for (int64_t d = 0; d < DH; ++d) dh[d] += go[d];
          std::memset(dr, 0, E * sizeof(float));
          std::memset(dg, 0, E * sizeof(float));
          continue;
        }
        const float* sg = saved_g + row * E;
        const float* sa = saved_a + row * E;
        const float* prev = t > 0 ? saved_a + (row - NH) * E : nullptr;  // row of step t-1
        const float* c_prev = prev ? prev : state0 + 1 * B * HS + ((b0 + b) * NH + hd) * DH;
        const float* n_prev = prev ? prev + DH : state0 + 2 * B * HS + ((b0 + b) * NH + hd) * DH;
#pragma omp simd
        for (int64_t d = 0; d < DH; ++d) {
          float ig = sg[d], fg = sg[DH + d], zt = sg[2 * DH + d], og = sg[3 * DH + d];
          float c = sa[d], n = sa[DH + d], w = sa[2 * DH + d], dlog_f = sa[3 * DH + d];
          float inv_n = 1.0f / n;
          float h = og * c * inv_n;
          float dht = dh[d] + go[d];
          float dct = dc[d] + dht * og * inv_n;
          float dnt = dn[d] - dht * h * inv_n;
          float g_a = (dct * c_prev[d] + dnt * n_prev[d]) * fg;
          float g_i = (dct * zt + dnt) * ig;
          float dmt = dm[d] - g_a - g_i;
          float da = g_a + w * dmt;
          float di = dm[d] - da;
          float df = da * dlog_f;
          float dz = dct * ig * (1.0f - zt * zt);
          float d_o = dht * h * (1.0f - og);
          dr[d] = di;
          dr[DH + d] = df;
          dr[2 * DH + d] = dz;
          dr[3 * DH + d] = d_o;
          dc[d] = dct * fg;
          dn[d] = dnt * fg;
          dm[d] = da;
          dh[d] = 0.0f;
        }
        std::memcpy(dg, dr, E * sizeof(float));
      }
      // dh_{t-1} += draw_t @ R^T for the rows that stepped (masked rows carry dh through unchanged).
      gemm_rows(dh_next.data(), DH, draw.data(), E, nb, RTh, E);
      for (int64_t b = 0; b < nb; ++b) {
        float* dh = dhs + b * HS;
        float* dn_ = dh_next.data() + b * DH;
        for (int64_t d = 0; d < DH; ++d) {
          dh[d] += dn_[d];
          dn_[d] = 0.0f;
        }
      }
    }
  }
}

}  // extern "C"

namespace {

// The decoding kernels' threads. At batch 1 a decoding step is bound by memory bandwidth, which one core cannot draw
// alone here, so each matrix product is cut into chunks that n threads claim one at a time. The threads are an OpenMP
// team: the library links libgomp.so.1, which resolves to the copy torch has already loaded, so these are torch's own
// intra-op threads. A team of its own would fight torch's for the cores: torch's threads spin for a few ms after each
// parallel op (an argmax over the logits at batch 8, a layer norm over 8 rows), and a worker of ours sharing a core
// with a spinning one stalled every chunk it held (batch-8 steps took 49 ms instead of 35).
// A thread descheduled in the middle of a chunk is waited for. A long wait now and then is a passing hiccup of the
// host (1-3 ms, about once a second here); long waits in quick succession mean a machine busier than its cores, and
// then calls run on their caller's thread alone for a while. So do a second Python thread's calls while one runs a
// team, and builds without OpenMP. A forked child asks for one thread (team_size in slstm_ops.cpp: libgomp's threads do
// not survive a fork).
using Clock = std::chrono::steady_clock;
constexpr std::chrono::microseconds kStall{1000};  // a wait this long at the end of a job, and kStallChunks times
constexpr int kStallChunks = 8;                     // the caller's own chunks: a thread lost its core mid-chunk
constexpr std::chrono::milliseconds kStalls{50};    // two such waits this close: the machine is busier than its
constexpr std::chrono::milliseconds kSolo{200};     // cores (not a passing hiccup), so no team for this long

// fn(c) for every c < chunks: on a team of n threads, or on the calling thread alone.
void run_chunks(int n, int64_t chunks, const std::function<void(int64_t)>& fn) {
#if defined(_OPENMP)
  static std::mutex busy;
  static std::atomic<int64_t> solo_until{0}, last_stall{0};  // Clock ticks
  std::unique_lock<std::mutex> lock(busy, std::defer_lock);
  const auto start = Clock::now();
  if (n > 1 && chunks > 1 && start.time_since_epoch().count() >= solo_until.load() && lock.try_lock()) {
    std::atomic<int64_t> next{0};
    Clock::time_point caller_done = start;
    int64_t mine = 1;
#pragma omp parallel num_threads(n)
    {
      FlushDenormals ftz;  // per thread (MXCSR is)
      int64_t ran = 0;
      for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks; ++ran) fn(c);
      if (omp_get_thread_num() == 0) caller_done = Clock::now(), mine = std::max<int64_t>(ran, 1);
    }
    const auto now = Clock::now();
    if (now - caller_done > std::max<Clock::duration>(kStall, kStallChunks * (caller_done - start) / mine))
      if (now - Clock::time_point(Clock::duration(last_stall.exchange(now.time_since_epoch().count()))) < kStalls)
        solo_until.store((now + kSolo).time_since_epoch().count());
    return;
  }
#endif
  for (int64_t c = 0; c < chunks; ++c) fn(c);
}

// Weights beyond this many bytes per call cannot stay in cache from one decoding step to the next: they stream from
// memory, prefetched kAhead bytes ahead (smaller weights stay in cache, and are read without prefetching).
constexpr int64_t kCached = 16 << 20;
// Below this many multiply-adds per call a team's hand-offs cost more than a second core gains.
constexpr int64_t kTeamWork = 1 << 20;
// What one claim of the team covers: rows of a weight matrix (row_grain), or one head's R (or kCols of its columns, a
// multiple of 16, the vector width, when the heads are fewer than the threads).
constexpr int64_t kRows = 16, kChunkWork = 1 << 20, kCols = 64;
// Batch rows x width from which the element-wise phases of a block step run on the team too (batch 8 at width 768:
// 1 of 29 ms per step; batch 1: a few microseconds per block, less than a hand-off).
constexpr int64_t kWideRows = 4096;

// Rows per claim of a weight matrix of `rows` rows of `cols` columns, read by nr rows of x, on a team of n: long runs
// of rows stream fastest (the prefetchers ramp up once per run; measured here: the 125m LM head at batch 1 read at
// 26 GB/s in claims of 16 rows and at 40 GB/s in claims of 256 or more), so one claim per thread, at most kChunkWork
// multiply-adds (the LM head's claims: their size made no difference beyond that). Four claims per thread, which let
// the others make up for a thread that falls behind, made the 125m step at batch 1 0.15-0.4 ms slower in bf16 and
// 0.15-0.7 ms in float32 (alternated in one process; the blocks' products are 0.3-1.5 MB).
inline int64_t row_grain(int64_t rows, int64_t cols, int64_t nr, int n) {
  const int64_t per_row = std::max<int64_t>(cols * nr, 1);  // an empty product (no columns or rows of x) is work 0
  return std::max(kRows, std::min(rows / n, kChunkWork / per_row) / 4 * 4);
}

// Chunk c of count items cut into chunks of `grain` (the last one shorter): [begin, end).
inline void chunk_range(int64_t c, int64_t grain, int64_t count, int64_t* begin, int64_t* end) {
  *begin = c * grain;
  *end = std::min(count, *begin + grain);
}

inline int64_t num_chunks(int64_t count, int64_t grain) { return (count + grain - 1) / grain; }

#if defined(__AVX512F__)
// acc[r][0:16] += sum_d hin[r][d] * w[d][0:16] for r < M and d < D, with the 16 x M sums in registers through all d.
template <typename W, int M>
void cols16(float* acc, int64_t as, const float* hin, int64_t hs, const W* w, int64_t ws, int64_t D) {
  __m512 s[M];
  for (int r = 0; r < M; ++r) s[r] = _mm512_loadu_ps(acc + r * as);
  for (int64_t d = 0; d < D; ++d) {
    const __m512 v = load16(w + d * ws);
    for (int r = 0; r < M; ++r) s[r] = _mm512_fmadd_ps(_mm512_set1_ps(hin[r * hs + d]), v, s[r]);
  }
  for (int r = 0; r < M; ++r) _mm512_storeu_ps(acc + r * as, s[r]);
}

// cols16 for batch rows r < nb, in groups of up to 8.
template <typename W>
void cols16_rows(float* acc, int64_t as, const float* hin, int64_t hs, int64_t nb, const W* w, int64_t ws, int64_t D) {
  for (int64_t b = 0; b < nb; b += 8) {
    float* a = acc + b * as;
    const float* h = hin + b * hs;
    switch (std::min<int64_t>(8, nb - b)) {
      case 1: cols16<W, 1>(a, as, h, hs, w, ws, D); break;
      case 2: cols16<W, 2>(a, as, h, hs, w, ws, D); break;
      case 3: cols16<W, 3>(a, as, h, hs, w, ws, D); break;
      case 4: cols16<W, 4>(a, as, h, hs, w, ws, D); break;
      case 5: cols16<W, 5>(a, as, h, hs, w, ws, D); break;
      case 6: cols16<W, 6>(a, as, h, hs, w, ws, D); break;
      case 7: cols16<W, 7>(a, as, h, hs, w, ws, D); break;
      default: cols16<W, 8>(a, as, h, hs, w, ws, D); break;
    }
  }
}

// Rows of w per panel of the batch path below. A panel's rows lie side by side in memory (48 KiB of R at the 125m
// preset in float32), so the next panel streams in while this one is worked; a column strip's sums go to acc and back
// once per panel. Measured at the 125m preset, batch 8, float32: the phase of R's and proj's products went from
// 5.9-6.1 to 4.5-4.6 ms per step, against strips down all of R's rows without prefetching.
constexpr int64_t kPanel = 16;
#endif

// acc[b][0:C] += sum_d hin[b][d] * w[d][0:C] for b < nb: rows of w strided by ws, of acc by as, of hin by hs. Every
// element's sum is one fma after another in the order of d, whatever nb, so a batch row gets the bits it gets alone.
// One row: four rows of w per pass over acc, in memory order (the order the prefetchers stream fastest). More rows
// (AVX-512): 16 columns of up to 8 rows in registers through all of d, or through panels of kPanel rows when w streams.
template <typename W>
inline void gemm_cols(float* acc, int64_t as, int64_t C, const float* hin, int64_t hs, int64_t nb, const W* w,
                      int64_t ws, int64_t D, bool stream) {
  int64_t c0 = 0;  // columns before c0 are done
#if defined(__AVX512F__)
  const int64_t row_bytes = C * static_cast<int64_t>(sizeof(W));
  if (nb > 1) {
    const int64_t C16 = C / 16 * 16, strips = C16 / 16;
    // panels only when they stream (whole rows in a row: a panel is one run of bytes); from cache, each strip's sums
    // stay in registers through all of D (panels cost 1.2-1.5x there: the sums' loads and stores)
    const bool prefetch_panels = stream && ws == C && strips > 0;
    const int64_t panel = prefetch_panels ? kPanel : std::max<int64_t>(D, 1);
    if (prefetch_panels)
      for (int64_t k = 0; k < std::min(panel, D) * row_bytes; k += 64)
        _mm_prefetch(reinterpret_cast<const char*>(w) + k, _MM_HINT_T1);
    for (int64_t d0 = 0; d0 < D; d0 += panel) {
      // the next panel's lines into L2, spread over this panel's column strips
      const int64_t next_rows = prefetch_panels ? std::clamp<int64_t>(D - d0 - panel, 0, panel) : 0;
      const char* next = next_rows ? reinterpret_cast<const char*>(w + (d0 + panel) * ws) : nullptr;
      const int64_t lines = (next_rows * row_bytes + 63) / 64, per_strip = strips ? (lines + strips - 1) / strips : 0;
      for (int64_t c = 0; c < C16; c += 16) {
        for (int64_t k = c / 16 * per_strip, e = std::min(lines, k + per_strip); k < e; ++k)
          _mm_prefetch(next + 64 * k, _MM_HINT_T1);
        cols16_rows(acc + c, as, hin + d0, hs, nb, w + d0 * ws + c, ws, std::min(panel, D - d0));
      }
    }
    c0 = C16;
  }
  // weights streaming from memory, whole rows in a row (ws == C): bfloat16 kAhead bytes ahead into L2, from the first
  // pass (not for the last few columns after the strips: their rows were just read); float32 with stream loads
  const bool prefetch = stream && ws == C && c0 == 0 && sizeof(W) == sizeof(bf16);
  const bool stream_loads = stream && c0 == 0 && sizeof(W) == sizeof(float) && line_aligned(w, ws * sizeof(W));
  if (prefetch)
    for (int64_t k = 0; k < std::min(kAhead, D * row_bytes); k += 64)
      _mm_prefetch(reinterpret_cast<const char*>(w) + k, _MM_HINT_T1);
#endif
  int64_t d = 0;
  for (; d + 4 <= D; d += 4) {
    const W *w0 = w + d * ws, *w1 = w0 + ws, *w2 = w1 + ws, *w3 = w2 + ws;
    for (int64_t b = 0; b < nb; ++b) {
      const float* hb = hin + b * hs + d;
      const float h0 = hb[0], h1 = hb[1], h2 = hb[2], h3 = hb[3];
      float* a = acc + b * as;
      int64_t c = c0;
#if defined(__AVX512F__)
      const __m512 v0 = _mm512_set1_ps(h0), v1 = _mm512_set1_ps(h1), v2 = _mm512_set1_ps(h2), v3 = _mm512_set1_ps(h3);
      const auto strip = [&](auto stream_load) {  // 16 columns at a time
        for (; c + 16 <= C; c += 16) {
          // kAhead bytes beyond each line of the four rows as the pass reaches it, spread over the pass (all four
          // rows' lines at once were 0.3-0.6 ms slower per 125m step at batch 1, in float32 and bf16 alike)
          if (prefetch && b == 0 && c * static_cast<int64_t>(sizeof(W)) % 64 == 0)
            for (const W* row : {w0, w1, w2, w3})
              _mm_prefetch(reinterpret_cast<const char*>(row + c) + kAhead, _MM_HINT_T1);
          __m512 s = _mm512_fmadd_ps(v0, load16<stream_load()>(w0 + c), _mm512_loadu_ps(a + c));
          s = _mm512_fmadd_ps(v1, load16<stream_load()>(w1 + c), s);
          s = _mm512_fmadd_ps(v2, load16<stream_load()>(w2 + c), s);
          _mm512_storeu_ps(a + c, _mm512_fmadd_ps(v3, load16<stream_load()>(w3 + c), s));
        }
      };
      if (stream_loads)
        strip(std::true_type{});
      else
        strip(std::false_type{});
#endif
      for (; c < C; ++c)  // fma, not a * b + c: the same rounding as the vector lanes, whichever path a column takes
        a[c] = std::fma(h3, to_f(w3[c]), std::fma(h2, to_f(w2[c]), std::fma(h1, to_f(w1[c]),
                                                                       std::fma(h0, to_f(w0[c]), a[c]))));
    }
  }
  for (; d < D; ++d) {
    const W* wd = w + d * ws;
    for (int64_t b = 0; b < nb; ++b) {
      const float hv = hin[b * hs + d];
      float* a = acc + b * as;
      for (int64_t c = c0; c < C; ++c) a[c] = std::fma(hv, to_f(wd[c]), a[c]);
    }
  }
}

// Scratch memory for one call, carved with take() into pieces that start on a cache line (a vector load that straddles
// two lines halves the batch products' speed). Kept by the calling thread from call to call up to kKeptScratch floats
// (a fresh allocation of a few hundred KiB is an mmap whose page faults cost ~0.2 ms per block at batch 8); larger
// calls (long drafts, wide batches) allocate their own and free it.
constexpr int64_t kKeptScratch = 4 << 20, kLine = 16;  // floats per cache line
class Scratch {
 public:
  explicit Scratch(int64_t n) {  // n: the sum of what take() will be asked for
    thread_local std::vector<float> kept;
    n += 16 * kLine;  // room to align the start and up to 15 pieces
    std::vector<float>& buffer = n > kKeptScratch ? owned_ : kept;
    if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
    next_ = buffer.data();
    align();
  }
  float* take(int64_t n) {
    float* piece = std::exchange(next_, next_ + n);
    align();
    return piece;
  }

 private:
  void align() { next_ += (kLine - reinterpret_cast<uintptr_t>(next_) / sizeof(float) % kLine) % kLine; }

  std::vector<float> owned_;
  float* next_;
};

using slstm::BlockDecodeArgs;

// S tokens through a whole block. Everything but the recurrence (h_{t-1} R) runs on all B*S rows at once (row r*S+t);
// the recurrence and the cell step through time.
template <typename T>
void block_decode(const BlockDecodeArgs& a) {
  FlushDenormals ftz;
  const int64_t B = a.B, S = a.S, NH = a.NH, DH = a.DH, K = a.K, F = a.F;
  const int64_t D = NH * DH, E = 4 * DH, HS = B * D, N = B * S;  // HS: from h to c, n, m in the state; N rows
  const T* x = static_cast<const T*>(a.x);
  const T *norm1_w = static_cast<const T*>(a.norm1_w), *conv_w = static_cast<const T*>(a.conv_w),
          *conv_b = static_cast<const T*>(a.conv_b), *proj_w = static_cast<const T*>(a.proj_w),
          *R = static_cast<const T*>(a.R), *bias = static_cast<const T*>(a.bias),
          *out_norm_w = static_cast<const T*>(a.out_norm_w), *norm2_w = static_cast<const T*>(a.norm2_w),
          *gate_up_b = static_cast<const T*>(a.gate_up_b), *down_b = static_cast<const T*>(a.down_b);
  const uint8_t* mask = a.mask;  // (B, S)
  const bool stream = a.stream;
  const int64_t WS = K > 1 ? B * (K - 1) * D : 0;  // the window's floats
  Scratch scratch(3 * N * D + NH * N * E + NH * B * E + 2 * D + 3 * N * F + WS + 4 * HS);
  float *res = scratch.take(N * D), *normed = scratch.take(N * D), *xc = scratch.take(N * D),
        *pre = scratch.take(NH * N * E), *rec = scratch.take(NH * B * E), *hnew = scratch.take(D),
        *y = scratch.take(D), *gate_up = scratch.take(N * 2 * F), *act_up = scratch.take(N * F),
        *window = scratch.take(WS), *state = scratch.take(4 * HS);  // worked on in float32, copied out at the end
  const T* window_in = static_cast<const T*>(a.window_in);
  for (int64_t i = 0; i < WS; ++i) window[i] = window_in ? to_f(window_in[i]) : 0.0f;
  for (int k = 0; k < 4; ++k) {  // h, c, n, m
    if (a.state_in[k])
      std::memcpy(state + k * HS, a.state_in[k], HS * sizeof(float));
    else
      std::fill(state + k * HS, state + (k + 1) * HS, 0.0f);
  }
  std::fill(rec, rec + NH * B * E, 0.0f);
  const int n = N * (8 * D * DH + 3 * F * D) >= kTeamWork ? static_cast<int>(a.threads) : 1;
  // the element-wise phases (norms, conv, cells, activation) on the team too when the rows are many
  const int nw = B * D >= kWideRows ? n : 1;
  // R's chunks: a whole head (its rows stream in memory order) unless the heads are fewer than the threads
  const int64_t col_grain = NH >= n ? std::max<int64_t>(E, 1) : kCols, col_chunks = num_chunks(E, col_grain);
  // 1. norm1, then the causal conv + SiLU, step by step; a masked step keeps the window (batch rows on the team)
  run_chunks(nw, B, [&](int64_t r) {
    float* win = window + r * (K - 1) * D;  // unused when K <= 1
    for (int64_t t = 0; t < S; ++t) {
      const int64_t row = r * S + t;
      const bool stepped = !mask || mask[row];
      for (int64_t d = 0; d < D; ++d) res[row * D + d] = to_f(x[row * D + d]);
      const float* u = normed + row * D;
      float* xcr = xc + row * D;
      offset_layer_norm(res + row * D, norm1_w, a.eps1, normed + row * D, D);
      if (K == 0) {
        std::memcpy(xcr, u, D * sizeof(float));
        continue;
      }
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) xcr[d] = to_f(conv_b[d]) + u[d] * to_f(conv_w[d * K + K - 1]);
      for (int64_t k = 0; k < K - 1; ++k)
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) xcr[d] += win[k * D + d] * to_f(conv_w[d * K + k]);
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) xcr[d] *= sigmoid_(xcr[d]);  // SiLU
      if (K > 1 && stepped) {  // the window holds what the cache would between steps: u in the model's dtype
        std::memmove(win, win + D, (K - 2) * D * sizeof(float));
        for (int64_t d = 0; d < D; ++d) win[(K - 2) * D + d] = as_stored<T>(u[d]);
      }
      if (K > 1 && a.step_windows) {
        T* kept = static_cast<T*>(a.step_windows) + (t * B + r) * (K - 1) * D;
        for (int64_t i = 0; i < (K - 1) * D; ++i) store(win[i], kept + i);  // exact: win holds stored values
      }
    }
  });
  // 2. pre[head][row] = [W_i xc | W_f xc | W_z u | W_o u] for every row (chunks of rows of proj_w), and the first
  // step's rec[head][r] = h_{-1} R[head] (chunks of columns of R, in every head; first: they are the larger chunks)
  auto recurrence = [&](int64_t c) {  // chunk c: head c / col_chunks, columns of chunk c % col_chunks
    const int64_t hd = c / col_chunks;
    int64_t begin, end;
    chunk_range(c % col_chunks, col_grain, E, &begin, &end);
    gemm_cols(rec + hd * B * E + begin, E, end - begin, state + hd * DH, D, B, R + hd * DH * E + begin, E, DH,
              stream);
  };
  const int64_t rec_chunks = NH * col_chunks;
  const int64_t proj_grain = row_grain(4 * D, DH, N, n);
  run_chunks(n, rec_chunks + num_chunks(4 * D, proj_grain), [&](int64_t c) {
    if (c < rec_chunks) return recurrence(c);
    int64_t begin, end;
    chunk_range(c - rec_chunks, proj_grain, 4 * D, &begin, &end);  // rows of proj_w (4, NH, DH, DH): (gate, head, out)
    while (begin < end) {
      const int64_t g = begin / D, hd = begin % D / DH, o = begin % DH, rows = std::min(end - begin, DH - o);
      const float* src = (g < 2 ? xc : normed) + hd * DH;  // i, f read xc; z, o the normed input
      gemv_rows(proj_w + begin * DH, nullptr, static_cast<const T*>(nullptr), src, D, pre + hd * N * E + g * DH + o,
                E, N, rows, DH, false, stream);
      begin += rows;
    }
  });
  // 3. per step: the cell (a masked row keeps its state and outputs its kept h), the per-head norm and the residual;
  // then the next step's recurrence
  for (int64_t t = 0; t < S; ++t) {
    if (t > 0) {
      std::fill(rec, rec + NH * B * E, 0.0f);
      run_chunks(n, rec_chunks, recurrence);
    }
    run_chunks(nw, NH, [&](int64_t hd) {  // heads on the team
      float *hn = hnew + hd * DH, *yh = y + hd * DH;
      for (int64_t r = 0; r < B; ++r) {
        const int64_t row = r * S + t;
        float* h = state + (r * NH + hd) * DH;
        float* p = pre + (hd * N + row) * E;
        const float* q = rec + (hd * B + r) * E;
        for (int64_t e = 0; e < E; ++e) p[e] += (bias ? to_f(bias[hd * E + e]) : 0.0f) + q[e];
        if (mask && !mask[row])
          std::memcpy(hn, h, DH * sizeof(float));
        else
          cell_step<false>(p, h, h + HS, h + 2 * HS, h + 3 * HS, hn, nullptr, nullptr, DH, a.exp_forget);
        offset_layer_norm(hn, out_norm_w + hd * DH, a.eps_out, yh, DH);
        float* rr = res + row * D + hd * DH;
        for (int64_t e = 0; e < DH; ++e) rr[e] += yh[e];
      }
    });
    if (a.step_states) std::memcpy(a.step_states + t * 4 * HS, state, 4 * HS * sizeof(float));
  }
  // 4. the gated FFN on norm2 of the result, added to it, every row (chunks of rows of each weight). Rows
  // [first, first + rows) of an FFN weight w of `cols` columns (int8 when it has a scale per row, else T) for the N
  // rows of `in` into dst (strided by ds).
  const auto ffn_rows = [&](const void* w, const float* scale, const T* b, int64_t first, int64_t rows, int64_t cols,
                            const float* in, float* dst, int64_t ds, bool accumulate) {
    const T* bias_rows = b ? b + first : nullptr;
    if (scale)
      gemv_rows(static_cast<const int8_t*>(w) + first * cols, scale + first, bias_rows, in, cols, dst, ds, N, rows,
                cols, accumulate, stream);
    else
      gemv_rows(static_cast<const T*>(w) + first * cols, nullptr, bias_rows, in, cols, dst, ds, N, rows, cols,
                accumulate, stream);
  };
  if (F > 0) {
    run_chunks(nw, N, [&](int64_t row) { offset_layer_norm(res + row * D, norm2_w, a.eps2, normed + row * D, D); });
    // chunks of units f: their gate rows f and up rows F + f, then act(gate) * up for every row
    const int64_t up_grain = row_grain(F, 2 * D, N, n), down_grain = row_grain(D, F, N, n);
    run_chunks(n, num_chunks(F, up_grain), [&](int64_t c) {
      int64_t begin, end;
      chunk_range(c, up_grain, F, &begin, &end);
      for (const int64_t first : {begin, F + begin})
        ffn_rows(a.gate_up_w, a.gate_up_scale, gate_up_b, first, end - begin, D, normed, gate_up + first, 2 * F, false);
      for (int64_t row = 0; row < N; ++row) {
        const float* gu = gate_up + row * 2 * F;  // [gate | up]
        for (int64_t f = begin; f < end; ++f) act_up[row * F + f] = ffn_act(gu[f], a.act) * gu[F + f];
      }
    });
    run_chunks(n, num_chunks(D, down_grain), [&](int64_t c) {
      int64_t begin, end;
      chunk_range(c, down_grain, D, &begin, &end);
      ffn_rows(a.down_w, a.down_scale, down_b, begin, end - begin, F, act_up, res + begin, D, true);
    });
  }
  T* out = static_cast<T*>(a.out);
  for (int64_t i = 0; i < N * D; ++i) store(res[i], out + i);
  for (int64_t i = 0; i < WS; ++i) store(window[i], static_cast<T*>(a.window) + i);
  for (int k = 0; k < 4; ++k) std::memcpy(a.state[k], state + k * HS, HS * sizeof(float));
}

// out (N, D) = the offset LayerNorm of each row of x (N, D), float32 math, stored in T.
template <typename T>
void norm_rows(const T* x, const T* w, float eps, T* out, int64_t N, int64_t D) {
  std::vector<float> row(D), normed(D);
  for (int64_t r = 0; r < N; ++r) {
    for (int64_t d = 0; d < D; ++d) row[d] = to_f(x[r * D + d]);
    offset_layer_norm(row.data(), w, eps, normed.data(), D);
    for (int64_t d = 0; d < D; ++d) store(normed[d], out + r * D + d);
  }
}

// out (B, O) = x (B, I) W^T (+ b) in chunks of rows of W (O, I) claimed by the team (W of type T, or int8 times
// scale[o] per row); float32 sums.
template <typename T, typename W>
void linear_decode(const T* x, const W* w, const float* scale, const T* b, T* out, int64_t B, int64_t O, int64_t I,
                   int threads) {
  FlushDenormals ftz;
  Scratch scratch(B * I + B * O);
  float *xf = scratch.take(B * I), *acc = scratch.take(B * O);
  for (int64_t i = 0; i < B * I; ++i) xf[i] = to_f(x[i]);
  const int n = B * O * I >= kTeamWork ? threads : 1;
  const bool stream = O * I * static_cast<int64_t>(sizeof(W)) > kCached;
  if (stream) slstm::advise_huge_pages(w, O * I * static_cast<int64_t>(sizeof(W)));
  const int64_t grain = row_grain(O, I, B, n);
  run_chunks(n, num_chunks(O, grain), [&](int64_t c) {
    int64_t begin, end;
    chunk_range(c, grain, O, &begin, &end);
    gemv_rows(w + begin * I, scale ? scale + begin : nullptr, b ? b + begin : nullptr, xf, I, acc + begin, O, B,
              end - begin, I, false, stream);
    for (int64_t r = 0; r < B; ++r)
      for (int64_t o = begin; o < end; ++o) store(acc[r * O + o], out + r * O + o);
  });
}

}  // namespace

namespace slstm {

void block_decode(BlockDecodeArgs* args, int64_t L) {
  // every weight matrix of a block, with its bytes
  const auto matrices = [](const BlockDecodeArgs& a) {
    const int64_t D = a.NH * a.DH, size = a.dtype == 0 ? 4 : 2;
    return std::array<std::pair<const void*, int64_t>, 4>{
        {{a.proj_w, 4 * D * a.DH * size}, {a.R, 4 * D * a.DH * size},
         {a.gate_up_w, 2 * a.F * D * (a.gate_up_scale ? 1 : size)}, {a.down_w, D * a.F * (a.down_scale ? 1 : size)}}};
  };
  int64_t bytes = 0;  // of the call
  for (int64_t l = 0; l < L; ++l)
    for (const auto& [w, n] : matrices(args[l])) bytes += n;
  for (int64_t l = 0; l < L; ++l) {
    args[l].stream = bytes > kCached;
    if (args[l].stream)
      for (const auto& [w, n] : matrices(args[l])) slstm::advise_huge_pages(w, n);
    if (args[l].dtype == 0)
      ::block_decode<float>(args[l]);
    else
      ::block_decode<bf16>(args[l]);
  }
}

void norm_rows(const void* x, const void* w, float eps, void* out, int64_t N, int64_t D, int dtype) {
  if (dtype == 0)
    ::norm_rows(static_cast<const float*>(x), static_cast<const float*>(w), eps, static_cast<float*>(out), N, D);
  else
    ::norm_rows(static_cast<const bf16*>(x), static_cast<const bf16*>(w), eps, static_cast<bf16*>(out), N, D);
}

// T: x, out and b; the weight is T, or int8 when it has a scale
template <typename T>
void linear_decode_as(const void* x, const void* w, const float* scale, const void* b, void* out, int64_t B, int64_t O,
                      int64_t I, int threads) {
  const T *xt = static_cast<const T*>(x), *bt = static_cast<const T*>(b);
  if (scale)
    ::linear_decode(xt, static_cast<const int8_t*>(w), scale, bt, static_cast<T*>(out), B, O, I, threads);
  else
    ::linear_decode(xt, static_cast<const T*>(w), scale, bt, static_cast<T*>(out), B, O, I, threads);
}

void linear_decode(const void* x, const void* w, const float* scale, const void* b, void* out, int64_t B, int64_t O,
                   int64_t I, int threads, int dtype) {
  if (dtype == 0)
    linear_decode_as<float>(x, w, scale, b, out, B, O, I, threads);
  else
    linear_decode_as<bf16>(x, w, scale, b, out, B, O, I, threads);
}

}  // namespace slstm
