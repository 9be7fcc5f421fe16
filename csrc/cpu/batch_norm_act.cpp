// One width's batch norm (+ residual) + activation, and its backward.
//
// The input is viewed as [N, C, HW] (HW = 1 for a 2-D input). Planes of 8 positions and more
// run channel by channel in parallel: a channel's reductions (accumulated in double), then its
// elementwise pass while its planes are still in cache, the normalisation folded into one
// multiply-add per element. Tiny planes run as image rows (row_path). The
// activation is fixed at compile time so the per-element code is branch free and vectorises.
// The 1-D parameters and running stats are read through their strides, so they are never
// copied. The op is functional (torch.library autograd needs that): it returns the batch
// statistics and the caller folds them into the width's running stats.
#include "cpu/common.h"
#include "cpu/isa.h"
#include "cpu/parallel.h"

#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <cmath>
#include <memory>
#include <tuple>
#include <type_traits>
#include <vector>

namespace slimops {
namespace cpu {
namespace {

// A 1-D tensor read through its stride, `fallback` when the optional tensor is absent.
template <typename scalar_t>
struct StridedVector {
  const scalar_t* data = nullptr;
  int64_t stride = 0;
  double fallback = 0.0;

  StridedVector(const at::Tensor* t, double fallback_value) : fallback(fallback_value) {
    if (t) {
      data = t->data_ptr<scalar_t>();
      stride = t->stride(0);
    }
  }
  double get(int64_t c) const { return data ? static_cast<double>(data[c * stride]) : fallback; }
};

// The gradient where passes_gradient(out, activation), else 0, written as a select: GCC left
// grad * (0/1 mask) as branches in the element loop (no vectorisation, and
// mispredictions on the roughly half-masked data a relu produces). Like torch's threshold and
// hardtanh backward, a masked-out gradient is exactly zero.
template <typename scalar_t>
inline scalar_t mask_grad(scalar_t grad, scalar_t out, int64_t activation) {
  return passes_gradient(out, activation) ? grad : scalar_t(0);
}

// The per-plane loops (HW > 1), compiled once per instruction set (isa_variants.h).
#define SLIMOPS_ISA_INC "cpu/batch_norm_rows.inc"
#include "cpu/isa_variants.h"

template <typename scalar_t>
struct PlaneOps {
  double (*sum)(const scalar_t*, int64_t);
  double (*sq_dev)(const scalar_t*, int64_t, double);
  void (*grad_sums)(const scalar_t*, const scalar_t*, int64_t, double, double*);
  void (*affine_act)(scalar_t*, const scalar_t*, const scalar_t*, int64_t, scalar_t, scalar_t,
                     int64_t);
  void (*mask)(scalar_t*, const scalar_t*, const scalar_t*, int64_t, int64_t);
  void (*grad_input)(scalar_t*, const scalar_t*, const scalar_t*, int64_t, scalar_t, scalar_t,
                     scalar_t, scalar_t);
};

template <typename scalar_t>
PlaneOps<scalar_t> plane_ops() {
  SLIMOPS_RETURN_FOR_CPU_ISA(PlaneOps<scalar_t>{
      &isa::sum_plane<scalar_t>, &isa::sq_dev_plane<scalar_t>, &isa::grad_sums_plane<scalar_t>,
      &isa::affine_act_plane<scalar_t>, &isa::mask_plane<scalar_t>,
      &isa::grad_input_plane<scalar_t>});
}

// The small-plane row loops (batch_norm_rows.inc), chosen per instruction set like PlaneOps.
template <typename scalar_t>
struct RowOps {
  void (*sum)(double*, const scalar_t*, int64_t, int64_t, int64_t);
  void (*sq_dev)(double*, const scalar_t*, const double*, int64_t, int64_t, int64_t);
  void (*grad_sums)(double*, double*, scalar_t*, const scalar_t*, const scalar_t*,
                    const scalar_t*, const double*, int64_t, int64_t, int64_t, int64_t);
  void (*affine_act)(scalar_t*, const scalar_t*, const scalar_t*, int64_t, const scalar_t*,
                     const scalar_t*, int64_t);
  void (*grad_input)(scalar_t*, const scalar_t*, const scalar_t*, int64_t, const scalar_t*,
                     const scalar_t*, const scalar_t*, const scalar_t*);
  void (*scale)(scalar_t*, const scalar_t*, int64_t, const scalar_t*);
};

template <typename scalar_t>
RowOps<scalar_t> row_ops() {
  SLIMOPS_RETURN_FOR_CPU_ISA(RowOps<scalar_t>{
      &isa::sum_rows<scalar_t>, &isa::sq_dev_rows<scalar_t>, &isa::grad_sums_rows<scalar_t>,
      &isa::affine_act_row<scalar_t>, &isa::grad_input_row<scalar_t>,
      &isa::scale_row<scalar_t>});
}

// Small planes take the row path: per-position coefficient vectors of C*HW entries, loops
// over whole image rows. Those vectors cost O(C*HW) whatever the batch, so the row path
// needs several images per plane position: under 8 positions (2x2 planes, 2-D inputs) it
// always runs, under 48 (up to 6x6) from N * kRowPathRatio >= HW images; larger planes, and
// smaller ones with fewer images, take the per-plane loops. Measured once the per-plane
// loops summed in native-width float vectors with their tails in float (batch_norm_rows.inc,
// float_blocks): training backward against torch's batch norm + threshold backward, 2-core
// AMD EPYC (Zen 3, AVX2), one thread, row / plane path as multiples of torch's time:
//   2x2 batch 64 (64 ch) 0.07 / 0.33; batch 1 (512 ch) 0.41 / 0.44 (forward 0.89 / 1.12)
//   4x4 batch 64 (64 ch) 0.79 / 1.56; batch 8 0.71 / 0.95; batch 1 (512 ch) 1.36 / 0.95
//   5x5 batch 8 (128 ch) 0.79 / 0.95; batch 2 (256 ch) 1.03 / 0.83
//   6x6 batch 64 (32 ch) 0.65 / 0.92; batch 4 (256 ch) 1.03 / 0.89; batch 1 1.35 / 0.75
//   7x7 batch 1 / 8 (1024 ch) 1.95-2.0 / 0.80-0.83, 1.28-1.38 / 0.93-0.99; batch 64 (160 ch)
//       0.89 / 0.85
//   8x8 batch 4-64 (32-64 ch) 1.10-1.20 / 0.79-0.98
//   14x14 batch 1-64 (96-256 ch) 1.06-1.93 / 0.59-1.03
// (Before that change the per-plane loops ran 2-3x torch's time on 7x7 planes, and the row
// path took every plane under 64 positions and 14x14 from batch 7.)
constexpr int64_t kRowPathAlways = 8;
constexpr int64_t kSmallPlane = 48;
constexpr int64_t kRowPathRatio = 4;

bool row_path(int64_t N, int64_t HW) {
  return HW < kRowPathAlways || (HW < kSmallPlane && N * kRowPathRatio >= HW);
}

// Positions per column block of the row path's sums.
constexpr int64_t kColumnBlock = 512;

// A buffer of n values left uninitialised: the row path's per-position vectors (C*HW entries)
// are written whole before they are read, and std::vector's zero fill was a wasted pass over
// each (with the serial per-channel totals below, a third of the backward at batch 1 on 7x7
// planes, by perf).
template <typename T>
class Uninit {
 public:
  explicit Uninit(int64_t n = 0) : p_(n > 0 ? new T[n] : nullptr) {}
  T* data() { return p_.get(); }
  const T* data() const { return p_.get(); }

 private:
  std::unique_ptr<T[]> p_;
};

// Column sums over the N rows of an [N, R] tensor, in blocks of kColumnBlock positions (one
// task each, one writer per position): fn(j0, len, acc0, acc1) adds rows' positions
// [j0, j0 + len) into acc0 = out0 + j0 and acc1 = out1 + j0 (null if out1 is), zeroed first.
template <typename F>
void column_sums(int64_t N, int64_t R, double* out0, double* out1, const F& fn) {
  const int64_t blocks = (R + kColumnBlock - 1) / kColumnBlock;
  run_tasks(blocks, N * kColumnBlock, [&](int64_t b) {
    const int64_t j0 = b * kColumnBlock, len = std::min(kColumnBlock, R - j0);
    double* a0 = out0 + j0;
    double* a1 = out1 ? out1 + j0 : nullptr;
    std::fill(a0, a0 + len, 0.0);
    if (a1) std::fill(a1, a1 + len, 0.0);
    fn(j0, len, a0, a1);
  });
}

// Per-channel totals of per-position sums (positions c*HW .. c*HW + HW - 1), in a fixed order:
// four interleaved partial sums per channel, so the adds do not form one serial chain (a
// single chain cost ~4 cycles per position: 12% of the backward at batch 1 on 7x7 planes).
std::vector<double> per_channel(const double* pos, int64_t C, int64_t HW) {
  std::vector<double> out(C);
  for (int64_t c = 0; c < C; ++c) {
    const double* p = pos + c * HW;
    double s[4] = {0.0, 0.0, 0.0, 0.0};
    int64_t k = 0;
    for (; k + 4 <= HW; k += 4)
      for (int l = 0; l < 4; ++l) s[l] += p[k + l];
    for (; k < HW; ++k) s[k % 4] += p[k];
    out[c] = (s[0] + s[1]) + (s[2] + s[3]);
  }
  return out;
}

// v[c] repeated HW times: a per-position vector of C*HW entries.
template <typename T, typename U>
Uninit<T> expand(const std::vector<U>& v, int64_t HW) {
  Uninit<T> out(static_cast<int64_t>(v.size()) * HW);
  T* o = out.data();
  for (size_t c = 0; c < v.size(); ++c) std::fill(o + c * HW, o + (c + 1) * HW, static_cast<T>(v[c]));
  return out;
}

int64_t plane_size(const at::Tensor& t) {
  return c10::multiply_integers(t.sizes().begin() + 2, t.sizes().end());
}

// The three results of batch_norm_act and of its backward, uninitialised (the kernels write
// every element): one of x's shape and two per-channel vectors.
std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_results(const at::Tensor& x) {
  const int64_t C = x.size(1);
  return std::make_tuple(at::empty(x.sizes(), x.options()), at::empty({C}, x.options()),
                         at::empty({C}, x.options()));
}

void check_input(const at::Tensor& input, const char* op) {
  check_float(input, op, "input");
  check_batch_norm_input(input, c10::kCPU, op);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, bool training, double eps,
    const c10::optional<at::Tensor>& residual, int64_t activation) {
  constexpr const char* op = "batch_norm_act";
  check_activation(activation);
  check_input(input, op);
  check_batch_norm_act_args(op, input, weight, bias, running_mean, running_var, training, eps,
                            residual);
  const int64_t N = input.size(0), C = input.size(1), HW = plane_size(input);
  const int64_t count = N * HW;
  at::Tensor res;
  if (const at::Tensor* r = opt_ptr(residual)) res = r->contiguous();

  const at::Tensor x = input.contiguous();
  auto [out, save_mean, save_var] = empty_results(x);

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "slimops_batch_norm_act", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const StridedVector<scalar_t> w(opt_ptr(weight), 1.0), b(opt_ptr(bias), 0.0);
    const StridedVector<scalar_t> rm(opt_ptr(running_mean), 0.0), rv(opt_ptr(running_var), 0.0);
    const PlaneOps<scalar_t> ops = plane_ops<scalar_t>();

    scalar_t* mean_p = save_mean.data_ptr<scalar_t>();
    scalar_t* var_p = save_var.data_ptr<scalar_t>();
    const scalar_t* rp = res.defined() ? res.data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = out.data_ptr<scalar_t>();
    // y = act(x * alpha + beta + r): channel c's affine normalisation as one multiply-add,
    // from its statistics; saves them.
    struct Affine {
      scalar_t alpha, beta;
    };
    const auto affine = [&](int64_t c, double mean, double var) {
      const double invstd = 1.0 / std::sqrt(var + eps);
      const double a = invstd * w.get(c);
      mean_p[c] = static_cast<scalar_t>(mean);
      var_p[c] = static_cast<scalar_t>(var);
      return Affine{static_cast<scalar_t>(a), static_cast<scalar_t>(b.get(c) - mean * a)};
    };
    if (!row_path(N, HW)) {
      // The per-plane path (planes of 8 positions and more), channel by channel (one writer
      // each): training takes the planes' sums, then their squared deviations (two passes:
      // no cancellation, unlike E[x^2] - E[x]^2), and the channel's output planes follow
      // while its x is still in cache, instead of a second sweep over the whole tensor.
      watched_parallel_for(0, C, grain_for(N * HW), [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          double mean = rm.get(c), var = rv.get(c);
          if (training) {
            double total = 0.0;
            for (int64_t n = 0; n < N; ++n) total += ops.sum(xp + (n * C + c) * HW, HW);
            mean = total / count;
            double dev = 0.0;
            for (int64_t n = 0; n < N; ++n) dev += ops.sq_dev(xp + (n * C + c) * HW, HW, mean);
            var = dev / count;
          }
          const Affine k = affine(c, mean, var);
          for (int64_t n = 0; n < N; ++n) {
            const int64_t base = (n * C + c) * HW;
            ops.affine_act(yp + base, xp + base, rp ? rp + base : nullptr, HW, k.alpha, k.beta,
                           activation);
          }
        }
      });
      return;
    }
    // The row path: per-position sums over the images (column_sums), per-channel totals.
    const RowOps<scalar_t> rows = row_ops<scalar_t>();
    const int64_t R = C * HW;
    std::vector<double> mean(C), var(C);
    if (training) {
      Uninit<double> pos(R);
      column_sums(N, R, pos.data(), nullptr, [&](int64_t j0, int64_t len, double* a, double*) {
        rows.sum(a, xp + j0, N, R, len);
      });
      mean = per_channel(pos.data(), C, HW);
      for (int64_t c = 0; c < C; ++c) mean[c] /= count;
      const Uninit<double> mean_pos = expand<double>(mean, HW);
      column_sums(N, R, pos.data(), nullptr, [&](int64_t j0, int64_t len, double* a, double*) {
        rows.sq_dev(a, xp + j0, mean_pos.data() + j0, N, R, len);
      });
      var = per_channel(pos.data(), C, HW);
      for (int64_t c = 0; c < C; ++c) var[c] /= count;
    } else {
      for (int64_t c = 0; c < C; ++c) {
        mean[c] = rm.get(c);
        var[c] = rv.get(c);
      }
    }
    std::vector<scalar_t> alpha(C), beta(C);
    for (int64_t c = 0; c < C; ++c) {
      const Affine k = affine(c, mean[c], var[c]);
      alpha[c] = k.alpha;
      beta[c] = k.beta;
    }
    const Uninit<scalar_t> a_pos = expand<scalar_t>(alpha, HW), b_pos = expand<scalar_t>(beta, HW);
    run_ranges(N, R, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n)
        rows.affine_act(yp + n * R, xp + n * R, rp ? rp + n * R : nullptr, R, a_pos.data(),
                        b_pos.data(), activation);
    });
  });
  return std::make_tuple(out, save_mean, save_var);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_backward(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& out,
    const c10::optional<at::Tensor>& weight, const at::Tensor& save_mean,
    const at::Tensor& save_var, double eps, bool training, int64_t activation) {
  constexpr const char* op = "batch_norm_act_backward";
  check_activation(activation);
  check_input(input, op);
  check_batch_norm_act_backward_args(op, input, grad_out, out, weight, save_mean, save_var,
                                     eps);
  const int64_t N = input.size(0), C = input.size(1), HW = plane_size(input);
  const int64_t count = N * HW;

  const at::Tensor x = input.contiguous();
  const at::Tensor go = grad_out.contiguous();
  const at::Tensor y = out.contiguous();
  auto [grad_input, grad_weight, grad_bias] = empty_results(x);

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "slimops_batch_norm_act_backward", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gop = go.data_ptr<scalar_t>();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    scalar_t* gip = grad_input.data_ptr<scalar_t>();
    const StridedVector<scalar_t> w(opt_ptr(weight), 1.0);
    const StridedVector<scalar_t> saved_mean(&save_mean, 0.0), saved_var(&save_var, 0.0);
    std::vector<double> mean(C);
    std::vector<scalar_t> mean_s(C);
    for (int64_t c = 0; c < C; ++c) {
      mean[c] = saved_mean.get(c);
      mean_s[c] = static_cast<scalar_t>(mean[c]);
    }
    const scalar_t* mp = mean_s.data();

    // g = grad_out * act'(out), kept in grad_input: computed on its own the masking vectorises
    // (inside the double-precision sums it would not), and the later passes read g instead of
    // both grad_out and out. With no activation g is grad_out itself: nothing is stored, and
    // the passes read grad_out (the residual layers' case: their autograd masks first).
    const bool masked = activation != kNone;
    const scalar_t* gp = masked ? gip : gop;
    scalar_t* gwp = grad_weight.data_ptr<scalar_t>();
    scalar_t* gbp = grad_bias.data_ptr<scalar_t>();
    // grad_input = k_g[c] * g + k_x[c] * (x - mean[c]) + k_0[c]; training also differentiates
    // through the batch mean and variance (k_x, k_0). From channel c's two sums, sum(g) and
    // sum(g * (x - mean)); writes its weight and bias gradients.
    struct Coefficients {
      scalar_t g, x, zero;
    };
    const auto coefficients = [&](int64_t c, double sum_g, double sum_gx) {
      const double is = 1.0 / std::sqrt(saved_var.get(c) + eps), a = w.get(c) * is;
      gwp[c] = static_cast<scalar_t>(sum_gx * is);
      gbp[c] = static_cast<scalar_t>(sum_g);
      Coefficients k{static_cast<scalar_t>(a), scalar_t(0), scalar_t(0)};
      if (training && count > 0) {
        k.x = static_cast<scalar_t>(-a * is * is * sum_gx / count);
        k.zero = static_cast<scalar_t>(-a * sum_g / count);
      }
      return k;
    };
    const PlaneOps<scalar_t> ops = plane_ops<scalar_t>();
    const int64_t R = C * HW;
    if (!row_path(N, HW)) {
      // The per-plane path (planes of 8 positions and more), channel by channel (one writer
      // each): mask each plane and take its two sums while it is hot; the channel's sums
      // then complete, its gradient planes follow while its g and x are still in cache.
      // Two sweeps over the whole tensor (sums, then gradients) read g and x from memory
      // twice: 8 x 96 x 112 x 112 took 8.0-9.9 ms that way, 5.5-6.3 ms this way; 8 x 144 x
      // 56 x 56 2.4-3.4 -> 1.7-2.2 ms (2-core AMD EPYC Zen 3, AVX2, 2 threads).
      watched_parallel_for(0, C, grain_for(N * HW), [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          double s[2] = {0.0, 0.0};
          for (int64_t n = 0; n < N; ++n) {
            const int64_t base = (n * C + c) * HW;
            if (masked) ops.mask(gip + base, gop + base, yp + base, HW, activation);
            ops.grad_sums(gp + base, xp + base, HW, mean[c], s);
          }
          const Coefficients k = coefficients(c, s[0], s[1]);
          for (int64_t n = 0; n < N; ++n) {
            const int64_t base = (n * C + c) * HW;
            if (training) {
              ops.grad_input(gip + base, gp + base, xp + base, HW, k.g, k.x, mp[c], k.zero);
            } else {
              scalar_t* gi = gip + base;
              const scalar_t* g = gp + base;
              for (int64_t i = 0; i < HW; ++i) gi[i] = k.g * g[i];
            }
          }
        }
      });
      return;
    }
    // The row path: per-position sums over the images (column_sums), then per-channel totals.
    const RowOps<scalar_t> rows = row_ops<scalar_t>();
    const Uninit<double> mean_pos = expand<double>(mean, HW);
    Uninit<double> pos0(R), pos1(R);
    column_sums(N, R, pos0.data(), pos1.data(), [&](int64_t j0, int64_t len, double* a0,
                                                    double* a1) {
      rows.grad_sums(a0, a1, gip + j0, gop + j0, yp + j0, xp + j0, mean_pos.data() + j0, N, R,
                     len, activation);
    });
    const std::vector<double> sum_g = per_channel(pos0.data(), C, HW);
    const std::vector<double> sum_gx = per_channel(pos1.data(), C, HW);
    std::vector<scalar_t> k_g(C), k_x(C), k_0(C);
    for (int64_t c = 0; c < C; ++c) {
      const Coefficients k = coefficients(c, sum_g[c], sum_gx[c]);
      k_g[c] = k.g;
      k_x[c] = k.x;
      k_0[c] = k.zero;
    }
    Uninit<scalar_t> kg_pos = expand<scalar_t>(k_g, HW), kx_pos, k0_pos, m_pos;
    if (training) {
      kx_pos = expand<scalar_t>(k_x, HW);
      k0_pos = expand<scalar_t>(k_0, HW);
      m_pos = expand<scalar_t>(mean_s, HW);
    }
    run_ranges(N, R, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        if (training) {
          rows.grad_input(gip + n * R, gp + n * R, xp + n * R, R, kg_pos.data(), kx_pos.data(),
                          m_pos.data(), k0_pos.data());
        } else {
          rows.scale(gip + n * R, gp + n * R, R, kg_pos.data());
        }
      }
    });
  });
  return std::make_tuple(grad_input, grad_weight, grad_bias);
}

// running = (1 - momentum) * running + momentum * batch, the batch variance unbiased
// (var * count / (count - 1)): ATen's batch norm update, in the statistics' dtype. One call
// for both vectors; the three aten ops it replaces (lerp_, mul_, add_, each wrapping its
// Python scalar) cost ~15 us per BN layer and width of a training step on small planes.
// The autograd kernel (csrc/autograd/batch_norm_act.cpp) bumps the version counters.
void update_running_stats(at::Tensor& running_mean, at::Tensor& running_var,
                          const at::Tensor& mean, const at::Tensor& var, int64_t count,
                          double momentum) {
  constexpr const char* op = "update_running_stats";
  check_float(running_mean, op, "running_mean");
  const int64_t C = running_mean.numel();
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{running_var, "running_var"},
                                {mean, "mean"}, {var, "var"}}) {
    TORCH_CHECK(t.scalar_type() == running_mean.scalar_type(), "slimops::", op, ": ", name,
                " is ", t.scalar_type(), ", running_mean ", running_mean.scalar_type());
    TORCH_CHECK(t.device().is_cpu(), "slimops::", op, ": ", name, " is on ", t.device());
    TORCH_CHECK(t.dim() == 1 && t.numel() == C, "slimops::", op, ": ", name,
                " must be a vector of running_mean's ", C, " values, got shape ", t.sizes());
  }
  TORCH_CHECK(running_mean.dim() == 1, "slimops::", op,
              ": running_mean must be a vector, got shape ", running_mean.sizes());
  TORCH_CHECK(count > 1, "slimops::", op, ": count must be above 1 (the unbiased variance "
              "divides by count - 1), got ", count);
  AT_DISPATCH_FLOATING_TYPES(running_mean.scalar_type(), op, [&] {
    scalar_t* rm = running_mean.data_ptr<scalar_t>();
    scalar_t* rv = running_var.data_ptr<scalar_t>();
    const scalar_t* m = mean.data_ptr<scalar_t>();
    const scalar_t* v = var.data_ptr<scalar_t>();
    const int64_t srm = running_mean.stride(0), srv = running_var.stride(0),
                  sm = mean.stride(0), sv = var.stride(0);
    const scalar_t a = static_cast<scalar_t>(momentum), b = static_cast<scalar_t>(1.0 - momentum);
    const scalar_t unbias = static_cast<scalar_t>(static_cast<double>(count) / (count - 1));
    for (int64_t c = 0; c < C; ++c) {
      rm[c * srm] = a * m[c * sm] + b * rm[c * srm];
      rv[c * srv] = a * (v[c * sv] * unbias) + b * rv[c * srv];
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(slimops, CPU, m) {
  SLIMOPS_CPU_IMPL("batch_norm_act", batch_norm_act);
  SLIMOPS_CPU_IMPL("batch_norm_act_backward", batch_norm_act_backward);
  SLIMOPS_CPU_IMPL("update_running_stats", update_running_stats);
}

}  // namespace cpu
}  // namespace slimops
