// What the ops' autograd kernels share: dispatcher handles, which inputs need a gradient,
// the backward nodes' base, the fused epilogue's backward, per-channel sums.
//
// Why C++: the formulas were registered from Python (torch.library.register_autograd) first.
// That path costs ~25 us per forward (the generated autograd.Function, filling the schema's
// defaults) and ~60 us per backward node in Python, per op call, on these 2-core machines:
// on a small network (the digits CNN: 124 op calls per Algorithm 1 step) that was a third of
// the step. Here, autograd is a C++ kernel at the Autograd dispatch key, as ATen's own ops
// have. Forward and backward call the ops through the dispatcher, so each backend's kernel
// (CPU, the CUDA/Triton implementations registered from Python, the fakes under
// torch.compile) runs underneath unchanged.
//
// Why typed nodes (a torch::autograd::Node subclass per op, its saved state as members, as
// ATen's generated nodes are) and not torch::autograd::Function: a Function's apply builds an
// AutogradContext (a string-keyed map of IValues for every saved number, a VariableInfo copy
// of each input's sizes, the output wrapping of _wrap_outputs) and its backward reads them
// back. On a 3 -> 64 3x3 conv over a 4x4 image (2-core AMD EPYC Zen 3, 1 thread) that
// machinery made the op's forward with autograd 30 us against 16 us without, where
// F.conv2d's generated node adds 2 us; a typed node records the same graph for a few us.
#pragma once

#include <ATen/ATen.h>
#include <ATen/FuncTorchTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/dynamo/compiled_autograd.h>
#include <torch/library.h>

#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <vector>

namespace slimops {
namespace autograd {

using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;
using torch::dynamo::autograd::CompiledNodeArgs;
using torch::dynamo::autograd::SwapSavedVariables;
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

inline bool has_forward_grad(const at::Tensor& t) {
  return t.defined() && t._fw_grad(/*level=*/0).defined();
}
inline bool has_forward_grad(const OptTensor& t) {
  return present(t) && has_forward_grad(*t);
}

// The backward node of an op call: `tensors` are the forward's tensor arguments in schema
// order (optional ones included, absent or not), each the node's next edge at its position,
// so backward's result i is the gradient of tensor argument i (an absent or frozen one has
// an empty edge and gets an undefined gradient, as ATen's nodes do).
template <typename NodeT, typename... Tensors>
c10::intrusive_ptr<NodeT> make_node(const char* op, const Tensors&... tensors) {
  // functorch's transforms (vmap, grad) need a formula per transform, which a C++ node has
  // not: refuse, as a C++ torch::autograd::Function does, rather than compute silently wrong.
  if (const auto& functorch_tls = at::functorch::functorchTLSAccessor())
    functorch_tls->checkSupportsCppAutogradFunction();
  TORCH_CHECK(!(has_forward_grad(tensors) || ...), "slimops::", op,
              ": forward-mode AD is not supported (the op has no JVP formula); "
              "use backward mode (torch.autograd.grad / .backward())");
  auto node = c10::make_intrusive<NodeT>();
  node->set_next_edges(torch::autograd::collect_next_edges(tensors...));
  return node;
}

// needs[i]: whether the running backward wants the gradient of the forward's tensor argument
// i (a live edge that the graph task executes: torch.autograd.grad(..., inputs=) may ask for
// a subset).
inline std::vector<bool> needed_grads(const Node& node) {
  std::vector<bool> needs(node.num_outputs());
  for (size_t i = 0; i < needs.size(); ++i) needs[i] = node.task_should_compute_output(i);
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

// The base of the ops' backward nodes: each lists its saved tensors once (each_saved), and
// releasing them after a backward and compiled autograd (torch._dynamo's compiled_autograd:
// the node's numbers specialise the traced graph, its saved tensors are swapped for the
// trace's proxies around apply()) go over that list.
struct SavedNode : Node {
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    each_saved([](SavedVariable& v, bool) { v.reset_data(); });
  }

  void compiled_args(CompiledNodeArgs& args) const override {
    // each_saved hands out mutable references (reset_data, the swap below need them);
    // collecting only reads them.
    const_cast<SavedNode*>(this)->each_saved(
        [&](SavedVariable& v, bool is_output) { args.collect(v, is_output); });
    collect_numbers(args);
  }

  variable_list apply_with_saved(const variable_list& grads,
                                 SwapSavedVariables& saved) override {
    each_saved([&](SavedVariable& v, bool) { saved.before(v); });
    variable_list result = apply(variable_list(grads));
    each_saved([&](SavedVariable& v, bool) { saved.after(v); });
    return result;
  }

 protected:
  // f(saved tensor, whether it is this node's own output) for every saved tensor.
  virtual void each_saved(const std::function<void(SavedVariable&, bool)>& f) = 0;
  // args.collect(n) for every number backward reads.
  virtual void collect_numbers(CompiledNodeArgs& args) const = 0;
};

// What the conv families' backward needs (conv2d, depthwise_conv2d): the geometry, the
// activation and five tensors. The output is needed for the activation's mask; bias only to
// recompute the pre-scale conv when scale itself needs a gradient (rare: eval-mode BN
// fine-tuning), which is cheaper than saving that tensor on every forward.
struct SavedConv {
  at::Tensor input, weight, bias, scale, out;  // bias, scale: undefined when absent
  std::vector<int64_t> stride, padding, dilation;
  int64_t activation;
};

// The conv families' backward node base: forward tensor arguments (next edges) input 0,
// weight 1, bias 2, scale 3, shift 4, residual 5.
struct ConvNode : SavedNode {
  SavedVariable input_, weight_, bias_, scale_, out_;
  std::vector<int64_t> stride_, padding_, dilation_;
  int64_t activation_ = 0;

  // Saves what backward reads; call after torch::autograd::set_history(out, node) (the
  // output is saved as this node's own output, which holds no reference cycle).
  void save(const at::Tensor& input, const at::Tensor& weight, const OptTensor& bias,
            c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
            const OptTensor& scale, int64_t activation, const at::Tensor& out) {
    input_ = SavedVariable(input, false);
    weight_ = SavedVariable(weight, false);
    bias_ = SavedVariable(bias, false);
    scale_ = SavedVariable(scale, false);
    out_ = SavedVariable(out, true);
    stride_ = stride.vec();
    padding_ = padding.vec();
    dilation_ = dilation.vec();
    activation_ = activation;
  }

  SavedConv unpack() {
    return {input_.unpack(), weight_.unpack(), bias_.unpack(), scale_.unpack(),
            out_.unpack(getptr()), stride_, padding_, dilation_, activation_};
  }

 protected:
  void each_saved(const std::function<void(SavedVariable&, bool)>& f) override {
    f(input_, false);
    f(weight_, false);
    f(bias_, false);
    f(scale_, false);
    f(out_, true);
  }

  void collect_numbers(CompiledNodeArgs& args) const override {
    args.collect(stride_);
    args.collect(padding_);
    args.collect(dilation_);
    args.collect(activation_);
  }
};

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
