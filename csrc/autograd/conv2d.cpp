// Autograd of slimops::conv2d (dense / grouped convolution on per-group weight prefixes, with
// the fused epilogue act((z + bias) * scale + shift + residual)). Reference:
// slimops.reference.conv2d. See common.h for why this is C++.
#include "autograd/common.h"

namespace slimops {
namespace autograd {
namespace {

using Conv2dSig = at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, int64_t,
                             c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef, int64_t,
                             const OptTensor&, const OptTensor&, const OptTensor&, int64_t);

at::Tensor conv2d_op(const at::Tensor& input, const at::Tensor& weight, const OptTensor& bias,
                     int64_t out_channels, c10::IntArrayRef stride, c10::IntArrayRef padding,
                     c10::IntArrayRef dilation, int64_t groups, const OptTensor& scale,
                     const OptTensor& shift, const OptTensor& residual, int64_t activation) {
  static const auto op = op_handle<Conv2dSig>("slimops::conv2d");
  return op.call(input, weight, bias, out_channels, stride, padding, dilation, groups, scale,
                 shift, residual, activation);
}

// Backward of one conv2d call (next edges: ConvNode's order).
struct Conv2dBackward : ConvNode {
  int64_t groups_ = 1, out_channels_ = 0;

  std::string name() const override { return "slimops::Conv2dBackward"; }

  void collect_numbers(CompiledNodeArgs& args) const override {
    ConvNode::collect_numbers(args);
    args.collect(groups_);
    args.collect(out_channels_);
  }

  variable_list apply(variable_list&& grads) override {
    static const auto backward_input = op_handle<at::Tensor(
        const at::Tensor&, const at::Tensor&, c10::IntArrayRef, c10::IntArrayRef,
        c10::IntArrayRef, c10::IntArrayRef, int64_t)>("slimops::conv2d_backward_input");
    static const auto backward_weight = op_handle<at::Tensor(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::IntArrayRef,
        c10::IntArrayRef, c10::IntArrayRef, int64_t)>("slimops::conv2d_backward_weight");
    static const auto backward_both = op_handle<std::tuple<at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::IntArrayRef,
        c10::IntArrayRef, c10::IntArrayRef, int64_t)>("slimops::conv2d_backward");
    variable_list result(6);
    if (!grads[0].defined()) return result;  // no gradient flowed: every gradient is zero
    const SavedConv c = unpack();
    const std::vector<bool> needs = needed_grads(*this);
    // needs[3..5]: scale, shift, residual
    const EpilogueGrads eg = conv_epilogue_grads(grads[0], c, needs, 3);
    if (needs[0] && needs[1]) {
      // Both gradients as one op, so that a device can share work between them: on CPU
      // it may be one oneDNN call for the two (csrc/cpu/conv2d.cpp).
      std::tie(result[0], result[1]) = backward_both.call(eg.grad_z, c.input, c.weight,
                                                          c.stride, c.padding, c.dilation,
                                                          groups_);
    } else {
      if (needs[0])
        result[0] = backward_input.call(eg.grad_z, c.weight, int_sizes(c.input), c.stride,
                                        c.padding, c.dilation, groups_);
      if (needs[1])
        result[1] = backward_weight.call(eg.grad_z, c.input, c.weight, c.stride, c.padding,
                                         c.dilation, groups_);
    }
    if (needs[2]) {
      const at::Tensor g = channel_sum(eg.grad_z).view({groups_, -1});
      result[2] = pad_prefix(g, c.bias.size(0) / groups_).reshape({-1});
    }
    epilogue_param_grads(result, needs, 3, eg, [&] {
      return conv2d_op(c.input, c.weight, optional(c.bias), out_channels_, c.stride, c.padding,
                       c.dilation, groups_, std::nullopt, std::nullopt, std::nullopt, 0);
    });
    return result;
  }
};

at::Tensor conv2d_autograd(const at::Tensor& input, const at::Tensor& weight,
                           const OptTensor& bias, int64_t out_channels, c10::IntArrayRef stride,
                           c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
                           const OptTensor& scale, const OptTensor& shift,
                           const OptTensor& residual, int64_t activation) {
  at::AutoDispatchBelowADInplaceOrView below;
  if (!graph_needed(input, weight, bias, scale, shift, residual))
    return conv2d_op(input, weight, bias, out_channels, stride, padding, dilation, groups, scale,
                     shift, residual, activation);
  auto node = make_node<Conv2dBackward>("conv2d", input, weight, bias, scale, shift, residual);
  at::Tensor out = conv2d_op(input, weight, bias, out_channels, stride, padding, dilation,
                             groups, scale, shift, residual, activation);
  torch::autograd::set_history(out, node);
  node->save(input, weight, bias, stride, padding, dilation, scale, activation, out);
  node->groups_ = groups;
  node->out_channels_ = out_channels;
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(slimops, Autograd, m) { m.impl("conv2d", &conv2d_autograd); }

}  // namespace autograd
}  // namespace slimops
