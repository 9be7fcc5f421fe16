// What the ops' autograd kernels share: dispatcher handles, which inputs need a gradient,
// the fused epilogue's backward, per-channel sums.
//
// Why C++: the formulas were registered from Python (torch.library.register_autograd) first.
// That path costs ~25 us per forward (the generated autograd.Function, filling the schema's
// defaults) and ~60 us per backward node in Python, per op call, on these 2-core machines:
// on a small network (the digits CNN: 124 op calls per Algorithm 1 step) that was a third of
// the step. Here, autograd is a C++ kernel at the Autograd dispatch key, as ATen's own ops
// have. Forward and backward call the ops through the dispatcher, so each backend's kernel
// (CPU, the CUDA/Triton implementations registered from Python, the fakes under
// torch.compile) runs underneath unchanged.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace slimops {
namespace autograd {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

// The typed dispatcher handle of slimops::<name> (looked up once per call site).
template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

inline bool present(const OptTensor& t) { return t.has_value() && t->defined(); }

inline bool requires_grad_of(const at::Tensor& t) { return t.defined() && t.requires_grad(); }
inline bool requires_grad_of(const OptTensor& t) { return present(t) && t->requires_grad(); }

// Whether autograd has anything to record: grad mode on and some tensor argument requiring
// grad. When not (eval, inference mode, frozen inputs) the autograd kernels call the op's
// kernel directly below the Autograd key: a custom Function's apply builds its context and
// node even when it records nothing, ~8-20 us per call (a 1024 -> 1000 linear layer at
// batch 1 took 117 us against aten's 95 us for the same GEMM; 2-core AMD EPYC Zen 3).
template <typename... T>
bool graph_needed(const T&... tensors) {
  return at::GradMode::is_enabled() && (requires_grad_of(tensors) || ...);
}

// A saved tensor back as an optional argument (saved undefined when it was absent).
inline OptTensor optional(const at::Tensor& t) {
  return t.defined() ? OptTensor(t) : std::nullopt;
}

// Autograd numbers a custom Function's gradient edges over its *tensor* arguments only (an
// absent optional tensor or an int has none). `tensor_args[i]` says whether forward argument
// i is a present tensor; saved in forward, it maps argument positions to edges in backward.
inline void save_edges(AutogradContext* ctx, std::initializer_list<bool> tensor_args) {
  std::vector<int64_t> edge;
  int64_t next = 0;
  for (bool is_tensor : tensor_args) edge.push_back(is_tensor ? next++ : -1);
  ctx->saved_data["edges"] = edge;
}

// needs[i]: forward argument i is a tensor whose gradient autograd asks for.
inline std::vector<bool> needs_input_grad(AutogradContext* ctx) {
  const std::vector<int64_t> edge = ctx->saved_data.at("edges").toIntVector();
  std::vector<bool> needs(edge.size(), false);
  for (size_t i = 0; i < edge.size(); ++i)
    needs[i] = edge[i] >= 0 && ctx->needs_input_grad(static_cast<size_t>(edge[i]));
  return needs;
}

// The sizes of a saved tensor as ints (a symbolic size, under torch.compile's dynamic shapes,
// is specialised, as the Python formula's list(input.shape) was).
inline std::vector<int64_t> int_sizes(const at::Tensor& t) {
  std::vector<int64_t> out;
  for (const c10::SymInt& s : t.sym_sizes()) out.push_back(s.guard_int(__FILE__, __LINE__));
  return out;
}

inline at::Tensor epilogue_backward(const at::Tensor& grad_out, const at::Tensor& out,
                                    const OptTensor& scale, int64_t activation) {
  static const auto op =
      op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, int64_t)>(
          "slimops::epilogue_backward");
  return op.call(grad_out, out, scale, activation);
}

// Gradients through the fused epilogue act(z * scale + shift + residual): w.r.t. the conv
// output z and, when `need_pre`, w.r.t. the activation's input (also the gradient of shift's
// broadcast and of the residual). The activation's mask is read from the op's output.
struct EpilogueGrads {
  at::Tensor grad_z, grad_pre;
};

inline EpilogueGrads epilogue_grads(const at::Tensor& grad_out, const at::Tensor& out,
                                    const OptTensor& scale, int64_t activation, bool need_pre) {
  at::Tensor grad_pre;
  if (need_pre || !present(scale))
    grad_pre = activation ? epilogue_backward(grad_out, out, std::nullopt, activation) : grad_out;
  if (!present(scale)) return {grad_pre, need_pre ? grad_pre : at::Tensor()};
  return {epilogue_backward(grad_out, out, scale, activation), grad_pre};
}

// Sum over every dim but the channel dim (1).
inline at::Tensor channel_sum(const at::Tensor& g) {
  if (g.dim() <= 2) return g.sum(0);
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < g.dim(); ++d) dims.push_back(d);
  return g.sum(dims);
}

// The gradients of the epilogue's scale, shift and residual (forward arguments first,
// first + 1, first + 2), shared by the conv op families. `pre_scale()` recomputes the conv
// output before the scale; it runs only when scale needs a gradient (rare: eval-mode BN
// fine-tuning), which is cheaper than saving that tensor on every forward.
template <typename F>
void epilogue_param_grads(variable_list& result, const std::vector<bool>& needs, size_t first,
                          const EpilogueGrads& eg, const F& pre_scale) {
  if (needs[first]) result[first] = channel_sum(eg.grad_pre * pre_scale());
  if (needs[first + 1]) result[first + 1] = channel_sum(eg.grad_pre);
  if (needs[first + 2]) result[first + 2] = eg.grad_pre;
}

// What the conv families' forward (conv2d, depthwise_conv2d) saves for their backward: the
// geometry, the activation and five tensors. The output is needed for the activation's mask;
// bias only to recompute the pre-scale conv when scale itself needs a gradient (rare:
// eval-mode BN fine-tuning), which is cheaper than saving that tensor on every forward.
struct SavedConv {
  at::Tensor input, weight, bias, scale, out;  // bias, scale: undefined when absent
  std::vector<int64_t> stride, padding, dilation;
  int64_t activation;
};

inline void save_conv(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                      const OptTensor& bias, c10::IntArrayRef stride, c10::IntArrayRef padding,
                      c10::IntArrayRef dilation, const OptTensor& scale, int64_t activation,
                      const at::Tensor& out) {
  ctx->saved_data["stride"] = stride.vec();
  ctx->saved_data["padding"] = padding.vec();
  ctx->saved_data["dilation"] = dilation.vec();
  ctx->saved_data["activation"] = activation;
  ctx->save_for_backward({input, weight, bias.value_or(at::Tensor()),
                          scale.value_or(at::Tensor()), out});
}

inline SavedConv load_conv(AutogradContext* ctx) {
  const variable_list saved = ctx->get_saved_variables();
  return {saved[0], saved[1], saved[2], saved[3], saved[4],
          ctx->saved_data["stride"].toIntVector(), ctx->saved_data["padding"].toIntVector(),
          ctx->saved_data["dilation"].toIntVector(), ctx->saved_data["activation"].toInt()};
}

// The epilogue's gradients of a conv family's backward; `first`: the forward argument index
// of scale (shift and residual follow it), whose gradients need grad_pre.
inline EpilogueGrads conv_epilogue_grads(const at::Tensor& grad_out, const SavedConv& c,
                                         const std::vector<bool>& needs, size_t first) {
  return epilogue_grads(grad_out, c.out, optional(c.scale), c.activation,
                        needs[first] || needs[first + 1] || needs[first + 2]);
}

// A length-`full` vector (last dim) whose prefix is g and the rest zero: full-size grads.
inline at::Tensor pad_prefix(const at::Tensor& g, int64_t full) {
  return at::constant_pad_nd(g, {0, full - g.size(-1)});
}

}  // namespace autograd
}  // namespace slimops
