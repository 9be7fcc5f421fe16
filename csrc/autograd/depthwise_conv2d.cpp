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

// Backward of one depthwise_conv2d call (next edges: ConvNode's order).
struct DepthwiseConv2dBackward : ConvNode {
  std::string name() const override { return "slimops::DepthwiseConv2dBackward"; }

  variable_list apply(variable_list&& grads) override {
    static const auto backward_input = op_handle<at::Tensor(
        const at::Tensor&, const at::Tensor&, c10::IntArrayRef, c10::IntArrayRef,
        c10::IntArrayRef, c10::IntArrayRef)>("slimops::depthwise_conv2d_backward_input");
    static const auto backward_weight = op_handle<at::Tensor(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::IntArrayRef,
        c10::IntArrayRef, c10::IntArrayRef)>("slimops::depthwise_conv2d_backward_weight");
    variable_list result(6);
    if (!grads[0].defined()) return result;  // no gradient flowed: every gradient is zero
    const SavedConv c = unpack();
    const std::vector<bool> needs = needed_grads(*this);
    // needs[3..5]: scale, shift, residual
    const EpilogueGrads eg = conv_epilogue_grads(grads[0], c, needs, 3);
    if (needs[0])
      result[0] = backward_input.call(eg.grad_z, c.weight, int_sizes(c.input), c.stride,
                                      c.padding, c.dilation);
    if (needs[1])
      result[1] = backward_weight.call(eg.grad_z, c.input, c.weight, c.stride, c.padding,
                                       c.dilation);
    if (needs[2]) result[2] = pad_prefix(channel_sum(eg.grad_z), c.bias.size(0));
    epilogue_param_grads(result, needs, 3, eg, [&] {
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
  at::AutoDispatchBelowADInplaceOrView below;
  if (!graph_needed(input, weight, bias, scale, shift, residual))
    return depthwise_op(input, weight, bias, stride, padding, dilation, scale, shift, residual,
                        activation);
  auto node = make_node<DepthwiseConv2dBackward>("depthwise_conv2d", input, weight, bias, scale,
                                                 shift, residual);
  at::Tensor out = depthwise_op(input, weight, bias, stride, padding, dilation, scale, shift,
                                residual, activation);
  torch::autograd::set_history(out, node);
  node->save(input, weight, bias, stride, padding, dilation, scale, activation, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(slimops, Autograd, m) {
  m.impl("depthwise_conv2d", &depthwise_conv2d_autograd);
}

}  // namespace autograd
}  // namespace slimops
