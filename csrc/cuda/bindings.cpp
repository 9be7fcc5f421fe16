// CUDA kernels of the slimops ops (the CUDA dispatch key of the schemas in csrc/ops.cpp):
// argument checks, output allocation and the current stream here; the kernels themselves are
// in csrc/cuda/*.cu behind the torch-free launch wrappers of csrc/cuda/launch.h.
//
// Registered: depthwise_conv2d (+ fused epilogue), depthwise_conv2d_backward_input,
// depthwise_conv2d_backward_weight, epilogue_backward, batch_norm_act,
// batch_norm_act_backward. Not registered (no CUDA C++ kernel yet): conv2d and its backwards,
// linear and its backwards; slimops.ops.cuda_registration gives those ops the Triton kernels.
//
// Only the light c10/cuda headers are used (stream, device guard): ATen/cuda/CUDAContext.h
// pulls in cuBLAS / cuSPARSE / cuSOLVER headers, which a bare CUDA toolkit may lack.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "arg_checks.h"
#include "cuda/launch.h"

namespace slimops {
namespace cuda {
namespace {

DType dtype_of(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK(false, "slimops::", op, ": the CUDA kernel supports float32, float64, float16 "
                  "and bfloat16; ", name, " is ", t.scalar_type());
  }
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "slimops::", op, ": CUDA kernel launch failed: ",
              cudaGetErrorString(err));
}

// A 1-D vector read through its stride (never copied); absent -> {nullptr, 0}.
Vec vec(const c10::optional<at::Tensor>& t) {
  if (!t.has_value() || !t->defined() || t->numel() == 0) return Vec{nullptr, 0};
  return Vec{t->data_ptr(), t->stride(0)};
}
Vec vec(const at::Tensor& t) { return Vec{t.data_ptr(), t.stride(0)}; }

Strides4 strides4(const at::Tensor& t) {
  return Strides4{{t.stride(0), t.stride(1), t.stride(2), t.stride(3)}};
}

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// ---- depthwise convolution -------------------------------------------------------------------

// Validates the shared shape arguments and derives the output size (arg_checks.h, as the CPU
// kernel does). The weight may have any strides: the kernels read its prefix W[:C] through
// them.
DwGeom make_geom(const char* op, at::IntArrayRef input_size, const at::Tensor& weight,
                 at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_device(weight, c10::kCUDA, op, "weight");
  check_depthwise_weight(weight, op);
  // Checked 64-bit arithmetic first (checked_size.h), then the kernel's 32-bit limit.
  const auto [OH, OW] = depthwise_output_size(op, input_size, weight, stride, padding, dilation);
  const int64_t H = input_size[2], W = input_size[3];
  const int64_t KH = weight.size(2), KW = weight.size(3);
  // The tap loop computes plane coordinates in 32 bits (fewer registers, no spills).
  constexpr int64_t kMax32 = (int64_t(1) << 31) - 1;
  TORCH_CHECK(H + 2 * padding[0] < kMax32 && W + 2 * padding[1] < kMax32 &&
                  dilation[0] * (KH - 1) + 1 < kMax32 && dilation[1] * (KW - 1) + 1 < kMax32 &&
                  stride[0] < kMax32 && stride[1] < kMax32,
              "slimops::", op, ": the CUDA kernel needs padded plane sizes, dilated kernel "
              "sizes and strides below 2^31, got input ", input_size, ", padding ", padding,
              ", dilation ", dilation, ", stride ", stride);
  return DwGeom{H, W, KH, KW, OH, OW, stride[0], stride[1], padding[0], padding[1],
                dilation[0], dilation[1]};
}

at::Tensor depthwise_conv2d_op(const at::Tensor& input, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation,
                               const c10::optional<at::Tensor>& scale,
                               const c10::optional<at::Tensor>& shift,
                               const c10::optional<at::Tensor>& residual, int64_t activation) {
  constexpr const char* op = "depthwise_conv2d";
  check_activation(activation);
  check_device(input, c10::kCUDA, op, "input");
  const DType dtype = dtype_of(input, op, "input");
  check_depthwise_input(input, op);
  check_same(weight, input, op, "weight");
  const DwGeom g = make_geom(op, input.sizes(), weight, stride, padding, dilation);
  const int64_t N = input.size(0), C = input.size(1);
  const std::vector<int64_t> out_size{N, C, g.OH, g.OW};
  check_depthwise_epilogue(op, input, weight, bias, scale, shift, residual, out_size);
  at::Tensor res;
  if (residual.has_value() && residual->defined()) res = residual->contiguous();
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor out = at::empty(out_size, input.options().memory_format(at::MemoryFormat::Contiguous));
  // input and weight are read through their strides: no copy of either.
  check_launch(depthwise_conv2d_forward(dtype, out.data_ptr(), input.data_ptr(),
                                        strides4(input), weight.data_ptr(), strides4(weight), N,
                                        C, g, vec(bias), vec(scale), vec(shift),
                                        ptr_or_null(res), static_cast<int>(activation),
                                        current_stream()),
               op);
  return out;
}

at::Tensor depthwise_conv2d_backward_input_op(const at::Tensor& grad_z, const at::Tensor& weight,
                                              at::IntArrayRef input_size, at::IntArrayRef stride,
                                              at::IntArrayRef padding,
                                              at::IntArrayRef dilation) {
  constexpr const char* op = "depthwise_conv2d_backward_input";
  check_device(grad_z, c10::kCUDA, op, "grad_z");
  const DType dtype = dtype_of(grad_z, op, "grad_z");
  check_same(weight, grad_z, op, "weight");
  const DwGeom g = make_geom(op, input_size, weight, stride, padding, dilation);
  const int64_t N = input_size[0], C = input_size[1];
  check_depthwise_grad_z(grad_z, {N, C, g.OH, g.OW}, op, "input_size", input_size);
  const c10::cuda::CUDAGuard guard(grad_z.device());
  at::Tensor grad_input =
      at::empty(input_size, grad_z.options().memory_format(at::MemoryFormat::Contiguous));
  check_launch(depthwise_conv2d_backward_input(dtype, grad_input.data_ptr(), grad_z.data_ptr(),
                                               strides4(grad_z), weight.data_ptr(),
                                               strides4(weight), N, C, g, current_stream()),
               op);
  return grad_input;
}

at::Tensor depthwise_conv2d_backward_weight_op(const at::Tensor& grad_z, const at::Tensor& input,
                                               const at::Tensor& weight, at::IntArrayRef stride,
                                               at::IntArrayRef padding,
                                               at::IntArrayRef dilation) {
  constexpr const char* op = "depthwise_conv2d_backward_weight";
  check_device(input, c10::kCUDA, op, "input");
  const DType dtype = dtype_of(input, op, "input");
  check_depthwise_input(input, op);
  check_same(grad_z, input, op, "grad_z");
  check_same(weight, input, op, "weight");
  const DwGeom g = make_geom(op, input.sizes(), weight, stride, padding, dilation);
  const int64_t N = input.size(0), C = input.size(1);
  check_depthwise_grad_z(grad_z, {N, C, g.OH, g.OW}, op, "input", input.sizes());
  const c10::cuda::CUDAGuard guard(input.device());
  // Full weight shape: rows past C stay zero so autograd accumulates it as is.
  at::Tensor grad_weight = at::zeros(weight.sizes(), weight.options());
  check_launch(depthwise_conv2d_backward_weight(dtype, grad_weight.data_ptr(),
                                                strides4(grad_weight), grad_z.data_ptr(),
                                                strides4(grad_z), input.data_ptr(),
                                                strides4(input), N, C, g, current_stream()),
               op);
  return grad_weight;
}

// ---- epilogue backward -----------------------------------------------------------------------

at::Tensor epilogue_backward_op(const at::Tensor& grad_out, const at::Tensor& out,
                                const c10::optional<at::Tensor>& scale, int64_t activation) {
  constexpr const char* op = "epilogue_backward";
  check_activation(activation);
  check_device(out, c10::kCUDA, op, "out");
  const DType dtype = dtype_of(out, op, "out");
  check_epilogue_backward_args(op, grad_out, out, scale);
  const int64_t N = out.size(0), C = out.size(1);
  const c10::cuda::CUDAGuard guard(out.device());
  const at::Tensor g = grad_out.contiguous(), o = out.contiguous();
  at::Tensor result = at::empty(o.sizes(), o.options());
  const int64_t HW = N * C == 0 ? 0 : o.numel() / (N * C);
  check_launch(epilogue_backward(dtype, result.data_ptr(), g.data_ptr(), o.data_ptr(), N, C, HW,
                                 vec(scale), static_cast<int>(activation), current_stream()),
               op);
  return result;
}

// ---- switchable batch norm + activation ------------------------------------------------------

int64_t plane_size(const at::Tensor& t) {
  int64_t hw = 1;
  for (int64_t d = 2; d < t.dim(); ++d) hw *= t.size(d);
  return hw;
}

// The dtype of the statistics (mean / var) the forward returns and the backward takes: the
// kernels' accumulation type (AccOf, epilogue_math.cuh), float32 for float32, float16 and
// bfloat16 inputs, float64 for float64 (slimops.reference.stats_dtype). A float16 layer's
// variance is then not rounded to float16 before the backward takes 1/std from it.
at::ScalarType stats_type(const at::Tensor& input) {
  return input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_bn_input(const at::Tensor& input, const char* op) {
  check_batch_norm_input(input, c10::kCUDA, op);
  TORCH_CHECK(input.size(1) <= 65535, "slimops::", op,
              ": the CUDA kernel supports at most 65535 channels, got ", input.size(1));
}

// Scratch for the per-block partials and per-channel coefficients (caching allocator).
at::Tensor workspace(DType dtype, int64_t N, int64_t C, int64_t HW, const at::Tensor& like) {
  const auto bytes = static_cast<int64_t>(batch_norm_workspace_bytes(dtype, N, C, HW));
  return at::empty({bytes}, like.options().dtype(at::kByte));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_op(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, bool training, double eps,
    const c10::optional<at::Tensor>& residual, int64_t activation) {
  constexpr const char* op = "batch_norm_act";
  check_activation(activation);
  check_bn_input(input, op);
  const DType dtype = dtype_of(input, op, "input");
  check_batch_norm_act_args(op, input, weight, bias, running_mean, running_var, training, eps,
                            residual);
  const int64_t N = input.size(0), C = input.size(1), HW = plane_size(input);
  at::Tensor res;
  if (residual.has_value() && residual->defined()) res = residual->contiguous();
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor save_mean = at::empty({C}, x.options().dtype(stats_type(x)));
  at::Tensor save_var = at::empty({C}, x.options().dtype(stats_type(x)));
  at::Tensor ws = workspace(dtype, N, C, HW, x);
  check_launch(batch_norm_act_forward(dtype, out.data_ptr(), save_mean.data_ptr(),
                                      save_var.data_ptr(), x.data_ptr(), N, C, HW, vec(weight),
                                      vec(bias), vec(running_mean), vec(running_var), training,
                                      eps, ptr_or_null(res), static_cast<int>(activation),
                                      ws.data_ptr(), current_stream()),
               op);
  return std::make_tuple(out, save_mean, save_var);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_backward_op(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& out,
    const c10::optional<at::Tensor>& weight, const at::Tensor& save_mean,
    const at::Tensor& save_var, double eps, bool training, int64_t activation) {
  constexpr const char* op = "batch_norm_act_backward";
  check_activation(activation);
  check_bn_input(input, op);
  const DType dtype = dtype_of(input, op, "input");
  check_batch_norm_act_backward_args(op, input, grad_out, out, weight, save_mean, save_var,
                                     eps, stats_type(input));
  const int64_t N = input.size(0), C = input.size(1), HW = plane_size(input);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous(), go = grad_out.contiguous(), y = out.contiguous();
  at::Tensor grad_input = at::empty(x.sizes(), x.options());
  at::Tensor grad_weight = at::empty({C}, x.options());
  at::Tensor grad_bias = at::empty({C}, x.options());
  at::Tensor ws = workspace(dtype, N, C, HW, x);
  check_launch(batch_norm_act_backward(dtype, grad_input.data_ptr(), grad_weight.data_ptr(),
                                       grad_bias.data_ptr(), go.data_ptr(), x.data_ptr(),
                                       y.data_ptr(), N, C, HW, vec(weight), vec(save_mean),
                                       vec(save_var), eps, training,
                                       static_cast<int>(activation), ws.data_ptr(),
                                       current_stream()),
               op);
  return std::make_tuple(grad_input, grad_weight, grad_bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(slimops, CUDA, m) {
  m.impl("depthwise_conv2d", &depthwise_conv2d_op);
  m.impl("depthwise_conv2d_backward_input", &depthwise_conv2d_backward_input_op);
  m.impl("depthwise_conv2d_backward_weight", &depthwise_conv2d_backward_weight_op);
  m.impl("epilogue_backward", &epilogue_backward_op);
  m.impl("batch_norm_act", &batch_norm_act_op);
  m.impl("batch_norm_act_backward", &batch_norm_act_backward_op);
}

}  // namespace cuda
}  // namespace slimops
