// The per-element math of the slimops CUDA kernels, as __host__ __device__ functions taking raw
// pointers and strides. No CUDA runtime, no torch: under g++ SLIMOPS_HD is plain `inline`, and
// tests/test_cuda_host_harness.py runs these very functions on the CPU against
// slimops.reference. Conventions (csrc/ops.cpp): activation 0 = none, 1 = relu, 2 = relu6; the
// fused epilogue is act((z + bias) * scale + shift + residual); weights are full size and the
// channel prefix is addressed through the full tensor's strides.
#pragma once

#include <cstdint>

#include "cuda/hd.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace slimops {
namespace cuda {

enum Activation : int { kNone = 0, kRelu = 1, kRelu6 = 2 };

// ---- storage <-> accumulation types ------------------------------------------------------
// fp16/bf16 are loaded into float and every sum runs in float (double for double tensors).
// Explicit conversions, because torch's extension build defines __CUDA_NO_HALF_CONVERSIONS__.
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

template <typename Acc, typename T>
SLIMOPS_HD Acc to_acc(T v) { return static_cast<Acc>(v); }
template <typename T, typename Acc>
SLIMOPS_HD T from_acc(Acc v) { return static_cast<T>(v); }

#if defined(__CUDACC__)
template <> SLIMOPS_HD float to_acc<float, __half>(__half v) { return __half2float(v); }
template <> SLIMOPS_HD float to_acc<float, __nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <> SLIMOPS_HD __half from_acc<__half, float>(float v) { return __float2half_rn(v); }
template <> SLIMOPS_HD __nv_bfloat16 from_acc<__nv_bfloat16, float>(float v) {
  return __float2bfloat16_rn(v);
}
#endif

// An optional per-channel vector read through its stride; `fallback` when absent.
template <typename Acc, typename T>
SLIMOPS_HD Acc channel_value(const T* v, int64_t stride, int64_t c, Acc fallback) {
  return v ? to_acc<Acc>(v[c * stride]) : fallback;
}

// ---- activation ----------------------------------------------------------------------------
// NaN stays NaN, as in torch.relu / F.relu6: every select tests a comparison that is false
// for NaN and then returns v (relu was `v > 0 ? v : 0`, which turned NaN into 0).
template <typename Acc>
SLIMOPS_HD Acc activate(Acc v, int activation) {
  if (activation == kRelu) return v <= Acc(0) ? Acc(0) : v;
  if (activation == kRelu6) return v < Acc(0) ? Acc(0) : (v > Acc(6) ? Acc(6) : v);
  return v;
}

// d act / d pre from the activation's *output* (the pre-activation is not saved): relu zeroes
// where out <= 0 (torch's threshold_backward: a NaN output passes its gradient), relu6 passes
// only where 0 < out < 6 (hardtanh_backward: a NaN output gets 0); a masked gradient is
// exactly zero (as in torch), even an Inf or NaN one.
template <typename Acc>
SLIMOPS_HD Acc activation_grad(Acc grad, Acc out, int activation) {
  if (activation == kRelu) return out <= Acc(0) ? Acc(0) : grad;
  if (activation == kRelu6) return (out > Acc(0) && out < Acc(6)) ? grad : Acc(0);
  return grad;
}

// ---- fused epilogue ------------------------------------------------------------------------
// act((z + bias) * scale + shift + residual); absent terms are passed as 0 / 1 / 0 / 0.
template <typename Acc>
SLIMOPS_HD Acc epilogue(Acc z, Acc bias, Acc scale, Acc shift, Acc residual, int activation) {
  return activate<Acc>((z + bias) * scale + shift + residual, activation);
}

// grad of z from grad of the epilogue's output: grad_out * act'(out) * scale.
template <typename Acc>
SLIMOPS_HD Acc epilogue_grad(Acc grad_out, Acc out, Acc scale, int activation) {
  return activation_grad<Acc>(grad_out, out, activation) * scale;
}

// ---- batch norm ----------------------------------------------------------------------------
// Normalisation folded to one multiply-add: y = x * alpha + beta with
// alpha = weight / sqrt(var + eps), beta = bias - mean * alpha.
template <typename Acc>
struct Affine {
  Acc alpha, beta;
};

// 1 / sqrt(var + eps) in Acc (float or double): the device's rsqrt, the host's sqrt.
template <typename Acc>
SLIMOPS_HD Acc inv_std(Acc var, Acc eps) {
  constexpr bool single = sizeof(Acc) == sizeof(float);
  static_assert(single || sizeof(Acc) == sizeof(double), "Acc is float or double");
#if defined(__CUDA_ARCH__)
  if constexpr (single) return rsqrtf(var + eps);
  else return rsqrt(var + eps);
#else
  if constexpr (single) return 1.0f / __builtin_sqrtf(var + eps);
  else return 1.0 / __builtin_sqrt(var + eps);
#endif
}

template <typename Acc>
SLIMOPS_HD Affine<Acc> bn_affine(Acc mean, Acc var, Acc eps, Acc weight, Acc bias) {
  const Acc alpha = inv_std<Acc>(var, eps) * weight;
  return Affine<Acc>{alpha, bias - mean * alpha};
}

// act(bn(x) + residual).
template <typename Acc>
SLIMOPS_HD Acc bn_apply(Acc x, Affine<Acc> a, Acc residual, int activation) {
  return activate<Acc>(x * a.alpha + a.beta + residual, activation);
}

// Welford running statistics of one partial: count, mean, sum of squared deviations (M2).
// Two-stage reduction: every block reduces its share to one Stats, the finalize step combines
// the blocks' Stats in a fixed order (Chan et al.), so the result is deterministic and has no
// E[x^2] - E[x]^2 cancellation.
template <typename Acc>
struct Stats {
  Acc n, mean, m2;
};

template <typename Acc>
SLIMOPS_HD Stats<Acc> stats_empty() { return Stats<Acc>{Acc(0), Acc(0), Acc(0)}; }

template <typename Acc>
SLIMOPS_HD Stats<Acc> stats_push(Stats<Acc> s, Acc x) {
  s.n += Acc(1);
  const Acc d = x - s.mean;
  s.mean += d / s.n;
  s.m2 += d * (x - s.mean);
  return s;
}

template <typename Acc>
SLIMOPS_HD Stats<Acc> stats_combine(Stats<Acc> a, Stats<Acc> b) {
  const Acc n = a.n + b.n;
  if (n == Acc(0)) return a;
  const Acc d = b.mean - a.mean, fb = b.n / n;
  return Stats<Acc>{n, a.mean + d * fb, a.m2 + b.m2 + d * d * a.n * fb};
}

// The biased variance (what batch norm normalises with).
template <typename Acc>
SLIMOPS_HD Acc stats_var(Stats<Acc> s) { return s.n > Acc(0) ? s.m2 / s.n : Acc(0); }

// Backward of y = act(bn(x) + r) per channel, from s0 = sum(g) and s1 = sum(g * (x - mean)),
// g = grad_out * act'(out): grad_input = kg * g + kx * (x - mean) + k0 (training also
// differentiates through the batch mean and variance), grad_weight = s1 * invstd,
// grad_bias = s0.
template <typename Acc>
struct BnGrad {
  Acc kg, kx, k0, grad_weight, grad_bias;
};

template <typename Acc>
SLIMOPS_HD BnGrad<Acc> bn_backward_coeffs(Acc s0, Acc s1, Acc count, Acc var, Acc eps,
                                          Acc weight, bool training) {
  const Acc is = inv_std<Acc>(var, eps), a = weight * is;
  BnGrad<Acc> r{a, Acc(0), Acc(0), s1 * is, s0};
  if (training && count > Acc(0)) {
    r.kx = -a * is * is * s1 / count;
    r.k0 = -a * s0 / count;
  }
  return r;
}

template <typename Acc>
SLIMOPS_HD Acc bn_grad_input(BnGrad<Acc> k, Acc g, Acc x, Acc mean) {
  return k.kg * g + k.kx * (x - mean) + k.k0;
}

// ---- depthwise convolution -----------------------------------------------------------------
// Geometry of one depthwise plane: input H x W, kernel KH x KW, output OH x OW.
struct DwGeom {
  int64_t H, W, KH, KW, OH, OW;
  int64_t sh, sw, ph, pw, dh, dw;
};

// z[oh][ow] of one plane: sum over the taps of w[i][j] * x[oh*sh - ph + i*dh][ow*sw - pw + j*dw]
// (zero outside the plane). `x` is the plane's origin with row / column strides, `w` the
// channel's origin in the FULL weight with its kh / kw strides (the prefix W[:C] is read in
// place). KH_ / KW_ > 0 fix the kernel size at compile time (g.KH / g.KW must then equal
// them) so the tap loops unroll; 0 reads it from `g`.
template <typename Acc, int KH_ = 0, int KW_ = 0, typename T>
SLIMOPS_HD Acc depthwise_taps(const T* x, int64_t sxh, int64_t sxw, const T* w, int64_t swh,
                              int64_t sww, const DwGeom& g, int64_t oh, int64_t ow) {
  Acc acc = Acc(0);
  // Plane coordinates fit in 32 bits (the bindings check H, W < 2^31); only the address
  // arithmetic needs 64.
  const int KH = KH_ > 0 ? KH_ : int(g.KH), KW = KW_ > 0 ? KW_ : int(g.KW);
  const int H = int(g.H), W = int(g.W), dh = int(g.dh), dw = int(g.dw);
  const int ih0 = int(oh * g.sh - g.ph), iw0 = int(ow * g.sw - g.pw);
SLIMOPS_UNROLL
  for (int i = 0; i < KH; ++i) {
    const int ih = ih0 + i * dh;
    if (ih < 0 || ih >= H) continue;
SLIMOPS_UNROLL
    for (int j = 0; j < KW; ++j) {
      const int iw = iw0 + j * dw;
      if (iw < 0 || iw >= W) continue;
      acc += to_acc<Acc>(w[i * swh + j * sww]) * to_acc<Acc>(x[ih * sxh + iw * sxw]);
    }
  }
  return acc;
}

// grad_input[ih][iw] of one plane: the transpose of depthwise_taps, gathered (no atomics):
// the outputs (oh, ow) with oh*sh - ph + i*dh == ih, ow*sw - pw + j*dw == iw.
template <typename Acc, typename T>
SLIMOPS_HD Acc depthwise_grad_input_taps(const T* gz, int64_t sgh, int64_t sgw, const T* w,
                                         int64_t swh, int64_t sww, const DwGeom& g, int64_t ih,
                                         int64_t iw) {
  Acc acc = Acc(0);
  for (int64_t i = 0; i < g.KH; ++i) {
    const int64_t th = ih + g.ph - i * g.dh;
    if (th < 0 || th % g.sh != 0) continue;
    const int64_t oh = th / g.sh;
    if (oh >= g.OH) continue;
    for (int64_t j = 0; j < g.KW; ++j) {
      const int64_t tw = iw + g.pw - j * g.dw;
      if (tw < 0 || tw % g.sw != 0) continue;
      const int64_t ow = tw / g.sw;
      if (ow >= g.OW) continue;
      acc += to_acc<Acc>(w[i * swh + j * sww]) * to_acc<Acc>(gz[oh * sgh + ow * sgw]);
    }
  }
  return acc;
}

// One term of grad_weight[c][i][j]: gz[oh][ow] * x[oh*sh - ph + i*dh][ow*sw - pw + j*dw].
template <typename Acc, typename T>
SLIMOPS_HD Acc depthwise_weight_term(const T* gz, int64_t sgh, int64_t sgw, const T* x,
                                     int64_t sxh, int64_t sxw, const DwGeom& g, int64_t i,
                                     int64_t j, int64_t oh, int64_t ow) {
  const int64_t ih = oh * g.sh - g.ph + i * g.dh, iw = ow * g.sw - g.pw + j * g.dw;
  if (ih < 0 || ih >= g.H || iw < 0 || iw >= g.W) return Acc(0);
  return to_acc<Acc>(gz[oh * sgh + ow * sgw]) * to_acc<Acc>(x[ih * sxh + iw * sxw]);
}

}  // namespace cuda
}  // namespace slimops
