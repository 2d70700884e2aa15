// The decoding kernels' entry points: defined in slstm_cpu.cpp (no torch headers), called by their torch boundary in
// slstm_ops.cpp, which checks every tensor (plain dense CPU memory, exact shape and dtype) before a pointer gets here.
#pragma once

#include <cstdint>

namespace slstm {

// Pointers and sizes of one block of a decoding call. dtype 0 float32, 1 bfloat16: x, out, every weight and the
// window (in, out, after each step); the state is float32. A null window_in or state_in[k] stands for zeros. An FFN
// weight with a scale is int8 instead, W[o, :] = scale[o] q[o, :] (weight-only quantisation).
struct BlockDecodeArgs {
  const void* x;             // (B, S, D)
  const uint8_t* mask;       // (B, S), or null: every step taken
  const void* window_in;     // (B, K-1, D) when K > 1
  const float* state_in[4];  // h, c, n, m, each (B, NH, DH)
  void* window;              // out: the window after the last step (K > 1)
  float* state[4];           // out: h, c, n, m after the last step
  const void *norm1_w, *conv_w, *conv_b, *proj_w, *R, *bias, *out_norm_w, *norm2_w, *gate_up_w, *gate_up_b, *down_w,
      *down_b;
  const float *gate_up_scale, *down_scale;  // (2F, 1) and (D, 1) float32 when gate_up_w, down_w are int8; else null
  void* out;            // (B, S, D)
  void* step_windows;   // (S, B, K-1, D): the window after each step, or null
  float* step_states;   // (S, 4, B, NH, DH): the state after each step, or null
  float eps1, eps_out, eps2;
  int64_t B, S, NH, DH, K, F;
  int32_t exp_forget, act, threads, dtype;
  bool stream;  // set by block_decode: prefetch the weights, which are too large to stay in cache
};

constexpr int kNumActivationCodes = 6;  // gelu, relu, relu2, silu, sigmoid, selu

// S tokens through L whole blocks in a row, args[0..L) (block l reads block l-1's output: the caller points x there).
// Per block out = x + sLSTM(norm1(x)), then out += down(act(gate) * up) of norm2(out) when F > 0. conv_w (D,1,K),
// conv_b (D); proj_w (4,NH,DH_out,DH_in) with gates i, f reading the conv output and z, o the normed input;
// R (NH,DH,4DH), bias (NH,4DH) or null; norm weights (D) are offsets (scale 1 + w); gate_up_w (2F,D) rows 0..F-1 the
// gate; down_w (D,F); FFN biases or null. A masked step (mask 0) keeps window and state.
void block_decode(BlockDecodeArgs* args, int64_t L);

// out (N, D) = the offset LayerNorm of x (N, D) (scale 1 + w, no bias), float32 math; dtype 0 float32, 1 bfloat16
// for all three (the model's final norm after the blocks of a decoding step).
void norm_rows(const void* x, const void* w, float eps, void* out, int64_t N, int64_t D, int dtype);

// out (B, O) = x (B, I) W^T (+ b), float32 sums; dtype 0 float32, 1 bfloat16 for x, out, b and w, or w int8 when it
// has a scale (O, 1) float32 (W[o, :] = scale[o] w[o, :]); scale and b may be null.
void linear_decode(const void* x, const void* w, const float* scale, const void* b, void* out, int64_t B, int64_t O,
                   int64_t I, int threads, int dtype);

// Ask for 2 MiB pages behind [p, p + bytes), a weight that streams (huge_pages.cpp): queued, done on a background
// thread, contents unchanged. stop_huge_pages: ask for nothing more in this process (a forked child).
void advise_huge_pages(const void* p, int64_t bytes);
void stop_huge_pages();

}  // namespace slstm
