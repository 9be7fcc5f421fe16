// Autograd of slimops::linear (y = x W[:out, :in]^T + b[:out]). Reference:
// slimops.reference.linear. See common.h for why this is C++.
#include "autograd/common.h"

namespace slimops {
namespace autograd {
namespace {

// slimops::linear below autograd (under the node, and the no-graph path).
at::Tensor linear_op(const at::Tensor& input, const at::Tensor& weight, const OptTensor& bias,
                     int64_t out_features) {
  static const auto op =
      op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, int64_t)>(
          "slimops::linear");
  at::AutoDispatchBelowADInplaceOrView below;
  return op.call(input, weight, bias, out_features);
}

// Backward of one linear call (next edges: input 0, weight 1, bias 2).
struct LinearBackward : SavedNode {
  SavedVariable input_, weight_;
  int64_t bias_rows_ = 0;

  std::string name() const override { return "slimops::LinearBackward"; }

  void each_saved(const std::function<void(SavedVariable&, bool)>& f) override {
    f(input_, false);
    f(weight_, false);
  }

  void collect_numbers(CompiledNodeArgs& args) const override { args.collect(bias_rows_); }

  variable_list apply(variable_list&& grads) override {
    static const auto backward_input =
        op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t)>(
            "slimops::linear_backward_input");
    static const auto backward_weight =
        op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
            "slimops::linear_backward_weight");
    variable_list result(3);
    const at::Tensor& grad_out = grads[0];
    if (!grad_out.defined()) return result;  // no gradient flowed: every gradient is zero
    const at::Tensor input = input_.unpack(), weight = weight_.unpack();
    const std::vector<bool> needs = needed_grads(*this);
    if (needs[0]) {
      const std::vector<int64_t> sizes = int_sizes(input);
      result[0] = backward_input.call(grad_out, weight, sizes.back());
    }
    if (needs[1]) result[1] = backward_weight.call(grad_out, input, weight);
    if (needs[2])
      result[2] = pad_prefix(grad_out.reshape({-1, grad_out.size(-1)}).sum(0), bias_rows_);
    return result;
  }
};

at::Tensor linear_autograd(const at::Tensor& input, const at::Tensor& weight,
                           const OptTensor& bias, int64_t out_features) {
  if (!graph_needed(input, weight, bias)) return linear_op(input, weight, bias, out_features);
  auto node = make_node<LinearBackward>("linear", input, weight, bias);
  at::Tensor out = linear_op(input, weight, bias, out_features);
  torch::autograd::set_history(out, node);
  node->input_ = SavedVariable(input, false);
  node->weight_ = SavedVariable(weight, false);
  node->bias_rows_ = present(bias) ? bias->size(0) : int64_t{0};
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(slimops, Autograd, m) { m.impl("linear", &linear_autograd); }

}  // namespace autograd
}  // namespace slimops
