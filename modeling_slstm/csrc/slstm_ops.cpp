// The torch boundary of the decoding kernels: the CPU implementations of `slstm::block_decode` and
// `slstm::linear_decode` (their schemas and fake implementations are in slstm_cpu.py). Every tensor is checked here,
// before a pointer to it reaches a kernel: plain dense CPU memory (strided, on the CPU, its storage large enough) of
// exactly the shape and dtype the kernel reads, else a ValueError naming it. Weights must already be contiguous and
// free of lazy negation (a copy of a weight per token would hide a slow path); the input, mask, windows and states
// are small and are made so. Outputs are allocated here. An absent window, state or weight is an empty tensor: the
// lists hold tensors only, as torch.jit.trace needs.

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/SmallVector.h>
#include <ATen/ops/empty.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include "slstm_cpu.h"

namespace {

using at::Tensor;

// --------------------------------------------------------------------------------------------------------- team
std::atomic<bool> forked{false};  // a child forked after the library was loaded (or, from Python, after its import)
[[maybe_unused]] const int at_fork = pthread_atfork(nullptr, nullptr, [] { forked = true; });

// Threads for the kernels' team: torch's thread count, at most the CPUs this process may run on (more would only take
// turns on the same cores); one in a forked child (torch's OpenMP pool does not survive a fork: a parallel region
// there can hang).
int team_size() {
  static const int cpus = [] {
    cpu_set_t set;
    CPU_ZERO(&set);
    return sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set)
                                                        : static_cast<int>(std::thread::hardware_concurrency());
  }();
  return forked ? 1 : std::max(1, std::min(at::get_num_threads(), cpus));
}

// --------------------------------------------------------------------------------------------------------- checks
std::string shape_of(c10::IntArrayRef shape) {  // as Python prints a tuple: (5,), (2, 3)
  std::string s = "(";
  for (size_t k = 0; k < shape.size(); ++k) s += (k ? ", " : "") + std::to_string(shape[k]);
  return s + (shape.size() == 1 ? ",)" : ")");
}

std::string dtype_name(at::ScalarType t) {  // as Python prints it
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBool: return "torch.bool";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kChar: return "torch.int8";
    default: return std::string("torch.") + c10::toString(t);
  }
}

// What names a tensor in an error: "`proj_weight (block 3)`", or "`x`" (block -1). Formatted only for an error.
struct Name {
  const char* what;
  int64_t block = -1;
  std::string str() const {
    return std::string("`") + what + (block < 0 ? "" : " (block " + std::to_string(block) + ")") + "`";
  }
};

// ValueError unless t is plain dense CPU memory: strided, on the CPU, its storage holding every element it claims.
void check_plain(const Tensor& t, const Name& name) {
  const bool dense = t.layout() == at::kStrided && t.device().is_cpu() && t.has_storage();
  TORCH_CHECK_VALUE(dense, "sLSTM kernel: ", name.str(), " must be a plain dense CPU tensor, got a ", t.layout(),
                    " tensor on ", t.device(), dense ? "" : " without storage", ".");
  int64_t last = t.storage_offset();  // the last element's index in the storage
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  const int64_t needed = t.numel() ? (last + 1) * static_cast<int64_t>(t.itemsize()) : 0;
  TORCH_CHECK_VALUE(static_cast<int64_t>(t.storage().nbytes()) >= needed, "sLSTM kernel: ",
                    name.str(), " must be a plain dense CPU tensor; its storage holds ", t.storage().nbytes(),
                    " bytes of the ", needed, " it needs (a storage resized away).");
  TORCH_CHECK_VALUE(!needed || t.storage().data() != nullptr, "sLSTM kernel: ", name.str(),
                    " must be a plain dense CPU tensor; its storage has no data (a subclass wrapping another?).");
}

// ValueError unless t has exactly this shape and dtype and is contiguous, without lazy negation.
void check_layout(const Tensor& t, const Name& name, c10::IntArrayRef shape, at::ScalarType dtype) {
  if (t.scalar_type() == dtype && t.sizes() == shape && t.is_contiguous() && !t.is_neg() && !t.is_conj()) return;
  TORCH_CHECK_VALUE(false, "sLSTM kernel: ", name.str(), " must be a contiguous ", dtype_name(dtype),
                    " tensor of shape ", shape_of(shape), ", got ",
                    t.is_contiguous() ? (t.is_neg() ? "a lazily negated" : "a") : "a non-contiguous", " ",
                    dtype_name(t.scalar_type()), " tensor of shape ", shape_of(t.sizes()), ".");
}

// A weight as the kernel reads it -> its address, or null when absent (an empty tensor, allowed unless required).
const void* weight_ptr(const Tensor& t, const Name& name, c10::IntArrayRef shape, at::ScalarType dtype,
                       bool required) {
  if (!required && t.numel() == 0) return nullptr;
  check_plain(t, name);
  check_layout(t, name, shape, dtype);
  return t.numel() ? t.const_data_ptr() : nullptr;
}

// An input the op may copy (x, mask, window, state): checked plain, then made contiguous and free of lazy negation
// (a no-op when it already is), then its shape and dtype checked. Kept in `alive` until the kernel has run.
const void* input_ptr(const Tensor& t, const Name& name, c10::IntArrayRef shape, at::ScalarType dtype,
                      std::vector<Tensor>& alive) {
  check_plain(t, name);
  alive.push_back(t.resolve_conj().resolve_neg().contiguous());
  check_layout(alive.back(), name, shape, dtype);
  return alive.back().numel() ? alive.back().const_data_ptr() : nullptr;
}

void refuse_grad(const char* op, std::initializer_list<at::TensorList> lists) {
  if (!c10::GradMode::is_enabled()) return;
  for (const auto& list : lists)
    for (const Tensor& t : list)
      TORCH_CHECK(!t.defined() || !t.requires_grad(), "slstm::", op,
                  " has no backward; call it under torch.no_grad() or inference_mode().");
}

int64_t size_of(const Tensor& t, int64_t dim) { return t.numel() && t.dim() ? t.size(dim) : 0; }

bool given(const std::optional<Tensor>& t) { return t.has_value() && t->defined(); }

// A linear map as the kernel reads it: weight (O, I), 2-D, in `dtype`, or int8 with a float32 scale (O, 1) per row
// (W = scale q, as torchao holds it); bias (O,) in `dtype` or none.
struct Linear {
  const void* w;
  const float* scale;  // null: the weight is in `dtype`
  const void* b;       // null: no bias
  int64_t O;
};
Linear linear_ptrs(const Tensor& weight, const std::optional<Tensor>& bias, const std::optional<Tensor>& scale,
                   const char* prefix, int64_t I, at::ScalarType dtype) {
  const std::string weight_name = std::string(prefix) + "weight", bias_name = std::string(prefix) + "bias",
                    scale_name = std::string(prefix) + "scale";
  TORCH_CHECK_VALUE(weight.dim() == 2, "sLSTM kernel: `", weight_name, "` must be a 2-D tensor, got shape ",
                    shape_of(weight.sizes()), ".");
  const int64_t O = weight.size(0);
  const bool int8 = given(scale);
  TORCH_CHECK_VALUE(int8 || weight.scalar_type() != at::kChar, "sLSTM kernel: `", weight_name, "` is int8: its ",
                    "float32 scale per row, shape ", shape_of({O, 1}), ", goes in `", scale_name, "`.");
  const float* s = int8 ? static_cast<const float*>(weight_ptr(*scale, {scale_name.c_str()}, {O, 1}, at::kFloat,
                                                                true))
                        : nullptr;  // null for no rows (O = 0) too: nothing is read
  const void* w = weight_ptr(weight, {weight_name.c_str()}, {O, I}, int8 ? at::kChar : dtype, true);
  const void* b = given(bias) ? weight_ptr(*bias, {bias_name.c_str()}, {O}, dtype, true) : nullptr;
  return {w, s, b, O};
}

// --------------------------------------------------------------------------------------------------------- ops
constexpr int64_t kBlockWeights = 14;
constexpr const char* kWeightNames[kBlockWeights] = {
    "norm1_weight",   "conv_weight",  "conv_bias",      "proj_weight",  "recurrent_kernel", "gate_bias",
    "out_norm_weight", "norm2_weight", "gate_up_weight", "gate_up_bias", "down_weight",      "down_bias",
    "gate_up_scale",  "down_scale"};
constexpr const char* kStateNames[4] = {"state h", "state c", "state n", "state m"};

using Shape = c10::SmallVector<int64_t, 4>;  // on the stack: a call builds ~14 per block and token
using BlockDecodeOut = std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>,
                                  std::vector<Tensor>, Tensor, Tensor>;

BlockDecodeOut block_decode(const Tensor& x_in, const std::optional<Tensor>& mask_in, at::TensorList windows,
                            at::TensorList states, at::TensorList weights, at::ArrayRef<double> eps,
                            at::IntArrayRef exp_forget, at::IntArrayRef activation, bool record,
                            const std::optional<Tensor>& norm_weight, double norm_eps,
                            const std::optional<Tensor>& head_weight, const std::optional<Tensor>& head_bias,
                            const std::optional<Tensor>& head_scale) {
  refuse_grad("block_decode", {x_in, windows, states, weights, norm_weight.value_or(Tensor()),
                               head_weight.value_or(Tensor()), head_bias.value_or(Tensor()),
                               head_scale.value_or(Tensor())});
  TORCH_CHECK_VALUE(x_in.dim() == 3, "sLSTM kernel: `x` must be a 3-D tensor, got shape ", shape_of(x_in.sizes()), ".");
  const at::ScalarType dtype = x_in.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kBFloat16,
                    "sLSTM kernel: `x` must be float32 or bfloat16, got ", dtype_name(dtype), ".");
  const int64_t L = static_cast<int64_t>(windows.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(states.size()) == 4 * L && static_cast<int64_t>(weights.size()) == 14 * L &&
                        static_cast<int64_t>(eps.size()) == 3 * L && static_cast<int64_t>(exp_forget.size()) == L &&
                        static_cast<int64_t>(activation.size()) == L,
                    "sLSTM kernel: ", L, " windows (one per block) but ", states.size(), " states (4 per block), ",
                    weights.size(), " weights (14 per block), ", eps.size(), " eps (3 per block), ", exp_forget.size(),
                    " flags and ", activation.size(), " activation codes.");
  const int64_t B = x_in.size(0), S = x_in.size(1), D = x_in.size(2);
  std::vector<Tensor> alive;  // the contiguous copies the kernel reads, if any were needed
  alive.reserve(2 + 5 * L);
  const void* x = input_ptr(x_in, {"x"}, {B, S, D}, dtype, alive);
  const uint8_t* mask = nullptr;
  if (mask_in.has_value() && mask_in->defined())
    mask = static_cast<const uint8_t*>(input_ptr(*mask_in, {"mask"}, {B, S}, at::kBool, alive));

  const auto options = x_in.options().dtype(dtype), state_options = x_in.options().dtype(at::kFloat);
  Tensor hidden = at::empty({L, B, S, D}, options);
  std::vector<Tensor> new_windows, new_states, step_windows, step_states;
  std::vector<slstm::BlockDecodeArgs> args(L);
  const int threads = team_size();
  for (int64_t l = 0; l < L; ++l) {
    slstm::BlockDecodeArgs& a = args[l];
    const Tensor* w = weights.data() + kBlockWeights * l;
    const Tensor& R = w[4];
    // R gives the heads and head dim: (NH, DH, 4 DH) with NH DH = D
    const int64_t NH = R.dim() == 3 ? R.size(0) : 0, DH = R.dim() == 3 ? R.size(1) : 0;
    TORCH_CHECK_VALUE(R.dim() == 3 && NH * DH == D && R.size(2) == 4 * DH, "sLSTM kernel: `recurrent_kernel (block ",
                      l, ")` must be a contiguous ", dtype_name(dtype), " tensor of shape (heads, head dim, 4 x head ",
                      "dim) with heads x head dim = ", D, ", got a ", dtype_name(R.scalar_type()), " tensor of shape ",
                      shape_of(R.sizes()), ".");
    TORCH_CHECK_VALUE(activation[l] >= 0 && activation[l] < slstm::kNumActivationCodes,
                      "sLSTM kernel: unknown FFN activation code ", activation[l], " (block ", l, ").");
    TORCH_CHECK_VALUE(exp_forget[l] == 0 || exp_forget[l] == 1, "sLSTM kernel: exp_forget[", l,
                      "] must be 0 or 1, got ", exp_forget[l], ".");
    // sizes read off the weights that have them (a 0-d weight then fails its shape check below)
    const int64_t K = size_of(w[1], -1), F = size_of(w[10], -1);
    TORCH_CHECK_VALUE(K > 1 || windows[l].numel() == 0, "sLSTM kernel: block ", l, " has no conv window (kernel size ",
                      K, "), got windows[", l, "].");
    TORCH_CHECK_VALUE(w[1].numel() || !w[2].numel(), "sLSTM kernel: block ", l,
                      " has a conv bias without a conv weight.");
    TORCH_CHECK_VALUE(F || !(w[7].numel() || w[8].numel() || w[9].numel() || w[11].numel() || w[12].numel() ||
                             w[13].numel()),
                      "sLSTM kernel: FFN weights without `down_weight` (block ", l, ").");
    const Shape window_shape = K > 1 ? Shape{B, K - 1, D} : Shape{0};
    a.window_in = K > 1 && windows[l].numel() ? input_ptr(windows[l], {"windows", l}, window_shape, dtype, alive)
                                               : nullptr;
    for (int k = 0; k < 4; ++k) {
      const Tensor& s = states[4 * l + k];
      a.state_in[k] = s.numel() ? static_cast<const float*>(input_ptr(s, {kStateNames[k], l}, {B, NH, DH}, at::kFloat,
                                                                      alive))
                                : nullptr;
    }
    const Shape shapes[kBlockWeights] = {
        {D},  {D, 1, K}, {D},        {4, NH, DH, DH}, {NH, DH, 4 * DH}, {NH, 4 * DH},
        {D},  {D},       {2 * F, D}, {2 * F},         {D, F},           {D},
        {2 * F, 1}, {D, 1}};
    const bool required[kBlockWeights] = {true,  false, K > 0, true,  true,  false, true,
                                          F > 0, F > 0, false, false, false, false, false};
    // an FFN weight with a scale is int8 (weight-only quantisation); the scales are float32
    at::ScalarType dtypes[kBlockWeights];
    std::fill_n(dtypes, kBlockWeights, dtype);
    dtypes[12] = dtypes[13] = at::kFloat;
    if (w[12].numel()) dtypes[8] = at::kChar;
    if (w[13].numel()) dtypes[10] = at::kChar;
    for (const auto& [k, s] : {std::pair{8, 12}, {10, 13}})
      TORCH_CHECK_VALUE(w[s].numel() || w[k].scalar_type() != at::kChar, "sLSTM kernel: `", kWeightNames[k],
                        " (block ", l, ")` is int8: its float32 scale per row goes in `", kWeightNames[s], "`.");
    const void* p[kBlockWeights];
    for (int k = 0; k < kBlockWeights; ++k)
      p[k] = weight_ptr(w[k], {kWeightNames[k], l}, shapes[k], dtypes[k], required[k]);
    a.norm1_w = p[0], a.conv_w = p[1], a.conv_b = p[2], a.proj_w = p[3], a.R = p[4], a.bias = p[5];
    a.out_norm_w = p[6], a.norm2_w = p[7], a.gate_up_w = p[8], a.gate_up_b = p[9], a.down_w = p[10], a.down_b = p[11];
    a.gate_up_scale = static_cast<const float*>(p[12]), a.down_scale = static_cast<const float*>(p[13]);
    // outputs: block l reads block l-1's output
    a.x = l == 0 ? x : args[l - 1].out;
    a.out = static_cast<char*>(hidden.data_ptr()) + l * B * S * D * hidden.element_size();
    a.mask = mask;
    new_windows.push_back(at::empty(window_shape, options));
    a.window = K > 1 ? new_windows.back().data_ptr() : nullptr;
    for (int k = 0; k < 4; ++k) {
      new_states.push_back(at::empty({B, NH, DH}, state_options));
      a.state[k] = new_states.back().data_ptr<float>();
    }
    a.step_windows = nullptr, a.step_states = nullptr;
    if (record) {
      const Shape steps_shape = K > 1 ? Shape{S, B, K - 1, D} : Shape{0};
      step_windows.push_back(at::empty(steps_shape, options));
      step_states.push_back(at::empty({S, 4, B, NH, DH}, state_options));
      a.step_windows = K > 1 ? step_windows.back().data_ptr() : nullptr;
      a.step_states = step_states.back().data_ptr<float>();
    }
    a.eps1 = static_cast<float>(eps[3 * l]), a.eps_out = static_cast<float>(eps[3 * l + 1]);
    a.eps2 = static_cast<float>(eps[3 * l + 2]);
    a.B = B, a.S = S, a.NH = NH, a.DH = DH, a.K = K, a.F = F;
    a.exp_forget = static_cast<int32_t>(exp_forget[l]), a.act = static_cast<int32_t>(activation[l]);
    a.threads = threads, a.dtype = dtype == at::kFloat ? 0 : 1, a.stream = false;
  }
  // the final norm of the last block's output (of x without blocks), when given
  const bool norm = norm_weight.has_value() && norm_weight->defined();
  const void* norm_w = norm ? weight_ptr(*norm_weight, {"norm_weight"}, {D}, dtype, true) : nullptr;
  const Shape normed_shape = norm ? Shape{B, S, D} : Shape{0};
  Tensor normed = at::empty(normed_shape, options);
  // then the LM head's logits of that, when given
  const bool head = given(head_weight);
  TORCH_CHECK_VALUE(head || !(given(head_bias) || given(head_scale)),
                    "sLSTM kernel: `head_bias` or `head_scale` without `head_weight`.");
  const Linear head_map = head ? linear_ptrs(*head_weight, head_bias, head_scale, "head_", D, dtype)
                               : Linear{nullptr, nullptr, nullptr, 0};
  const int64_t V = head_map.O;
  const Shape logits_shape = head ? Shape{B, S, V} : Shape{0};
  Tensor logits = at::empty(logits_shape, options);
  if (L) slstm::block_decode(args.data(), L);
  const void* last = L ? args[L - 1].out : x;
  if (norm)
    slstm::norm_rows(last, norm_w, static_cast<float>(norm_eps), normed.data_ptr(), B * S, D,
                     dtype == at::kFloat ? 0 : 1);
  if (head)
    slstm::linear_decode(norm ? normed.data_ptr() : last, head_map.w, head_map.scale, head_map.b, logits.data_ptr(),
                         B * S, V, D, threads, dtype == at::kFloat ? 0 : 1);
  return {hidden, new_windows, new_states, step_windows, step_states, normed, logits};
}

Tensor linear_decode(const Tensor& x_in, const Tensor& weight, const std::optional<Tensor>& bias,
                     const std::optional<Tensor>& scale) {
  refuse_grad("linear_decode", {x_in, weight, bias.value_or(Tensor()), scale.value_or(Tensor())});
  TORCH_CHECK_VALUE(x_in.dim() == 2, "sLSTM kernel: `x` must be a 2-D tensor, got shape ", shape_of(x_in.sizes()), ".");
  const at::ScalarType dtype = x_in.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kBFloat16,
                    "sLSTM kernel: `x` must be float32 or bfloat16, got ", dtype_name(dtype), ".");
  const int64_t B = x_in.size(0), I = x_in.size(1);
  std::vector<Tensor> alive;
  const void* x = input_ptr(x_in, {"x"}, {B, I}, dtype, alive);
  const Linear map = linear_ptrs(weight, bias, scale, "", I, dtype);
  Tensor out = at::empty({B, map.O}, x_in.options().dtype(dtype));
  slstm::linear_decode(x, map.w, map.scale, map.b, out.data_ptr(), B, map.O, I, team_size(),
                       dtype == at::kFloat ? 0 : 1);
  return out;
}

}  // namespace

extern "C" {
int slstm_team_size() { return team_size(); }  // for tests and for Python to read
void slstm_mark_forked() {  // from Python: this process forked after importing it, before loading this library
  forked = true;
  slstm::stop_huge_pages();
}
}

TORCH_LIBRARY_IMPL(slstm, CPU, m) {
  m.impl("block_decode", &block_decode);
  m.impl("linear_decode", &linear_decode);
}

// No derivatives: a backward through either op, forward-mode AD and torch.func transforms raise instead of returning
// zeros (a call that needs gradients under grad mode is refused by the CPU kernels above already).
TORCH_LIBRARY_IMPL(slstm, Autograd, m) {
  m.impl("block_decode", torch::autograd::autogradNotImplementedFallback());
  m.impl("linear_decode", torch::autograd::autogradNotImplementedFallback());
}
