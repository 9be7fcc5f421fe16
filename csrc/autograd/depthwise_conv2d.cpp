// Autograd of slimops::depthwise_conv2d (depthwise convolution on W[:C], fused epilogue).
// Reference: slimops.reference.depthwise_conv2d. See common.h for why this is C++.
#include "autograd/common.h"

namespace slimops {
namespace autograd {
namespace {

using DepthwiseSig = at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&,
                                c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef,
                                const OptTensor&, const OptTensor&, const OptTensor&, int64_t);

at::Tensor depthwise_op(const at::Tensor& input, const at::Tensor& weight, const OptTensor& bias,
                        c10::IntArrayRef stride, c10::IntArrayRef padding,
                        c10::IntArrayRef dilation, const OptTensor& scale, const OptTensor& shift,
                        const OptTensor& residual, int64_t activation) {
  static const auto op = op_handle<DepthwiseSig>("slimops::depthwise_conv2d");
  return op.call(input, weight, bias, stride, padding, dilation, scale, shift, residual,
                 activation);
}

class DepthwiseConv2dFunction : public torch::autograd::Function<DepthwiseConv2dFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input,
                            const at::Tensor& weight, const OptTensor& bias,
                            c10::IntArrayRef stride, c10::IntArrayRef padding,
                            c10::IntArrayRef dilation, const OptTensor& scale,
                            const OptTensor& shift, const OptTensor& residual,
                            int64_t activation) {
    at::Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      out = depthwise_op(input, weight, bias, stride, padding, dilation, scale, shift, residual,
                         activation);
    }
    save_edges(ctx, {true, true, present(bias), false, false, false, present(scale),
                     present(shift), present(residual), false});
    save_conv(ctx, input, weight, bias, stride, padding, dilation, scale, activation, out);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_input = op_handle<at::Tensor(
        const at::Tensor&, const at::Tensor&, c10::IntArrayRef, c10::IntArrayRef,
        c10::IntArrayRef, c10::IntArrayRef)>("slimops::depthwise_conv2d_backward_input");
    static const auto backward_weight = op_handle<at::Tensor(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::IntArrayRef,
        c10::IntArrayRef, c10::IntArrayRef)>("slimops::depthwise_conv2d_backward_weight");
    const SavedConv c = load_conv(ctx);
    const std::vector<bool> needs = needs_input_grad(ctx);
    // needs[6..8]: scale, shift, residual
    const EpilogueGrads eg = conv_epilogue_grads(grads[0], c, needs, 6);
    variable_list result(10);
    if (needs[0])
      result[0] = backward_input.call(eg.grad_z, c.weight, int_sizes(c.input), c.stride,
                                      c.padding, c.dilation);
    if (needs[1])
      result[1] = backward_weight.call(eg.grad_z, c.input, c.weight, c.stride, c.padding,
                                       c.dilation);
    if (needs[2]) result[2] = pad_prefix(channel_sum(eg.grad_z), c.bias.size(0));
    epilogue_param_grads(result, needs, 6, eg, [&] {
      return depthwise_op(c.input, c.weight, optional(c.bias), c.stride, c.padding, c.dilation,
                          std::nullopt, std::nullopt, std::nullopt, 0);
    });
    return result;
  }
};

at::Tensor depthwise_conv2d_autograd(const at::Tensor& input, const at::Tensor& weight,
                                     const OptTensor& bias, c10::IntArrayRef stride,
                                     c10::IntArrayRef padding, c10::IntArrayRef dilation,
                                     const OptTensor& scale, const OptTensor& shift,
                                     const OptTensor& residual, int64_t activation) {
  if (!graph_needed(input, weight, bias, scale, shift, residual)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return depthwise_op(input, weight, bias, stride, padding, dilation, scale, shift, residual,
                        activation);
  }
  return DepthwiseConv2dFunction::apply(input, weight, bias, stride, padding, dilation, scale,
                                        shift, residual, activation);
}

}  // namespace

TORCH_LIBRARY_IMPL(slimops, Autograd, m) {
  m.impl("depthwise_conv2d", &depthwise_conv2d_autograd);
}

}  // namespace autograd
}  // namespace slimops
