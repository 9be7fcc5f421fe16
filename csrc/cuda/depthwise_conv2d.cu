// Depthwise convolution on the channel prefix W[:C] of a [C_full, 1, kh, kw] weight, with the
// fused epilogue act((z + bias) * scale + shift + residual), and its two backward ops. The
// weight is addressed through the full tensor's strides (no prefix copy); the per-pixel math is
// depthwise_taps / depthwise_grad_input_taps / depthwise_weight_term (epilogue_math.cuh),
// which the host harness runs on the CPU.
#include "cuda/common.cuh"

namespace slimops {
namespace cuda {
namespace {

template <typename T>
struct DwForwardArgs {
  T* out;
  const T* x;
  const T* w;
  const T* bias;
  const T* scale;
  const T* shift;
  const T* residual;
  int64_t bs, ss, shs;
  Strides4 xs, ws;
  int64_t N, C;
  DwGeom g;
  int activation;
};

// One thread per output pixel (grid-stride); consecutive threads take consecutive columns, so
// loads of x within a tap row coalesce for stride 1.
// KH / KW: the kernel size when fixed at compile time (3x3, 5x5: the taps unroll), else 0.
template <typename T, int KH, int KW>
__global__ void __launch_bounds__(kThreads) depthwise_forward_kernel(const DwForwardArgs<T> a) {
  using Acc = typename AccOf<T>::type;
  const DwGeom g = a.g;
  const int64_t total = a.N * a.C * g.OH * g.OW;
  SLIMOPS_GRID_STRIDE_LOOP(idx, total) {
    // Written out, not nchw_of (common.cuh): through the helper ptxas gives the double kernel
    // with a run-time kernel size (KH = KW = 0) 62 registers instead of 48 (nvcc 13, sm_90).
    const int64_t ow = idx % g.OW;
    int64_t t = idx / g.OW;
    const int64_t oh = t % g.OH;
    t /= g.OH;
    const int64_t c = t % a.C, n = t / a.C;
    const Acc z = depthwise_taps<Acc, KH, KW>(a.x + n * a.xs.s[0] + c * a.xs.s[1], a.xs.s[2], a.xs.s[3],
                                      a.w + c * a.ws.s[0], a.ws.s[2], a.ws.s[3], g, oh, ow);
    const Acc r = a.residual ? to_acc<Acc>(a.residual[idx]) : Acc(0);
    a.out[idx] = from_acc<T>(epilogue<Acc>(z, channel_value<Acc>(a.bias, a.bs, c, Acc(0)),
                                           channel_value<Acc>(a.scale, a.ss, c, Acc(1)),
                                           channel_value<Acc>(a.shift, a.shs, c, Acc(0)), r,
                                           a.activation));
  }
}

// One thread per input pixel, gathering from the outputs it feeds: no atomics.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    depthwise_backward_input_kernel(T* gi, const T* gz, Strides4 gzs, const T* w, Strides4 ws,
                                    int64_t N, int64_t C, const DwGeom g) {
  using Acc = typename AccOf<T>::type;
  const int64_t total = N * C * g.H * g.W;
  SLIMOPS_GRID_STRIDE_LOOP(idx, total) {
    const auto [n, c, ih, iw] = nchw_of(idx, C, g.H, g.W);
    gi[idx] = from_acc<T>(depthwise_grad_input_taps<Acc>(gz + n * gzs.s[0] + c * gzs.s[1],
                                                         gzs.s[2], gzs.s[3], w + c * ws.s[0],
                                                         ws.s[2], ws.s[3], g, ih, iw));
  }
}

// One block per (channel, tap): the block's threads stride over the N * OH * OW outputs, then
// a fixed-order tree reduction (deterministic).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    depthwise_backward_weight_kernel(T* gw, Strides4 gws, const T* gz, Strides4 gzs,
                                     const T* x, Strides4 xs, int64_t N, const DwGeom g) {
  using Acc = typename AccOf<T>::type;
  const int64_t taps = g.KH * g.KW;
  const int64_t c = blockIdx.x / taps, tap = blockIdx.x % taps;
  const int64_t i = tap / g.KW, j = tap % g.KW;
  const int64_t plane = g.OH * g.OW, total = N * plane;
  Acc acc = Acc(0);
  for (int64_t e = threadIdx.x; e < total; e += blockDim.x) {
    const int64_t n = e / plane, q = e % plane;
    acc += depthwise_weight_term<Acc>(gz + n * gzs.s[0] + c * gzs.s[1], gzs.s[2], gzs.s[3],
                                      x + n * xs.s[0] + c * xs.s[1], xs.s[2], xs.s[3], g, i, j,
                                      q / g.OW, q % g.OW);
  }
  const Acc sum = block_reduce(acc, [](Acc u, Acc v) { return u + v; });
  if (threadIdx.x == 0) gw[c * gws.s[0] + i * gws.s[2] + j * gws.s[3]] = from_acc<T>(sum);
}

}  // namespace

cudaError_t depthwise_conv2d_forward(DType dtype, void* out, const void* x, Strides4 x_strides,
                                     const void* w, Strides4 w_strides, int64_t N, int64_t C,
                                     const DwGeom& geom, Vec bias, Vec scale, Vec shift,
                                     const void* residual, int activation,
                                     cudaStream_t stream) {
  const int64_t total = N * C * geom.OH * geom.OW;
  if (total == 0) return cudaSuccess;
  SLIMOPS_CUDA_DISPATCH(dtype, {
    const DwForwardArgs<T> a{typed<T>(out),        typed<T>(x),          typed<T>(w),
                             typed<T>(bias.data),  typed<T>(scale.data), typed<T>(shift.data),
                             typed<T>(residual),   bias.stride,          scale.stride,
                             shift.stride,         x_strides,            w_strides,
                             N,                    C,                    geom,
                             activation};
    const unsigned grid = grid_for(total);
    if (geom.KH == 3 && geom.KW == 3) {
      depthwise_forward_kernel<T, 3, 3><<<grid, kThreads, 0, stream>>>(a);
    } else if (geom.KH == 5 && geom.KW == 5) {
      depthwise_forward_kernel<T, 5, 5><<<grid, kThreads, 0, stream>>>(a);
    } else {
      depthwise_forward_kernel<T, 0, 0><<<grid, kThreads, 0, stream>>>(a);
    }
  })
  return cudaGetLastError();
}

cudaError_t depthwise_conv2d_backward_input(DType dtype, void* grad_input, const void* grad_z,
                                            Strides4 gz_strides, const void* w,
                                            Strides4 w_strides, int64_t N, int64_t C,
                                            const DwGeom& geom, cudaStream_t stream) {
  const int64_t total = N * C * geom.H * geom.W;
  if (total == 0) return cudaSuccess;
  SLIMOPS_CUDA_DISPATCH(dtype, {
    depthwise_backward_input_kernel<T><<<grid_for(total), kThreads, 0, stream>>>(
        typed<T>(grad_input), typed<T>(grad_z), gz_strides, typed<T>(w), w_strides, N, C, geom);
  })
  return cudaGetLastError();
}

cudaError_t depthwise_conv2d_backward_weight(DType dtype, void* grad_weight,
                                             Strides4 gw_strides, const void* grad_z,
                                             Strides4 gz_strides, const void* x,
                                             Strides4 x_strides, int64_t N, int64_t C,
                                             const DwGeom& geom, cudaStream_t stream) {
  const int64_t blocks = C * geom.KH * geom.KW;
  if (blocks == 0) return cudaSuccess;
  if (blocks > int64_t(0x7fffffff)) return cudaErrorInvalidConfiguration;
  SLIMOPS_CUDA_DISPATCH(dtype, {
    depthwise_backward_weight_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        typed<T>(grad_weight), gw_strides, typed<T>(grad_z), gz_strides, typed<T>(x), x_strides,
        N, geom);
  })
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace slimops
