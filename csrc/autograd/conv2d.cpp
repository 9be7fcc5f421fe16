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
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["out_channels"] = out_channels;
    ctx->saved_data["activation"] = activation;
    // The output is needed for the activation's mask; bias only to recompute the pre-scale
    // conv when scale itself needs a gradient (rare: eval-mode BN fine-tuning), which is
    // cheaper than saving that tensor on every forward.
    ctx->save_for_backward({input, weight, bias.value_or(at::Tensor()),
                            scale.value_or(at::Tensor()), out});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_input = op_handle<at::Tensor(
        const at::Tensor&, const at::Tensor&, c10::IntArrayRef, c10::IntArrayRef,
        c10::IntArrayRef, c10::IntArrayRef, int64_t)>("slimops::conv2d_backward_input");
    static const auto backward_weight = op_handle<at::Tensor(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::IntArrayRef,
        c10::IntArrayRef, c10::IntArrayRef, int64_t)>("slimops::conv2d_backward_weight");
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &input = saved[0], &weight = saved[1], &bias = saved[2], &scale = saved[3],
                     &out = saved[4];
    const std::vector<int64_t> stride = ctx->saved_data["stride"].toIntVector();
    const std::vector<int64_t> padding = ctx->saved_data["padding"].toIntVector();
    const std::vector<int64_t> dilation = ctx->saved_data["dilation"].toIntVector();
    const int64_t groups = ctx->saved_data["groups"].toInt();
    const int64_t activation = ctx->saved_data["activation"].toInt();
    const std::vector<bool> needs = needs_input_grad(ctx);
    // needs[8..10]: scale, shift, residual
    const EpilogueGrads eg = epilogue_grads(grads[0], out, optional(scale), activation,
                                            needs[8] || needs[9] || needs[10]);
    variable_list result(12);
    if (needs[0])
      result[0] = backward_input.call(eg.grad_z, weight, int_sizes(input), stride, padding,
                                      dilation, groups);
    if (needs[1])
      result[1] = backward_weight.call(eg.grad_z, input, weight, stride, padding, dilation,
                                       groups);
    if (needs[2]) {
      const at::Tensor g = channel_sum(eg.grad_z).view({groups, -1});
      result[2] = pad_prefix(g, bias.size(0) / groups).reshape({-1});
    }
    epilogue_param_grads(result, needs, 8, eg, [&] {
      return conv2d_op(input, weight, optional(bias), ctx->saved_data["out_channels"].toInt(),
                       stride, padding, dilation, groups, std::nullopt, std::nullopt,
                       std::nullopt, 0);
    });
    return result;
  }
};

at::Tensor conv2d_autograd(const at::Tensor& input, const at::Tensor& weight,
                           const OptTensor& bias, int64_t out_channels, c10::IntArrayRef stride,
                           c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
                           const OptTensor& scale, const OptTensor& shift,
                           const OptTensor& residual, int64_t activation) {
  return Conv2dFunction::apply(input, weight, bias, out_channels, stride, padding, dilation,
                               groups, scale, shift, residual, activation);
}

}  // namespace

TORCH_LIBRARY_IMPL(slimops, Autograd, m) { m.impl("conv2d", &conv2d_autograd); }

}  // namespace autograd
}  // namespace slimops
