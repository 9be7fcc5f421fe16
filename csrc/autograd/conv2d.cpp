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

class Conv2dFunction : public torch::autograd::Function<Conv2dFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input,
                            const at::Tensor& weight, const OptTensor& bias, int64_t out_channels,
                            c10::IntArrayRef stride, c10::IntArrayRef padding,
                            c10::IntArrayRef dilation, int64_t groups, const OptTensor& scale,
                            const OptTensor& shift, const OptTensor& residual,
                            int64_t activation) {
    at::Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      out = conv2d_op(input, weight, bias, out_channels, stride, padding, dilation, groups,
                      scale, shift, residual, activation);
    }
    save_edges(ctx, {true, true, present(bias), false, false, false, false, false,
                     present(scale), present(shift), present(residual), false});
    save_conv(ctx, input, weight, bias, stride, padding, dilation, scale, activation, out);
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["out_channels"] = out_channels;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_input = op_handle<at::Tensor(
        const at::Tensor&, const at::Tensor&, c10::IntArrayRef, c10::IntArrayRef,
        c10::IntArrayRef, c10::IntArrayRef, int64_t)>("slimops::conv2d_backward_input");
    static const auto backward_weight = op_handle<at::Tensor(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::IntArrayRef,
        c10::IntArrayRef, c10::IntArrayRef, int64_t)>("slimops::conv2d_backward_weight");
    const SavedConv c = load_conv(ctx);
    const int64_t groups = ctx->saved_data["groups"].toInt();
    const std::vector<bool> needs = needs_input_grad(ctx);
    // needs[8..10]: scale, shift, residual
    const EpilogueGrads eg = conv_epilogue_grads(grads[0], c, needs, 8);
    static const auto backward_both = op_handle<std::tuple<at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::IntArrayRef,
        c10::IntArrayRef, c10::IntArrayRef, int64_t)>("slimops::conv2d_backward");
    variable_list result(12);
    if (needs[0] && needs[1]) {
      // Both gradients as one op, so that a device can share work between them: on CPU
      // it may be one oneDNN call for the two (csrc/cpu/conv2d.cpp).
      std::tie(result[0], result[1]) = backward_both.call(eg.grad_z, c.input, c.weight,
                                                          c.stride, c.padding, c.dilation,
                                                          groups);
    } else {
      if (needs[0])
        result[0] = backward_input.call(eg.grad_z, c.weight, int_sizes(c.input), c.stride,
                                        c.padding, c.dilation, groups);
      if (needs[1])
        result[1] = backward_weight.call(eg.grad_z, c.input, c.weight, c.stride, c.padding,
                                         c.dilation, groups);
    }
    if (needs[2]) {
      const at::Tensor g = channel_sum(eg.grad_z).view({groups, -1});
      result[2] = pad_prefix(g, c.bias.size(0) / groups).reshape({-1});
    }
    epilogue_param_grads(result, needs, 8, eg, [&] {
      return conv2d_op(c.input, c.weight, optional(c.bias),
                       ctx->saved_data["out_channels"].toInt(), c.stride, c.padding, c.dilation,
                       groups, std::nullopt, std::nullopt, std::nullopt, 0);
    });
    return result;
  }
};

at::Tensor conv2d_autograd(const at::Tensor& input, const at::Tensor& weight,
                           const OptTensor& bias, int64_t out_channels, c10::IntArrayRef stride,
                           c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
                           const OptTensor& scale, const OptTensor& shift,
                           const OptTensor& residual, int64_t activation) {
  if (!graph_needed(input, weight, bias, scale, shift, residual)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return conv2d_op(input, weight, bias, out_channels, stride, padding, dilation, groups, scale,
                     shift, residual, activation);
  }
  return Conv2dFunction::apply(input, weight, bias, out_channels, stride, padding, dilation,
                               groups, scale, shift, residual, activation);
}

}  // namespace

TORCH_LIBRARY_IMPL(slimops, Autograd, m) { m.impl("conv2d", &conv2d_autograd); }

}  // namespace autograd
}  // namespace slimops
