// Launch wrappers of the slimops CUDA kernels: raw pointers, sizes, strides and a stream; no
// torch. Implemented in csrc/cuda/*.cu (nvcc alone compiles them) and called from
// csrc/cuda/bindings.cpp, which checks the arguments and allocates the outputs. Each returns
// the launch's cudaError_t (cudaSuccess when there is nothing to do).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "cuda/epilogue_math.cuh"

namespace slimops {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// An optional per-channel vector (bias, scale, BN parameter, running statistic, ...), read
// through its stride so a view of a parameter is never copied; data == nullptr when absent.
struct Vec {
  const void* data;
  int64_t stride;
};

// A 4-D tensor's strides in elements (N, C, H, W) or, for a weight, (C_full, 1, kh, kw).
struct Strides4 {
  int64_t s[4];
};

// ---- depthwise convolution on the prefix W[:C] of a [C_full, 1, kh, kw] weight ----------------
// out: contiguous [N, C, OH, OW]; residual: contiguous like out, or null; x and w strided.
cudaError_t depthwise_conv2d_forward(DType dtype, void* out, const void* x, Strides4 x_strides,
                                     const void* w, Strides4 w_strides, int64_t N, int64_t C,
                                     const DwGeom& geom, Vec bias, Vec scale, Vec shift,
                                     const void* residual, int activation, cudaStream_t stream);
// grad_input: contiguous [N, C, H, W]; grad_z strided [N, C, OH, OW].
cudaError_t depthwise_conv2d_backward_input(DType dtype, void* grad_input, const void* grad_z,
                                            Strides4 gz_strides, const void* w,
                                            Strides4 w_strides, int64_t N, int64_t C,
                                            const DwGeom& geom, cudaStream_t stream);
// Writes rows [0, C) of grad_weight (strided, full shape); the caller zeroes the rest. One
// block per (channel, tap) with a fixed-order reduction: deterministic, no atomics.
cudaError_t depthwise_conv2d_backward_weight(DType dtype, void* grad_weight,
                                             Strides4 gw_strides, const void* grad_z,
                                             Strides4 gz_strides, const void* x,
                                             Strides4 x_strides, int64_t N, int64_t C,
                                             const DwGeom& geom, cudaStream_t stream);

// ---- fused epilogue on a contiguous [N, C, HW] tensor ------------------------------------------
// out = act((z + bias) * scale + shift + residual); out may alias z (in place).
cudaError_t epilogue_forward(DType dtype, void* out, const void* z, int64_t N, int64_t C,
                             int64_t HW, Vec bias, Vec scale, Vec shift, const void* residual,
                             int activation, cudaStream_t stream);
// grad_z = grad_out * act'(out) * scale[c].
cudaError_t epilogue_backward(DType dtype, void* grad_z, const void* grad_out, const void* out,
                              int64_t N, int64_t C, int64_t HW, Vec scale, int activation,
                              cudaStream_t stream);

// ---- switchable batch norm + residual + activation, contiguous [N, C, HW] --------------------
// Training: per-channel Welford partials per block, then a fixed-order Chan combine per channel
// (deterministic), then the elementwise pass. Eval: running statistics (in `dtype`).
// mean_out/var_out get the statistics used (var biased) in the accumulation type: float for
// kFloat32/kFloat16/kBFloat16, double for kFloat64 (never rounded to 16 bits).
// `workspace` must hold batch_norm_workspace_bytes().
size_t batch_norm_workspace_bytes(DType dtype, int64_t N, int64_t C, int64_t HW);
cudaError_t batch_norm_act_forward(DType dtype, void* out, void* mean_out, void* var_out,
                                   const void* x, int64_t N, int64_t C, int64_t HW, Vec weight,
                                   Vec bias, Vec running_mean, Vec running_var, bool training,
                                   double eps, const void* residual, int activation,
                                   void* workspace, cudaStream_t stream);
// (grad_input, grad_weight, grad_bias) from grad_out, input, out and the statistics used
// (mean / var in the accumulation type, as batch_norm_act_forward wrote them).
cudaError_t batch_norm_act_backward(DType dtype, void* grad_input, void* grad_weight,
                                    void* grad_bias, const void* grad_out, const void* x,
                                    const void* out, int64_t N, int64_t C, int64_t HW,
                                    Vec weight, Vec mean, Vec var, double eps, bool training,
                                    int activation, void* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace slimops
