// Switchable batch norm (one width's BN) + residual + activation on a contiguous [N, C, HW]
// input, and its backward. Every per-channel reduction is two-stage and deterministic: a grid
// of (P blocks) x (C channels) reduces its share of each channel to a partial in a fixed tree
// order, then one thread per channel combines the P partials in index order. P depends only
// on the shape, so a given input always gives bit-identical statistics.
//   forward:  partials = Welford (count, mean, M2), combined with Chan's formula
//             -> mean, biased var -> alpha/beta -> y = act(x * alpha + beta + residual)
// The statistics the forward returns and the backward reads are in the accumulation type
// (float for float/half/bfloat16, double for double), so a half-precision layer's saved
// variance is not rounded to 16 bits before the backward takes 1/std from it.
//   backward: partials = (sum g, sum g * (x - mean)), g = grad_out * act'(out)
//             -> grad_weight, grad_bias and the grad_input coefficients (bn_backward_coeffs)
#include "cuda/common.cuh"

namespace slimops {
namespace cuda {
namespace {

// Blocks per channel: about 16 elements per thread, at most 128 blocks (the finalize loop).
int64_t partial_blocks(int64_t count) {
  const int64_t per_block = int64_t(kThreads) * 16;
  return std::min<int64_t>(128, std::max<int64_t>(1, (count + per_block - 1) / per_block));
}

template <typename Acc>
struct Sum2 {
  Acc s0, s1;
};

// The i-th element of channel c of a contiguous [N, C, HW] tensor, i in [0, N * HW).
__device__ __forceinline__ int64_t channel_offset(int64_t i, int64_t c, int64_t C, int64_t HW) {
  const int64_t n = i / HW;
  return (n * C + c) * HW + (i - n * HW);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    bn_stats_partial_kernel(Stats<typename AccOf<T>::type>* partials, const T* x, int64_t C,
                            int64_t HW, int64_t count) {
  using Acc = typename AccOf<T>::type;
  const int64_t c = blockIdx.y, P = gridDim.x;
  Stats<Acc> s = stats_empty<Acc>();
  for (int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x; i < count; i += P * kThreads)
    s = stats_push<Acc>(s, to_acc<Acc>(x[channel_offset(i, c, C, HW)]));
  const Stats<Acc> r = block_reduce(s, [](Stats<Acc> a, Stats<Acc> b) {
    return stats_combine<Acc>(a, b);
  });
  if (threadIdx.x == 0) partials[c * P + blockIdx.x] = r;
}

// One thread per channel: the statistics used (batch or running) and the folded affine map.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    bn_finalize_kernel(Affine<typename AccOf<T>::type>* affine,
                       typename AccOf<T>::type* mean_out, typename AccOf<T>::type* var_out,
                       const Stats<typename AccOf<T>::type>* partials, int64_t P, int64_t C,
                       bool training, Vec running_mean, Vec running_var, Vec weight, Vec bias,
                       double eps) {
  using Acc = typename AccOf<T>::type;
  const int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  Acc mean, var;
  if (training) {
    Stats<Acc> s = partials[c * P];
    for (int64_t p = 1; p < P; ++p) s = stats_combine<Acc>(s, partials[c * P + p]);
    mean = s.mean;
    var = stats_var<Acc>(s);
  } else {
    mean = channel_value<Acc>(typed<T>(running_mean.data), running_mean.stride, c, Acc(0));
    var = channel_value<Acc>(typed<T>(running_var.data), running_var.stride, c, Acc(1));
  }
  mean_out[c] = mean;
  var_out[c] = var;
  affine[c] = bn_affine<Acc>(mean, var, Acc(eps),
                             channel_value<Acc>(typed<T>(weight.data), weight.stride, c, Acc(1)),
                             channel_value<Acc>(typed<T>(bias.data), bias.stride, c, Acc(0)));
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    bn_apply_kernel(T* out, const T* x, const T* residual,
                    const Affine<typename AccOf<T>::type>* affine, int64_t total, int64_t C,
                    int64_t HW, int activation) {
  using Acc = typename AccOf<T>::type;
  SLIMOPS_GRID_STRIDE_LOOP(idx, total) {
    const int64_t c = (idx / HW) % C;
    const Acc r = residual ? to_acc<Acc>(residual[idx]) : Acc(0);
    out[idx] = from_acc<T>(bn_apply<Acc>(to_acc<Acc>(x[idx]), affine[c], r, activation));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    bn_grad_partial_kernel(Sum2<typename AccOf<T>::type>* partials, const T* grad_out,
                           const T* out, const T* x, Vec mean, int64_t C, int64_t HW,
                           int64_t count, int activation) {
  using Acc = typename AccOf<T>::type;
  const int64_t c = blockIdx.y, P = gridDim.x;
  const Acc m = channel_value<Acc>(typed<Acc>(mean.data), mean.stride, c, Acc(0));
  Sum2<Acc> s{Acc(0), Acc(0)};
  for (int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x; i < count; i += P * kThreads) {
    const int64_t o = channel_offset(i, c, C, HW);
    const Acc g = activation_grad<Acc>(to_acc<Acc>(grad_out[o]), to_acc<Acc>(out[o]), activation);
    s.s0 += g;
    s.s1 += g * (to_acc<Acc>(x[o]) - m);
  }
  const Sum2<Acc> r =
      block_reduce(s, [](Sum2<Acc> a, Sum2<Acc> b) { return Sum2<Acc>{a.s0 + b.s0, a.s1 + b.s1}; });
  if (threadIdx.x == 0) partials[c * P + blockIdx.x] = r;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    bn_grad_finalize_kernel(BnGrad<typename AccOf<T>::type>* coeffs, T* grad_weight,
                            T* grad_bias, const Sum2<typename AccOf<T>::type>* partials,
                            int64_t P, int64_t C, int64_t count, Vec var, Vec weight,
                            double eps, bool training) {
  using Acc = typename AccOf<T>::type;
  const int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  Acc s0 = Acc(0), s1 = Acc(0);
  for (int64_t p = 0; p < P; ++p) {
    s0 += partials[c * P + p].s0;
    s1 += partials[c * P + p].s1;
  }
  const BnGrad<Acc> k = bn_backward_coeffs<Acc>(
      s0, s1, Acc(count), channel_value<Acc>(typed<Acc>(var.data), var.stride, c, Acc(1)),
      Acc(eps), channel_value<Acc>(typed<T>(weight.data), weight.stride, c, Acc(1)), training);
  coeffs[c] = k;
  grad_weight[c] = from_acc<T>(k.grad_weight);
  grad_bias[c] = from_acc<T>(k.grad_bias);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    bn_grad_input_kernel(T* grad_input, const T* grad_out, const T* out, const T* x, Vec mean,
                         const BnGrad<typename AccOf<T>::type>* coeffs, int64_t total,
                         int64_t C, int64_t HW, int activation) {
  using Acc = typename AccOf<T>::type;
  SLIMOPS_GRID_STRIDE_LOOP(idx, total) {
    const int64_t c = (idx / HW) % C;
    const Acc g =
        activation_grad<Acc>(to_acc<Acc>(grad_out[idx]), to_acc<Acc>(out[idx]), activation);
    const Acc m = channel_value<Acc>(typed<Acc>(mean.data), mean.stride, c, Acc(0));
    grad_input[idx] = from_acc<T>(bn_grad_input<Acc>(coeffs[c], g, to_acc<Acc>(x[idx]), m));
  }
}

size_t acc_size(DType dtype) { return dtype == DType::kFloat64 ? sizeof(double) : sizeof(float); }

// Workspace layout: P * C partials (Stats or Sum2, whichever is larger: Stats), then C
// per-channel coefficient records (Affine or BnGrad: BnGrad).
size_t partials_bytes(DType dtype, int64_t C, int64_t P) {
  return size_t(C * P) * 3 * acc_size(dtype);
}

// The workspace as its two arrays, in T's accumulation type: the partials, then the records.
template <template <typename> class Partial, template <typename> class Record, typename T>
struct Workspace {
  using Acc = typename AccOf<T>::type;
  Partial<Acc>* partials;
  Record<Acc>* records;
};

template <template <typename> class Partial, template <typename> class Record, typename T>
Workspace<Partial, Record, T> split_workspace(void* workspace, DType dtype, int64_t C,
                                              int64_t P) {
  using Acc = typename AccOf<T>::type;
  return {static_cast<Partial<Acc>*>(workspace),
          reinterpret_cast<Record<Acc>*>(static_cast<char*>(workspace) +
                                         partials_bytes(dtype, C, P))};
}

}  // namespace

size_t batch_norm_workspace_bytes(DType dtype, int64_t N, int64_t C, int64_t HW) {
  const int64_t P = partial_blocks(N * HW);
  return partials_bytes(dtype, C, P) + size_t(C) * 5 * acc_size(dtype);
}

cudaError_t batch_norm_act_forward(DType dtype, void* out, void* mean_out, void* var_out,
                                   const void* x, int64_t N, int64_t C, int64_t HW, Vec weight,
                                   Vec bias, Vec running_mean, Vec running_var, bool training,
                                   double eps, const void* residual, int activation,
                                   void* workspace, cudaStream_t stream) {
  if (C == 0) return cudaSuccess;
  if (C > 65535) return cudaErrorInvalidConfiguration;  // gridDim.y of the partial pass
  const int64_t count = N * HW, P = partial_blocks(count), total = count * C;
  SLIMOPS_CUDA_DISPATCH(dtype, {
    const auto [partials, affine] = split_workspace<Stats, Affine, T>(workspace, dtype, C, P);
    if (training) {
      bn_stats_partial_kernel<T><<<dim3(unsigned(P), unsigned(C)), kThreads, 0, stream>>>(
          partials, typed<T>(x), C, HW, count);
    }
    using Acc = typename AccOf<T>::type;  // the statistics' type (launch.h)
    bn_finalize_kernel<T><<<grid_for(C), kThreads, 0, stream>>>(
        affine, typed<Acc>(mean_out), typed<Acc>(var_out), partials, P, C, training,
        running_mean, running_var, weight, bias, eps);
    if (total > 0) {
      bn_apply_kernel<T><<<grid_for(total), kThreads, 0, stream>>>(
          typed<T>(out), typed<T>(x), typed<T>(residual), affine, total, C, HW, activation);
    }
  })
  return cudaGetLastError();
}

cudaError_t batch_norm_act_backward(DType dtype, void* grad_input, void* grad_weight,
                                    void* grad_bias, const void* grad_out, const void* x,
                                    const void* out, int64_t N, int64_t C, int64_t HW,
                                    Vec weight, Vec mean, Vec var, double eps, bool training,
                                    int activation, void* workspace, cudaStream_t stream) {
  if (C == 0) return cudaSuccess;
  if (C > 65535) return cudaErrorInvalidConfiguration;
  const int64_t count = N * HW, P = partial_blocks(count), total = count * C;
  SLIMOPS_CUDA_DISPATCH(dtype, {
    const auto [partials, coeffs] = split_workspace<Sum2, BnGrad, T>(workspace, dtype, C, P);
    bn_grad_partial_kernel<T><<<dim3(unsigned(P), unsigned(C)), kThreads, 0, stream>>>(
        partials, typed<T>(grad_out), typed<T>(out), typed<T>(x), mean, C, HW, count,
        activation);
    bn_grad_finalize_kernel<T><<<grid_for(C), kThreads, 0, stream>>>(
        coeffs, typed<T>(grad_weight), typed<T>(grad_bias), partials, P, C, count, var, weight,
        eps, training);
    if (total > 0) {
      bn_grad_input_kernel<T><<<grid_for(total), kThreads, 0, stream>>>(
          typed<T>(grad_input), typed<T>(grad_out), typed<T>(out), typed<T>(x), mean, coeffs,
          total, C, HW, activation);
    }
  })
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace slimops
