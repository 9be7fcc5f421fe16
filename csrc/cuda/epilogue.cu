// The fused epilogue act((z + bias) * scale + shift + residual) as a standalone elementwise
// pass (for producers that cannot fuse it, e.g. a GEMM), and its backward
// grad_z = grad_out * act'(out) * scale[c]. Contiguous [N, C, HW] tensors; the per-channel
// vectors are read through their strides.
#include "cuda/common.cuh"

namespace slimops {
namespace cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kThreads)
    epilogue_forward_kernel(T* out, const T* z, int64_t total, int64_t C, int64_t HW,
                            const T* bias, int64_t bs, const T* scale, int64_t ss,
                            const T* shift, int64_t shs, const T* residual, int activation) {
  using Acc = typename AccOf<T>::type;
  SLIMOPS_GRID_STRIDE_LOOP(idx, total) {
    const int64_t c = (idx / HW) % C;
    const Acc r = residual ? to_acc<Acc>(residual[idx]) : Acc(0);
    out[idx] = from_acc<T>(epilogue<Acc>(to_acc<Acc>(z[idx]),
                                         channel_value<Acc>(bias, bs, c, Acc(0)),
                                         channel_value<Acc>(scale, ss, c, Acc(1)),
                                         channel_value<Acc>(shift, shs, c, Acc(0)), r,
                                         activation));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    epilogue_backward_kernel(T* grad_z, const T* grad_out, const T* out, int64_t total,
                             int64_t C, int64_t HW, const T* scale, int64_t ss,
                             int activation) {
  using Acc = typename AccOf<T>::type;
  SLIMOPS_GRID_STRIDE_LOOP(idx, total) {
    const int64_t c = (idx / HW) % C;
    grad_z[idx] = from_acc<T>(epilogue_grad<Acc>(to_acc<Acc>(grad_out[idx]),
                                                 to_acc<Acc>(out[idx]),
                                                 channel_value<Acc>(scale, ss, c, Acc(1)),
                                                 activation));
  }
}

}  // namespace

cudaError_t epilogue_forward(DType dtype, void* out, const void* z, int64_t N, int64_t C,
                             int64_t HW, Vec bias, Vec scale, Vec shift, const void* residual,
                             int activation, cudaStream_t stream) {
  const int64_t total = N * C * HW;
  if (total == 0) return cudaSuccess;
  SLIMOPS_CUDA_DISPATCH(dtype, {
    epilogue_forward_kernel<T><<<grid_for(total), kThreads, 0, stream>>>(
        typed<T>(out), typed<T>(z), total, C, HW, typed<T>(bias.data), bias.stride,
        typed<T>(scale.data), scale.stride, typed<T>(shift.data), shift.stride,
        typed<T>(residual), activation);
  })
  return cudaGetLastError();
}

cudaError_t epilogue_backward(DType dtype, void* grad_z, const void* grad_out, const void* out,
                              int64_t N, int64_t C, int64_t HW, Vec scale, int activation,
                              cudaStream_t stream) {
  const int64_t total = N * C * HW;
  if (total == 0) return cudaSuccess;
  SLIMOPS_CUDA_DISPATCH(dtype, {
    epilogue_backward_kernel<T><<<grid_for(total), kThreads, 0, stream>>>(
        typed<T>(grad_z), typed<T>(grad_out), typed<T>(out), total, C, HW,
        typed<T>(scale.data), scale.stride, activation);
  })
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace slimops
