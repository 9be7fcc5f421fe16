// Argument checks of the ops, shared by the CPU kernels (csrc/cpu) and the CUDA bindings
// (csrc/cuda/bindings.cpp), so that both reject bad input with the same message (tests match
// the messages). What differs by device stays with the device: the dtypes a kernel supports
// (the CPU kernels take float32 and float64, the CUDA kernels float16 and bfloat16 as well),
// the CPU kernels' contiguous weight, the CUDA kernels' 32-bit limits. A check that names
// the device takes it as a parameter.
//
// Each group runs its checks in the order both devices ran them before they were shared: the
// first failing check decides the message.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <array>
#include <cstdint>

#include "checked_size.h"

namespace slimops {

// ---- single arguments ------------------------------------------------------------------------

inline void check_activation(int64_t activation) {
  TORCH_CHECK(activation >= 0 && activation <= 2,
              "slimops: activation must be 0 (none), 1 (relu) or 2 (relu6), got ", activation);
}

// `device` is c10::kCPU or c10::kCUDA: the kernel's own device.
inline void check_device(const at::Tensor& t, c10::DeviceType device, const char* op,
                         const char* name) {
  TORCH_CHECK(t.device().type() == device, "slimops::", op, ": ", name,
              device == c10::kCUDA ? " must be a CUDA tensor, got " : " must be on the CPU, got ",
              t.device());
}

// `t` has the dtype and device of `ref` (the op's input).
inline void check_same(const at::Tensor& t, const at::Tensor& ref, const char* op,
                       const char* name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "slimops::", op, ": ", name, " has dtype ",
              t.scalar_type(), " but input has ", ref.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), "slimops::", op, ": ", name, " is on ", t.device(),
              " but input is on ", ref.device());
}

// An optional 1-D vector of `len` entries (absent or undefined passes).
inline void check_vector(const c10::optional<at::Tensor>& t, int64_t len, const at::Tensor& ref,
                         const char* op, const char* name) {
  if (!t.has_value() || !t->defined()) return;
  check_same(*t, ref, op, name);
  TORCH_CHECK(t->dim() == 1 && t->size(0) == len, "slimops::", op, ": ", name,
              " must be a vector of length ", len, ", got shape ", t->sizes());
}

inline void check_shape(const at::Tensor& t, const at::Tensor& ref, const char* op,
                        const char* name, at::IntArrayRef expected) {
  check_same(t, ref, op, name);
  TORCH_CHECK(t.sizes() == expected, "slimops::", op, ": ", name, " must have shape ", expected,
              ", got ", t.sizes());
}

inline void check_like_input(const at::Tensor& t, const at::Tensor& input, const char* op,
                             const char* name) {
  check_same(t, input, op, name);
  TORCH_CHECK(t.sizes() == input.sizes(), "slimops::", op, ": ", name,
              " must have the input's shape ", input.sizes(), ", got ", t.sizes());
}

// A (height, width) pair of a convolution: stride, padding or dilation, each >= min.
inline void check_pair(at::IntArrayRef v, const char* op, const char* name, int64_t min) {
  TORCH_CHECK(v.size() == 2, "slimops::", op, ": ", name, " must have 2 elements, got ", v);
  TORCH_CHECK(v[0] >= min && v[1] >= min, "slimops::", op, ": ", name, " must be >= ", min,
              ", got ", v);
}

// ---- depthwise convolution -------------------------------------------------------------------

inline void check_depthwise_input(const at::Tensor& input, const char* op) {
  TORCH_CHECK(input.dim() == 4, "slimops::", op, ": input must be 4-D [N, C, H, W], got ",
              input.sizes());
}

// The weight's shape [C_full, 1, kh, kw]; its strides are the device's business.
inline void check_depthwise_weight(const at::Tensor& weight, const char* op) {
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == 1, "slimops::", op,
              ": weight must have shape [C_full, 1, kh, kw], got ", weight.sizes());
  TORCH_CHECK(weight.size(2) >= 1 && weight.size(3) >= 1, "slimops::", op,
              ": weight kernel size must be >= 1, got ", weight.sizes());
}

// Validates the geometry the three depthwise ops share (after check_depthwise_weight) and
// returns the output's {height, width}, computed in checked 64-bit arithmetic
// (checked_size.h): an extreme stride, padding or dilation is an error or the right size,
// never a wrapped one.
inline std::array<int64_t, 2> depthwise_output_size(const char* op, at::IntArrayRef input_size,
                                                    const at::Tensor& weight,
                                                    at::IntArrayRef stride,
                                                    at::IntArrayRef padding,
                                                    at::IntArrayRef dilation) {
  check_pair(stride, op, "stride", 1);
  check_pair(padding, op, "padding", 0);
  check_pair(dilation, op, "dilation", 1);
  TORCH_CHECK(input_size.size() == 4, "slimops::", op,
              ": input size must be 4-D [N, C, H, W], got ", input_size);
  for (int64_t s : input_size)
    TORCH_CHECK(s >= 0, "slimops::", op, ": input size must be non-negative, got ", input_size);
  const int64_t C = input_size[1], H = input_size[2], W = input_size[3];
  TORCH_CHECK(C >= 1 && C <= weight.size(0), "slimops::", op, ": input has ", C,
              " channels; expected between 1 and the weight's ", weight.size(0));
  TORCH_CHECK(H >= 1 && W >= 1, "slimops::", op, ": input spatial size must be non-zero, got ",
              input_size);
  return {conv_output_size(op, "height", H, weight.size(2), stride[0], padding[0], dilation[0]),
          conv_output_size(op, "width", W, weight.size(3), stride[1], padding[1], dilation[1])};
}

// The forward's fused epilogue operands: bias over the full weight's channels, scale and
// shift over the active ones, a residual of the output's shape.
inline void check_depthwise_epilogue(const char* op, const at::Tensor& input,
                                     const at::Tensor& weight,
                                     const c10::optional<at::Tensor>& bias,
                                     const c10::optional<at::Tensor>& scale,
                                     const c10::optional<at::Tensor>& shift,
                                     const c10::optional<at::Tensor>& residual,
                                     at::IntArrayRef out_size) {
  check_vector(bias, weight.size(0), input, op, "bias");
  check_vector(scale, out_size[1], input, op, "scale");
  check_vector(shift, out_size[1], input, op, "shift");
  if (residual.has_value() && residual->defined())
    check_shape(*residual, input, op, "residual", out_size);
}

// grad_z of a backward op: the forward's output shape `expected` for the input of size
// `input_size` (named `input_name` in the message: the op's argument it came from).
inline void check_depthwise_grad_z(const at::Tensor& grad_z, at::IntArrayRef expected,
                                   const char* op, const char* input_name,
                                   at::IntArrayRef input_size) {
  TORCH_CHECK(grad_z.sizes() == expected, "slimops::", op, ": grad_z must have shape [",
              expected[0], ", ", expected[1], ", ", expected[2], ", ", expected[3], "] for ",
              input_name, " ", input_size, ", got ", grad_z.sizes());
}

// ---- epilogue backward -----------------------------------------------------------------------

// After the device's dtype check of `out`.
inline void check_epilogue_backward_args(const char* op, const at::Tensor& grad_out,
                                         const at::Tensor& out,
                                         const c10::optional<at::Tensor>& scale) {
  check_same(grad_out, out, op, "grad_out");
  TORCH_CHECK(grad_out.sizes() == out.sizes(), "slimops::", op, ": grad_out shape ",
              grad_out.sizes(), " differs from out shape ", out.sizes());
  TORCH_CHECK(out.dim() >= 2, "slimops::", op, ": expected at least 2 dims, got ", out.sizes());
  check_vector(scale, out.size(1), out, op, "scale");
}

// ---- switchable batch norm + activation ------------------------------------------------------

inline void check_batch_norm_input(const at::Tensor& input, c10::DeviceType device,
                                   const char* op) {
  check_device(input, device, op, "input");
  TORCH_CHECK(input.dim() >= 2, "slimops::", op, ": input must be at least 2-D [N, C, *], got ",
              input.sizes());
}

// The forward's other arguments (after check_batch_norm_input and the dtype check).
inline void check_batch_norm_act_args(const char* op, const at::Tensor& input,
                                      const c10::optional<at::Tensor>& weight,
                                      const c10::optional<at::Tensor>& bias,
                                      const c10::optional<at::Tensor>& running_mean,
                                      const c10::optional<at::Tensor>& running_var,
                                      bool training, double eps,
                                      const c10::optional<at::Tensor>& residual) {
  const int64_t C = input.size(1);
  check_vector(weight, C, input, op, "weight");
  check_vector(bias, C, input, op, "bias");
  check_vector(running_mean, C, input, op, "running_mean");
  check_vector(running_var, C, input, op, "running_var");
  TORCH_CHECK(eps >= 0, "slimops::", op, ": eps must be non-negative, got ", eps);
  if (training) {
    int64_t count = input.size(0);  // values per channel: N * H * W ...
    for (int64_t d = 2; d < input.dim(); ++d) count *= input.size(d);
    TORCH_CHECK(count > 1, "slimops::", op,
                ": expected more than 1 value per channel when training, got input of shape ",
                input.sizes());
  } else {
    TORCH_CHECK(running_mean.has_value() && running_mean->defined() &&
                    running_var.has_value() && running_var->defined(),
                "slimops::", op,
                ": running_mean and running_var are required when training is false");
  }
  if (residual.has_value() && residual->defined())
    check_like_input(*residual, input, op, "residual");
}

// A batch-norm statistics vector of the backward (save_mean / save_var: what the forward
// returned): `len` entries in `stats_dtype` on the input's device. The statistics dtype
// differs by device: the CPU kernels' is the input's own (they take float32 and float64), the
// CUDA kernels' their accumulation type, float32 for float16/bfloat16 inputs too.
inline void check_stats_vector(const at::Tensor& t, int64_t len, const at::Tensor& input,
                               at::ScalarType stats_dtype, const char* op, const char* name) {
  if (stats_dtype == input.scalar_type()) return check_vector(t, len, input, op, name);
  TORCH_CHECK(t.scalar_type() == stats_dtype, "slimops::", op, ": ", name, " has dtype ",
              t.scalar_type(), " but the statistics of a ", input.scalar_type(),
              " input are ", stats_dtype);
  TORCH_CHECK(t.device() == input.device(), "slimops::", op, ": ", name, " is on ", t.device(),
              " but input is on ", input.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == len, "slimops::", op, ": ", name,
              " must be a vector of length ", len, ", got shape ", t.sizes());
}

// The backward's other arguments (after check_batch_norm_input and the dtype check), with
// the statistics in `stats_dtype` (check_stats_vector).
inline void check_batch_norm_act_backward_args(const char* op, const at::Tensor& input,
                                               const at::Tensor& grad_out,
                                               const at::Tensor& out,
                                               const c10::optional<at::Tensor>& weight,
                                               const at::Tensor& save_mean,
                                               const at::Tensor& save_var, double eps,
                                               at::ScalarType stats_dtype) {
  check_like_input(grad_out, input, op, "grad_out");
  check_like_input(out, input, op, "out");
  const int64_t C = input.size(1);
  check_vector(weight, C, input, op, "weight");
  TORCH_CHECK(save_mean.defined() && save_var.defined(), "slimops::", op,
              ": save_mean and save_var are required");
  TORCH_CHECK(eps >= 0, "slimops::", op, ": eps must be non-negative, got ", eps);
  check_stats_vector(save_mean, C, input, stats_dtype, op, "save_mean");
  check_stats_vector(save_var, C, input, stats_dtype, op, "save_var");
}

// The same with the statistics in the input's dtype (the CPU kernels').
inline void check_batch_norm_act_backward_args(const char* op, const at::Tensor& input,
                                               const at::Tensor& grad_out,
                                               const at::Tensor& out,
                                               const c10::optional<at::Tensor>& weight,
                                               const at::Tensor& save_mean,
                                               const at::Tensor& save_var, double eps) {
  check_batch_norm_act_backward_args(op, input, grad_out, out, weight, save_mean, save_var, eps,
                                     input.scalar_type());
}

}  // namespace slimops
