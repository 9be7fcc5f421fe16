// Host harness: the CUDA kernels' per-element math (epilogue_math.cuh), compiled by the host
// compiler (SLIMOPS_HD is plain `inline` there) into a shared library with extern "C" entry
// points over float buffers. tests/test_cuda_host_harness.py builds it with g++ and compares
// every function with slimops.reference / torch, so the math the GPU runs is checked on a
// machine without a GPU. The loops here mirror the kernels' index decompositions.
#include <cstdint>
#include <vector>

#include "cuda/epilogue_math.cuh"

using namespace slimops::cuda;

// Per-channel batch statistics of a contiguous [N, C, HW] x, reduced as the kernels do: the
// channel's N * HW elements dealt round-robin to `P` x `threads` Welford accumulators
// (threads a power of two), a tree combine per block, then the P partials in order. The
// statistics are in the accumulation type, as bn_finalize_kernel stores them (float for
// float / __half / __nv_bfloat16, double for double).
template <typename T>
static void bn_stats(typename AccOf<T>::type* mean, typename AccOf<T>::type* var, const T* x,
                     int64_t N, int64_t C, int64_t HW, int64_t P, int64_t threads) {
  using Acc = typename AccOf<T>::type;
  const int64_t count = N * HW;
  std::vector<Stats<Acc>> acc(threads);
  for (int64_t c = 0; c < C; ++c) {
    Stats<Acc> total = stats_empty<Acc>();
    for (int64_t p = 0; p < P; ++p) {
      for (int64_t t = 0; t < threads; ++t) {
        Stats<Acc> s = stats_empty<Acc>();
        for (int64_t i = p * threads + t; i < count; i += P * threads) {
          const int64_t n = i / HW;
          s = stats_push<Acc>(s, to_acc<Acc>(x[(n * C + c) * HW + (i - n * HW)]));
        }
        acc[t] = s;
      }
      for (int64_t s = threads / 2; s > 0; s >>= 1)
        for (int64_t t = 0; t < s; ++t) acc[t] = stats_combine<Acc>(acc[t], acc[t + s]);
      total = p == 0 ? acc[0] : stats_combine<Acc>(total, acc[0]);
    }
    mean[c] = total.mean;
    var[c] = stats_var<Acc>(total);
  }
}

extern "C" {

// y[i] = act(x[i]); on the same buffers, dx[i] = act'(out[i]) * g[i].
void slimops_h_activate(const float* x, float* y, int64_t n, int activation) {
  for (int64_t i = 0; i < n; ++i) y[i] = activate<float>(x[i], activation);
}

void slimops_h_activation_grad(const float* grad, const float* out, float* dx, int64_t n,
                               int activation) {
  for (int64_t i = 0; i < n; ++i) dx[i] = activation_grad<float>(grad[i], out[i], activation);
}

// The epilogue on a contiguous [N, C, HW] z, as epilogue_forward_kernel indexes it; null
// vectors are absent terms, vectors are read with the given stride.
void slimops_h_epilogue(float* out, const float* z, int64_t N, int64_t C, int64_t HW,
                        const float* bias, int64_t bs, const float* scale, int64_t ss,
                        const float* shift, int64_t shs, const float* residual, int activation) {
  const int64_t total = N * C * HW;
  for (int64_t idx = 0; idx < total; ++idx) {
    const int64_t c = (idx / HW) % C;
    const float r = residual ? residual[idx] : 0.0f;
    out[idx] = epilogue<float>(z[idx], channel_value<float>(bias, bs, c, 0.0f),
                               channel_value<float>(scale, ss, c, 1.0f),
                               channel_value<float>(shift, shs, c, 0.0f), r, activation);
  }
}

void slimops_h_epilogue_backward(float* grad_z, const float* grad_out, const float* out,
                                 int64_t N, int64_t C, int64_t HW, const float* scale,
                                 int64_t ss, int activation) {
  const int64_t total = N * C * HW;
  for (int64_t idx = 0; idx < total; ++idx) {
    const int64_t c = (idx / HW) % C;
    grad_z[idx] = epilogue_grad<float>(grad_out[idx], out[idx],
                                       channel_value<float>(scale, ss, c, 1.0f), activation);
  }
}

// act(bn(x) + residual) from given mean / var (the eval path, or training after the stats).
void slimops_h_bn_apply(float* out, const float* x, int64_t N, int64_t C, int64_t HW,
                        const float* mean, const float* var, const float* weight,
                        const float* bias, float eps, const float* residual, int activation) {
  std::vector<Affine<float>> aff(C);
  for (int64_t c = 0; c < C; ++c)
    aff[c] = bn_affine<float>(mean[c], var[c], eps, channel_value<float>(weight, 1, c, 1.0f),
                              channel_value<float>(bias, 1, c, 0.0f));
  const int64_t total = N * C * HW;
  for (int64_t idx = 0; idx < total; ++idx) {
    const int64_t c = (idx / HW) % C;
    out[idx] = bn_apply<float>(x[idx], aff[c], residual ? residual[idx] : 0.0f, activation);
  }
}

// bn_stats on a float x.
void slimops_h_bn_stats(float* mean, float* var, const float* x, int64_t N, int64_t C,
                        int64_t HW, int64_t P, int64_t threads) {
  bn_stats<float>(mean, var, x, N, C, HW, P, threads);
}

// batch_norm_act_backward from grad_out, x, out and the statistics used.
void slimops_h_bn_backward(float* grad_input, float* grad_weight, float* grad_bias,
                           const float* grad_out, const float* x, const float* out, int64_t N,
                           int64_t C, int64_t HW, const float* weight, const float* mean,
                           const float* var, float eps, int training, int activation) {
  const int64_t count = N * HW;
  std::vector<BnGrad<float>> k(C);
  for (int64_t c = 0; c < C; ++c) {
    float s0 = 0.0f, s1 = 0.0f;
    for (int64_t i = 0; i < count; ++i) {
      const int64_t n = i / HW, o = (n * C + c) * HW + (i - n * HW);
      const float g = activation_grad<float>(grad_out[o], out[o], activation);
      s0 += g;
      s1 += g * (x[o] - mean[c]);
    }
    k[c] = bn_backward_coeffs<float>(s0, s1, float(count), var[c], eps,
                                     channel_value<float>(weight, 1, c, 1.0f), training != 0);
    grad_weight[c] = k[c].grad_weight;
    grad_bias[c] = k[c].grad_bias;
  }
  for (int64_t idx = 0; idx < N * C * HW; ++idx) {
    const int64_t c = (idx / HW) % C;
    const float g = activation_grad<float>(grad_out[idx], out[idx], activation);
    grad_input[idx] = bn_grad_input<float>(k[c], g, x[idx], mean[c]);
  }
}

// geom = {H, W, KH, KW, OH, OW, sh, sw, ph, pw, dh, dw}; strides in elements.
static DwGeom geom_of(const int64_t* g) {
  return DwGeom{g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8], g[9], g[10], g[11]};
}

}  // extern "C"

// The depthwise forward with epilogue, indexed as depthwise_forward_kernel: `w` is the FULL
// weight (only rows [0, C) are read, through ws); x strided; out contiguous [N, C, OH, OW].
template <typename T>
static void depthwise_forward(T* out, const T* x, const int64_t* xs, const T* w,
                              const int64_t* ws, int64_t N, int64_t C, const int64_t* geom,
                              const T* bias, const T* scale, const T* shift, const T* residual,
                              int activation) {
  using Acc = typename AccOf<T>::type;
  const DwGeom g = geom_of(geom);
  const int64_t total = N * C * g.OH * g.OW;
  for (int64_t idx = 0; idx < total; ++idx) {
    const int64_t ow = idx % g.OW;
    int64_t t = idx / g.OW;
    const int64_t oh = t % g.OH;
    t /= g.OH;
    const int64_t c = t % C, n = t / C;
    const T* xc = x + n * xs[0] + c * xs[1];
    const T* wc = w + c * ws[0];
    // The kernel's compile-time kernel sizes, as its launch wrapper dispatches them.
    const Acc z =
        g.KH == 3 && g.KW == 3 ? depthwise_taps<Acc, 3, 3>(xc, xs[2], xs[3], wc, ws[2], ws[3], g, oh, ow)
        : g.KH == 5 && g.KW == 5
            ? depthwise_taps<Acc, 5, 5>(xc, xs[2], xs[3], wc, ws[2], ws[3], g, oh, ow)
            : depthwise_taps<Acc>(xc, xs[2], xs[3], wc, ws[2], ws[3], g, oh, ow);
    out[idx] = from_acc<T>(epilogue<Acc>(z, channel_value<Acc>(bias, 1, c, Acc(0)),
                                         channel_value<Acc>(scale, 1, c, Acc(1)),
                                         channel_value<Acc>(shift, 1, c, Acc(0)),
                                         residual ? to_acc<Acc>(residual[idx]) : Acc(0),
                                         activation));
  }
}

extern "C" {

void slimops_h_depthwise_forward(float* out, const float* x, const int64_t* xs, const float* w,
                                 const int64_t* ws, int64_t N, int64_t C, const int64_t* geom,
                                 const float* bias, const float* scale, const float* shift,
                                 const float* residual, int activation) {
  depthwise_forward<float>(out, x, xs, w, ws, N, C, geom, bias, scale, shift, residual,
                           activation);
}

// grad_input contiguous [N, C, H, W] from a contiguous grad_z.
void slimops_h_depthwise_backward_input(float* grad_input, const float* grad_z, const float* w,
                                        const int64_t* ws, int64_t N, int64_t C,
                                        const int64_t* geom) {
  const DwGeom g = geom_of(geom);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t ih = 0; ih < g.H; ++ih)
        for (int64_t iw = 0; iw < g.W; ++iw)
          grad_input[((n * C + c) * g.H + ih) * g.W + iw] = depthwise_grad_input_taps<float>(
              grad_z + (n * C + c) * g.OH * g.OW, g.OW, 1, w + c * ws[0], ws[2], ws[3], g, ih,
              iw);
}

// grad_weight rows [0, C) of a full, contiguous [C_full, 1, KH, KW] buffer (the rest is left
// as the caller filled it), from contiguous grad_z and x.
void slimops_h_depthwise_backward_weight(float* grad_weight, const float* grad_z, const float* x,
                                         int64_t N, int64_t C, const int64_t* geom) {
  const DwGeom g = geom_of(geom);
  for (int64_t c = 0; c < C; ++c)
    for (int64_t i = 0; i < g.KH; ++i)
      for (int64_t j = 0; j < g.KW; ++j) {
        float acc = 0.0f;
        for (int64_t n = 0; n < N; ++n)
          for (int64_t oh = 0; oh < g.OH; ++oh)
            for (int64_t ow = 0; ow < g.OW; ++ow)
              acc += depthwise_weight_term<float>(grad_z + (n * C + c) * g.OH * g.OW, g.OW, 1,
                                                  x + (n * C + c) * g.H * g.W, g.W, 1, g, i, j,
                                                  oh, ow);
        grad_weight[(c * g.KH + i) * g.KW + j] = acc;
      }
}

}  // extern "C"

#if defined(__CUDACC__)
// Built by nvcc as host code (tests/test_cuda_host_harness.py, when nvcc is present): the
// fp16 / bf16 paths, i.e. the __half / __nv_bfloat16 specialisations of to_acc / from_acc
// that torch's build flags (no implicit half conversions) make the kernels use. 16-bit
// buffers are passed as raw uint16 storage.
extern "C" {

int slimops_h_has_half() { return 1; }

void slimops_h_round(const float* x, float* y, int64_t n, int bf16) {
  for (int64_t i = 0; i < n; ++i)
    y[i] = bf16 ? to_acc<float>(from_acc<__nv_bfloat16>(x[i])) : to_acc<float>(from_acc<__half>(x[i]));
}

// bn_stats on a 16-bit x: float32 mean / var, as the forward returns them for a float16 /
// bfloat16 input.
void slimops_h_bn_stats_16(float* mean, float* var, const void* x, int64_t N, int64_t C,
                           int64_t HW, int64_t P, int64_t threads, int bf16) {
  if (bf16)
    bn_stats<__nv_bfloat16>(mean, var, static_cast<const __nv_bfloat16*>(x), N, C, HW, P,
                            threads);
  else
    bn_stats<__half>(mean, var, static_cast<const __half*>(x), N, C, HW, P, threads);
}

void slimops_h_depthwise_forward_16(void* out, const void* x, const int64_t* xs, const void* w,
                                    const int64_t* ws, int64_t N, int64_t C,
                                    const int64_t* geom, const void* bias, const void* scale,
                                    const void* shift, const void* residual, int activation,
                                    int bf16) {
  if (bf16) {
    using T = __nv_bfloat16;
    depthwise_forward<T>(static_cast<T*>(out), static_cast<const T*>(x), xs,
                         static_cast<const T*>(w), ws, N, C, geom, static_cast<const T*>(bias),
                         static_cast<const T*>(scale), static_cast<const T*>(shift),
                         static_cast<const T*>(residual), activation);
  } else {
    using T = __half;
    depthwise_forward<T>(static_cast<T*>(out), static_cast<const T*>(x), xs,
                         static_cast<const T*>(w), ws, N, C, geom, static_cast<const T*>(bias),
                         static_cast<const T*>(scale), static_cast<const T*>(shift),
                         static_cast<const T*>(residual), activation);
  }
}

}  // extern "C"
#endif
