// Autograd of slimops::linear (y = x W[:out, :in]^T + b[:out]). Reference:
// slimops.reference.linear. See common.h for why this is C++.
#include "autograd/common.h"

namespace slimops {
namespace autograd {
namespace {

// slimops::linear below autograd (the Function's forward and the no-graph path).
at::Tensor linear_op(const at::Tensor& input, const at::Tensor& weight, const OptTensor& bias,
                     int64_t out_features) {
  static const auto op =
      op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, int64_t)>(
          "slimops::linear");
  at::AutoDispatchBelowADInplaceOrView below;
  return op.call(input, weight, bias, out_features);
}

class LinearFunction : public torch::autograd::Function<LinearFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input,
                            const at::Tensor& weight, const OptTensor& bias,
                            int64_t out_features) {
    at::Tensor out = linear_op(input, weight, bias, out_features);
    save_edges(ctx, {true, true, present(bias), false});
    ctx->saved_data["bias_rows"] = present(bias) ? bias->size(0) : int64_t{0};
    ctx->save_for_backward({input, weight});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_input =
        op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t)>(
            "slimops::linear_backward_input");
    static const auto backward_weight =
        op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
            "slimops::linear_backward_weight");
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &input = saved[0], &weight = saved[1], &grad_out = grads[0];
    const std::vector<bool> needs = needs_input_grad(ctx);
    variable_list result(4);
    if (needs[0]) {
      const std::vector<int64_t> sizes = int_sizes(input);
      result[0] = backward_input.call(grad_out, weight, sizes.back());
    }
    if (needs[1]) result[1] = backward_weight.call(grad_out, input, weight);
    if (needs[2])
      result[2] = pad_prefix(grad_out.reshape({-1, grad_out.size(-1)}).sum(0),
                             ctx->saved_data["bias_rows"].toInt());
    return result;
  }
};

at::Tensor linear_autograd(const at::Tensor& input, const at::Tensor& weight,
                           const OptTensor& bias, int64_t out_features) {
  if (!graph_needed(input, weight, bias)) return linear_op(input, weight, bias, out_features);
  return LinearFunction::apply(input, weight, bias, out_features);
}

}  // namespace

TORCH_LIBRARY_IMPL(slimops, Autograd, m) { m.impl("linear", &linear_autograd); }

}  // namespace autograd
}  // namespace slimops
