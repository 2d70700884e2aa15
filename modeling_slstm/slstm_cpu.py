"""The sLSTM recurrence as one C++ loop over time, forward and backward: the "compiled" backend of `slstm_op` (CPU).

The C++ source below is compiled on first use with the system C++ compiler (`$CXX`, else `c++`/`g++`) into a plain
shared library (no Python or torch headers, so it builds in seconds; `-march=native` first, portable flags if the
compiler refuses that) and cached under `$TORCH_EXTENSIONS_DIR/modeling_slstm` (default
`~/.cache/torch_extensions/modeling_slstm`), keyed by a hash of the source, the flags and the CPU. It is called through
ctypes on raw float32 pointers.

Heads are independent over the whole sequence (R is block-diagonal, the gate math is elementwise), so the work is
split into blocks (heads x batch rows) that each run the full time loop without synchronising with each other; blocks
run on a small thread pool (ctypes releases the GIL), and a small call is one call on the calling thread. Decoding has
its own entry point, `block_decode_step`: one token through a whole block (norms, conv, gate maps, cell, per-head norm,
FFN) in one call, which cuts the Python and dispatch overhead of ~20 small ops per block.
Per head and step: pre-activation = W·x + b + h @ R[head] (four rows of R per pass, vectorised), then the gate math
with polynomial exp/log1p/tanh (a few ulp from libm). Denormals are flushed (FTZ/DAZ) inside the kernel, so they
cannot slow it down. The backward walks the steps in reverse from the activations the forward saved (i', f', tanh z,
σ(o), c, n, and the tie weight of the stabiliser max), writes dL/d(gates) and carries dh through R^T; dR and db are
one matmul / sum over all steps afterwards.
"""

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch
from torch.autograd.function import once_differentiable
from transformers.utils import logging


logger = logging.get_logger(__name__)

_SOURCE = r"""
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__x86_64__) || defined(_M_X64)
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

struct Dims {
  int64_t B, S, NH, DH;
};

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

// LayerNorm without bias, offset weight: out = (x - mean) / sqrt(var + eps) * (1 + w), over D (a block norm, or one
// head of the per-head norm). Sums in double: the residual stream can sit far from zero, where a sequential float sum
// loses digits that torch's blocked sums keep.
inline void offset_layer_norm(const float* x, const float* w, float eps, float* out, int64_t D) {
  double sum = 0.0, sq = 0.0;
  for (int64_t d = 0; d < D; ++d) sum += x[d];
  const double mean = sum / D;
  for (int64_t d = 0; d < D; ++d) sq += (x[d] - mean) * (x[d] - mean);
  const float m = static_cast<float>(mean), inv = static_cast<float>(1.0 / std::sqrt(sq / D + eps));
  for (int64_t d = 0; d < D; ++d) out[d] = (x[d] - m) * inv * (1.0f + w[d]);
}

// Sixteen partial sums (vector lanes) rather than an `omp simd reduction`: inlined into loop nests, GCC lowered that
// to scalar code here, 3x slower.
inline float dot(const float* a, const float* b, int64_t n) {
  float part[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
#pragma omp simd
    for (int64_t j = 0; j < 16; ++j) part[j] += a[i + j] * b[i + j];
  float acc = 0.0f;
  for (int64_t j = 0; j < 16; ++j) acc += part[j];
  for (; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

// acc[j][k] = W[j, :] . x[k] for 4 rows of W (stride I) and 4 rows of x (stride xs): 8 loads per 16 multiply-adds.
// Not inlined: inside the caller's loop nest GCC no longer vectorised its reduction.
__attribute__((noinline)) void dot4x4(const float* W, int64_t I, const float* x, int64_t xs, float acc[4][4]) {
  const float *w0 = W, *w1 = w0 + I, *w2 = w1 + I, *w3 = w2 + I;
  const float *x0 = x, *x1 = x0 + xs, *x2 = x1 + xs, *x3 = x2 + xs;
  float a00 = 0, a01 = 0, a02 = 0, a03 = 0, a10 = 0, a11 = 0, a12 = 0, a13 = 0;
  float a20 = 0, a21 = 0, a22 = 0, a23 = 0, a30 = 0, a31 = 0, a32 = 0, a33 = 0;
#pragma omp simd reduction(+ : a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33)
  for (int64_t i = 0; i < I; ++i) {
    const float v0 = x0[i], v1 = x1[i], v2 = x2[i], v3 = x3[i];
    a00 += w0[i] * v0, a01 += w0[i] * v1, a02 += w0[i] * v2, a03 += w0[i] * v3;
    a10 += w1[i] * v0, a11 += w1[i] * v1, a12 += w1[i] * v2, a13 += w1[i] * v3;
    a20 += w2[i] * v0, a21 += w2[i] * v1, a22 += w2[i] * v2, a23 += w2[i] * v3;
    a30 += w3[i] * v0, a31 += w3[i] * v1, a32 += w3[i] * v2, a33 += w3[i] * v3;
  }
  acc[0][0] = a00, acc[0][1] = a01, acc[0][2] = a02, acc[0][3] = a03;
  acc[1][0] = a10, acc[1][1] = a11, acc[1][2] = a12, acc[1][3] = a13;
  acc[2][0] = a20, acc[2][1] = a21, acc[2][2] = a22, acc[2][3] = a23;
  acc[3][0] = a30, acc[3][1] = a31, acc[3][2] = a32, acc[3][3] = a33;
}

// out[r][o] (+)= b[o] + W[o, :] . x[r] for rows r < nr and o < O; W (O, I) row-major, rows of x and out strided by
// xs and os. Tiles of 4 outputs x 4 rows (W read once per 4 rows), then single dot products for what is left.
inline void gemv_rows(const float* W, const float* b, const float* x, int64_t xs, float* out, int64_t os, int64_t nr,
                      int64_t O, int64_t I, bool accumulate) {
  const int64_t nr4 = nr - nr % 4, O4 = nr4 > 0 ? O - O % 4 : 0;
  float acc[4][4];
  for (int64_t o = 0; o < O4; o += 4)
    for (int64_t r = 0; r < nr4; r += 4) {
      dot4x4(W + o * I, I, x + r * xs, xs, acc);
      for (int64_t j = 0; j < 4; ++j)
        for (int64_t k = 0; k < 4; ++k) {
          float* dst = out + (r + k) * os + o + j;
          const float v = acc[j][k] + (b ? b[o + j] : 0.0f);
          *dst = accumulate ? *dst + v : v;
        }
    }
  for (int64_t o = 0; o < O; ++o)  // outputs past the tiles: every row; tiled outputs: rows past the tiles
    for (int64_t r = o < O4 ? nr4 : 0; r < nr; ++r) {
      const float v = dot(W + o * I, x + r * xs, I) + (b ? b[o] : 0.0f);
      out[r * os + o] = accumulate ? out[r * os + o] + v : v;
    }
}

// The FFN activations of the config, by code: 0 gelu (erf), 1 relu, 2 relu², 3 silu, 4 sigmoid, 5 selu.
inline float ffn_act(float x, int act) {
  switch (act) {
    case 0: return 0.5f * x * (1.0f + std::erf(x * 0.70710678118654752f));
    case 1: return x > 0.0f ? x : 0.0f;
    case 2: return x > 0.0f ? x * x : 0.0f;
    case 3: return x * sigmoid_(x);
    case 4: return sigmoid_(x);
    default: return 1.0507009873554805f * (x > 0.0f ? x : 1.6732632423543772f * std::expm1(x));
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

// One token through a whole block for B batch rows: x (B,D) the residual stream, out (B,D);
// out = x + sLSTM(norm1(x)), then out += down(act(gate) * up) of norm2(out) when F > 0. mask (B) or null (all steps
// taken); window (B,K-1,D) in/out (null when K <= 1); conv_w (D,K), conv_b (D); proj_w (4,NH,DH_out,DH_in) with
// gates i, f reading xc and z, o reading the normed input; R (NH,DH,4DH), bias (NH,4DH) or null; state (4,B,NH,DH)
// in/out; norm weights (D) are offsets (scale 1 + w); gate_up_w (2F,D) rows 0..F-1 the gate; down_w (D,F); FFN
// biases or null.
void slstm_block_decode(const float* x, const uint8_t* mask, const float* norm1_w, float eps1, float* window,
                        const float* conv_w, const float* conv_b, const float* proj_w, const float* R,
                        const float* bias, float* state, const float* out_norm_w, float eps_out, const float* norm2_w,
                        float eps2, const float* gate_up_w, const float* gate_up_b, const float* down_w,
                        const float* down_b, float* out, int64_t B, int64_t NH, int64_t DH, int64_t K, int64_t F,
                        int exp_forget, int act) {
  FlushDenormals ftz;
  const int64_t D = NH * DH, E = 4 * DH, HS = B * D;  // HS: from h to c, n, m in the state
  std::vector<float> normed(B * D), xc(B * D), raw(NH * B * E), hnew(DH), y(DH), gate_up(B * 2 * F), act_up(B * F);
  // 1. norm1, then the causal conv + SiLU; a masked row keeps its window
  for (int64_t r = 0; r < B; ++r) {
    const float* u = normed.data() + r * D;
    float* xcr = xc.data() + r * D;
    offset_layer_norm(x + r * D, norm1_w, eps1, normed.data() + r * D, D);
    if (K == 0) {
      std::memcpy(xcr, u, D * sizeof(float));
      continue;
    }
    float* win = window + r * (K - 1) * D;  // unused when K == 1
    for (int64_t d = 0; d < D; ++d) {
      float acc = conv_b[d] + u[d] * conv_w[d * K + K - 1];
      for (int64_t k = 0; k < K - 1; ++k) acc += win[k * D + d] * conv_w[d * K + k];
      xcr[d] = acc * sigmoid_(acc);  // SiLU
    }
    if (K > 1 && (!mask || mask[r])) {
      std::memmove(win, win + D, (K - 2) * D * sizeof(float));
      std::memcpy(win + (K - 2) * D, u, D * sizeof(float));
    }
  }
  // 2. per head, all rows: raw[head][r] = [W_i xc | W_f xc | W_z u | W_o u] + bias + h_prev R[head]
  for (int64_t hd = 0; hd < NH; ++hd) {
    float* rh = raw.data() + hd * B * E;
    for (int64_t g = 0; g < 4; ++g) {
      const float* src = (g < 2 ? xc.data() : normed.data()) + hd * DH;  // i, f read xc; z, o the normed input
      gemv_rows(proj_w + (g * NH + hd) * DH * DH, bias ? bias + hd * E + g * DH : nullptr, src, D, rh + g * DH, E, B,
                DH, DH, false);
    }
    gemm_rows(rh, E, state + hd * DH, D, B, R + hd * DH * E, DH);
  }
  // 3. the cell (a masked row keeps its state and outputs its kept h), per-head norm, residual
  for (int64_t r = 0; r < B; ++r) {
    for (int64_t hd = 0; hd < NH; ++hd) {
      float* h = state + (r * NH + hd) * DH;
      if (mask && !mask[r])
        std::memcpy(hnew.data(), h, DH * sizeof(float));
      else
        cell_step<false>(raw.data() + (hd * B + r) * E, h, h + HS, h + 2 * HS, h + 3 * HS, hnew.data(), nullptr,
                         nullptr, DH, exp_forget);
      offset_layer_norm(hnew.data(), out_norm_w + hd * DH, eps_out, y.data(), DH);
      const int64_t at = r * D + hd * DH;
      for (int64_t e = 0; e < DH; ++e) out[at + e] = x[at + e] + y[e];
    }
  }
  if (F == 0) return;
  // 4. the gated FFN on norm2 of the result, added to it
  for (int64_t r = 0; r < B; ++r) offset_layer_norm(out + r * D, norm2_w, eps2, normed.data() + r * D, D);
  gemv_rows(gate_up_w, gate_up_b, normed.data(), D, gate_up.data(), 2 * F, B, 2 * F, D, false);
  for (int64_t r = 0; r < B; ++r) {
    const float* gu = gate_up.data() + r * 2 * F;  // [gate | up]
    for (int64_t f = 0; f < F; ++f) act_up[r * F + f] = ffn_act(gu[f], act) * gu[F + f];
  }
  gemv_rows(down_w, down_b, act_up.data(), F, out, D, B, D, F, true);
}

}  // extern "C"
"""

_FLAGS = ["-O3", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC", "-std=c++17"]
_NATIVE = "-march=native"  # tried first; dropped when the compiler rejects it
_lock = threading.Lock()
_lib = None  # ctypes.CDLL once built; False when the build failed
_pools: dict = {}  # (process id, thread count) -> ThreadPoolExecutor; a forked child never reuses its parent's


def _cache_dir() -> str:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch_extensions"
    )
    return os.path.join(root, "modeling_slstm")


def _cpu_key() -> str:
    """The CPU the library is built for (-march=native): machine and instruction-set flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    return platform.machine() + flags


def _compile(compiler: str, flags: list) -> str:
    """Compile the source with these flags into the cache (once) and return the library's path."""
    key = hashlib.sha256("\n".join([_SOURCE, " ".join(flags), _cpu_key(), compiler]).encode()).hexdigest()[:16]
    directory = _cache_dir()
    path = os.path.join(directory, f"slstm_cpu_{key}.so")
    if not os.path.exists(path):
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            src = os.path.join(tmp, "slstm_cpu.cpp")
            with open(src, "w") as f:
                f.write(_SOURCE)
            tmp_lib = os.path.join(tmp, "slstm_cpu.so")
            result = subprocess.run([compiler, *flags, src, "-o", tmp_lib], capture_output=True, text=True)
            if result.returncode != 0:
                lines = result.stderr.splitlines()
                first_error = next((line for line in lines if "error" in line), lines[0] if lines else "")
                detail = first_error.strip()[:300] or f"exit code {result.returncode}"
                raise RuntimeError(f"{os.path.basename(compiler)} failed: {detail}")
            os.replace(tmp_lib, path)  # atomic: concurrent builders never see a half-written library
    return path


def _build() -> ctypes.CDLL:
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    try:
        path = _compile(compiler, [_NATIVE, *_FLAGS])
    except RuntimeError:
        path = _compile(compiler, _FLAGS)
    lib = ctypes.CDLL(path)
    i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
    lib.slstm_forward.argtypes = [ptr] * 8 + [i64] * 4 + [ctypes.c_int] + [i64] * 4
    lib.slstm_backward.argtypes = [ptr] * 8 + [i64] * 8
    lib.slstm_block_decode.argtypes = (
        [ptr] * 3 + [f32] + [ptr] * 8 + [f32, ptr, f32] + [ptr] * 5 + [i64] * 5 + [ctypes.c_int] * 2
    )
    for fn in (lib.slstm_forward, lib.slstm_backward, lib.slstm_block_decode):
        fn.restype = None
    return lib


def compiled_available() -> bool:
    """Build (once, on first use) and load the C++ kernel; False, with one warning, when that fails."""
    global _lib
    if _lib is None:
        with _lock:
            if _lib is None:
                try:
                    _lib = _build()
                    logger.info(f"sLSTM: using the compiled C++ kernel {_lib._name}.")
                except Exception as err:  # noqa: BLE001  (any build or load failure means: use the fallback)
                    logger.warning_once(f"sLSTM: the C++ kernel could not be built, using the PyTorch path ({err}).")
                    _lib = False
    return bool(_lib)


def _ptr(t: Optional[torch.Tensor]):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _run_units(fn, args, batch_size: int, num_heads: int, work: int) -> None:
    """Call fn(*args, h_begin, h_end, b0, b1) over blocks covering heads x batch rows: one call on one thread for small
    work (decoding), else one block per thread (whole heads when there are enough, else heads x batch chunks)."""
    threads = min(max(1, torch.get_num_threads()), num_heads * batch_size) if work >= 32768 else 1
    if threads == 1:
        fn(*args, 0, num_heads, 0, batch_size)
        return
    if num_heads >= threads:
        bounds = [num_heads * k // threads for k in range(threads + 1)]
        blocks = [(lo, hi, 0, batch_size) for lo, hi in zip(bounds[:-1], bounds[1:])]
    else:
        chunks = -(-threads // num_heads)
        bounds = [batch_size * k // chunks for k in range(chunks + 1)]
        blocks = [(h, h + 1, lo, hi) for h in range(num_heads) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]
    with _lock:
        key = (os.getpid(), threads)
        pool = _pools.get(key) or _pools.setdefault(key, ThreadPoolExecutor(threads, "slstm"))
    list(pool.map(lambda block: fn(*args, *block), blocks))


def _forward(gates, recurrent_kernel, bias, state, mask, exp_forget, save):
    """Run the forward kernel. Returns out (B, S, NH, DH) and the final state (4, B, NH, DH), float32, plus what the
    backward needs when `save`: (R, initial state (4, B, NH, DH), uint8 mask, saved_g, saved_a)."""
    batch_size, seq_len, num_heads, four_dh = gates.shape
    g = gates.detach().float().contiguous()
    r = recurrent_kernel.detach().float().contiguous()
    b = None if bias is None else bias.detach().float().contiguous()
    state0 = torch.stack([s.detach() for s in state]).float()  # (4, B, NH, DH)
    final = state0.clone()
    mask_u8 = None if mask is None else mask.to(torch.uint8).contiguous()
    out = torch.empty(batch_size, seq_len, num_heads, four_dh // 4)
    saved_g = torch.empty_like(g) if save else None
    saved_a = torch.empty_like(g) if save else None
    args = (_ptr(g), _ptr(r), _ptr(b), _ptr(final), _ptr(mask_u8), _ptr(out), _ptr(saved_g), _ptr(saved_a),
            batch_size, seq_len, num_heads, four_dh // 4, int(exp_forget))
    _run_units(_lib.slstm_forward, args, batch_size, num_heads, gates.numel())
    return out, final, (r, state0, mask_u8, saved_g, saved_a)


class SLSTMCompiledFunction(torch.autograd.Function):
    """autograd Function over (gates, R, bias, h0, c0, n0, m0) running the C++ loops on float32 CPU copies."""

    @staticmethod
    def forward(ctx, gates, recurrent_kernel, bias, h0, c0, n0, m0, mask, exp_forget):
        out, final, saved = _forward(gates, recurrent_kernel, bias, (h0, c0, n0, m0), mask, exp_forget, True)
        ctx.save_for_backward(*saved, out)
        ctx.has_bias, ctx.gates_dtype = bias is not None, gates.dtype
        ctx.mark_non_differentiable(*([] if mask is None else [mask]))
        return out.to(gates.dtype), *final.unbind(0)

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, dh_t, dc_t, dn_t, dm_t):
        r, state0, mask_u8, saved_g, saved_a, out = ctx.saved_tensors
        batch_size, seq_len, num_heads, head_dim = out.shape
        d_state = torch.stack([g.float() for g in (dh_t, dc_t, dn_t, dm_t)])  # (4, B, NH, DH), updated in place
        d_out = d_out.float().contiguous()
        d_gates = torch.empty_like(saved_g)
        rt = r.transpose(1, 2).contiguous()  # (NH, 4*DH, DH)
        args = (_ptr(rt), _ptr(state0), _ptr(mask_u8), _ptr(saved_g), _ptr(saved_a), _ptr(d_out), _ptr(d_state),
                _ptr(d_gates), batch_size, seq_len, num_heads, head_dim)
        _run_units(_lib.slstm_backward, args, batch_size, num_heads, saved_g.numel())
        # dR[h] = sum over batch and steps of h_{t-1}^T dgates_t
        h_prev = torch.cat([state0[0, :, None], out[:, :-1]], dim=1)  # (B, S, NH, DH)
        d_r = torch.einsum("bshd,bshe->hde", h_prev, d_gates)
        d_bias = d_gates.sum((0, 1)) if ctx.has_bias else None
        return d_gates.to(ctx.gates_dtype), d_r, d_bias, *d_state.unbind(0), None, None


def slstm_compiled_scan(gates, recurrent_kernel, bias, state, mask, forget_gate):
    """As `slstm_op.slstm_scan_reference`, on the C++ kernel (call `compiled_available()` first). Without autograd
    (inference, decoding) the kernel is called directly and saves nothing for a backward."""
    batch_size, _, num_heads, four_dh = gates.shape
    if state is None:
        zeros = torch.zeros(batch_size, num_heads, four_dh // 4, dtype=torch.float32, device=gates.device)
        state = (zeros,) * 4
    mask = None if mask is None else mask.bool()
    tensors = (gates, recurrent_kernel, bias, *state)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)):
        out, final, _ = _forward(gates, recurrent_kernel, bias, state, mask, forget_gate == "exp", False)
        return out.to(gates.dtype), tuple(final.unbind(0))
    out, *final = SLSTMCompiledFunction.apply(*tensors, mask, forget_gate == "exp")
    return out, tuple(final)


# FFN activation name -> the kernel's code (see ffn_act in the C++ source)
_ACTIVATION_CODES = {"gelu": 0, "relu": 1, "relu2": 2, "silu": 3, "swish": 3, "sigmoid": 4, "selu": 5}


def _float32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    # a no-op for float32 weights; makes a model with weights of mixed dtypes safe to read as float32
    return None if t is None else t.detach().float().contiguous()


def block_decode_step(block, x: torch.Tensor, mask: Optional[torch.Tensor], window: Optional[torch.Tensor], state):
    """One token through a whole `SLSTMBlock` in one kernel call (eval, no autograd, float32 CPU).

    x (B, 1, D) the residual stream, mask (B, 1) bool or None (all steps taken): a False row keeps its window and
    state and its sLSTM output is its kept h, normed, as the op does. window (B, K-1, D) or None (zeros), state
    (h, c, n, m) of (B, NH, DH) or None (zeros) -> out (B, 1, D), new window (None when K <= 1), new state.
    The caller checks the conditions.
    """
    layer, ffn = block.slstm, block.ffn
    batch_size, _, dim = x.shape
    nh, dh = layer.num_heads, layer.head_dim
    k = layer.conv.kernel_size if layer.conv is not None else 0
    keep = None if mask is None else mask.detach().reshape(batch_size).bool().contiguous()  # bool: one byte, 0 or 1
    new_window = None  # a fresh copy, updated in place by the kernel
    if k > 1:
        new_window = torch.zeros(batch_size, k - 1, dim) if window is None else _float32(window).clone()
    new_state = torch.zeros(4, batch_size, nh, dh) if state is None else torch.stack([_float32(s) for s in state])
    out = torch.empty(batch_size, 1, dim)
    conv = (layer.conv.conv.weight, layer.conv.conv.bias) if layer.conv is not None else (None, None)
    ffn_size = ffn.down_proj.in_features if ffn is not None else 0
    ffn_tensors = (
        (block.ffn_norm.weight, ffn.gate_up_proj.weight, ffn.gate_up_proj.bias, ffn.down_proj.weight, ffn.down_proj.bias)
        if ffn is not None else (None,) * 5
    )
    tensors = [_float32(t) for t in (x, block.slstm_norm.weight, *conv, layer.gate_proj.weight, layer.recurrent_kernel,
                                     layer.gate_bias, layer.out_norm.weight, *ffn_tensors)]
    x_, norm1_w, conv_w, conv_b, proj_w, r, bias, out_norm_w, norm2_w, gate_up_w, gate_up_b, down_w, down_b = tensors
    _lib.slstm_block_decode(  # one thread: a pool lost to torch's spinning OpenMP threads here
        _ptr(x_), _ptr(keep), _ptr(norm1_w), block.slstm_norm.eps, _ptr(new_window), _ptr(conv_w), _ptr(conv_b),
        _ptr(proj_w), _ptr(r), _ptr(bias), _ptr(new_state), _ptr(out_norm_w), layer.out_norm.eps, _ptr(norm2_w),
        block.ffn_norm.eps if ffn is not None else 0.0, _ptr(gate_up_w), _ptr(gate_up_b), _ptr(down_w), _ptr(down_b),
        _ptr(out), batch_size, nh, dh, k, ffn_size, int(layer.forget_gate == "exp"),
        _ACTIVATION_CODES[ffn.activation] if ffn is not None else 0,
    )
    return out, new_window, tuple(new_state.unbind(0))
