// Backward of the fused epilogue: grad_z = grad_out * act'(out) * scale[c]; and the forward
// epilogue's row loop per instruction set (epilogue_rows.h).
#include "cpu/epilogue_rows.h"

#include "cpu/common.h"
#include "cpu/isa.h"
#include "cpu/parallel.h"

#include <torch/library.h>

#include <algorithm>
#include <type_traits>

namespace slimops {
namespace cpu {
namespace {

// grad * s where the activation passes the gradient (read from its output), else exactly 0 (a
// select, not a multiply by a 0/1 mask: a NaN or Inf gradient where the activation is flat
// gives 0, as torch's threshold_backward and hardtanh_backward do). The operands arrive
// loaded, so the compiler can turn the select into a vector blend; written as
// `mask(out) ? grad[i] : 0` the load itself was conditional and the loop stayed a branch per
// element (measured 4 ns per element, 40x threshold_backward on half-masked data).
template <int64_t ACT, typename scalar_t>
inline scalar_t select_grad(scalar_t grad, scalar_t out, scalar_t s) {
  const scalar_t v = grad * s;
  return passes_gradient(out, ACT) ? v : scalar_t(0);
}

at::Tensor epilogue_backward(const at::Tensor& grad_out, const at::Tensor& out,
                             const c10::optional<at::Tensor>& scale, int64_t activation) {
  check_activation(activation);
  check_float(out, "epilogue_backward", "out");
  check_epilogue_backward_args("epilogue_backward", grad_out, out, scale);
  const int64_t N = out.size(0), C = out.size(1);
  const at::Tensor g = grad_out.contiguous();
  const at::Tensor o = out.contiguous();
  at::Tensor result = at::empty(o.sizes(), o.options());
  const int64_t HW = N * C == 0 ? 0 : o.numel() / (N * C);
  AT_DISPATCH_FLOATING_TYPES(o.scalar_type(), "slimops_epilogue_backward", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* op = o.data_ptr<scalar_t>();
    // scale is read through its stride: it may be a view (e.g. of a BN parameter).
    const at::Tensor* sc = opt_ptr(scale);
    const scalar_t* sp = sc ? sc->data_ptr<scalar_t>() : nullptr;
    const int64_t ss = sc ? sc->stride(0) : 0;
    scalar_t* rp = result.data_ptr<scalar_t>();
    const auto rows = [&](auto act) {
      constexpr int64_t ACT = decltype(act)::value;
      if (!sp) {
        // No per-channel scale: one flat pass (per-channel rows of a small plane, 2x2 say,
        // would cost a loop setup per 4 elements).
        const int64_t total = N * C * HW;
        constexpr int64_t kChunk = 4096;
        run_ranges((total + kChunk - 1) / kChunk, kChunk, [&](int64_t begin, int64_t end) {
          const int64_t i0 = begin * kChunk, i1 = std::min(total, end * kChunk);
          const scalar_t* __restrict__ g = gp;
          const scalar_t* __restrict__ o = op;
          scalar_t* __restrict__ r = rp;
          for (int64_t i = i0; i < i1; ++i) r[i] = select_grad<ACT>(g[i], o[i], scalar_t(1));
        });
        return;
      }
      run_ranges(N * C, HW, [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          const scalar_t s = sp ? sp[(row % C) * ss] : scalar_t(1);
          const scalar_t* __restrict__ g_row = gp + row * HW;
          const scalar_t* __restrict__ o_row = op + row * HW;
          scalar_t* __restrict__ r_row = rp + row * HW;
          for (int64_t i = 0; i < HW; ++i) r_row[i] = select_grad<ACT>(g_row[i], o_row[i], s);
        }
      });
    };
    if (activation == kRelu) rows(std::integral_constant<int64_t, kRelu>());
    else if (activation == kRelu6) rows(std::integral_constant<int64_t, kRelu6>());
    else rows(std::integral_constant<int64_t, kNone>());
  });
  return result;
}

// The forward epilogue's row loop, compiled once per instruction set (epilogue_rows.h).
#define SLIMOPS_ISA_INC "cpu/epilogue_rows.inc"
#include "cpu/isa_variants.h"

}  // namespace

template <typename scalar_t>
EpilogueRows<scalar_t> epilogue_rows_for_cpu() {
  SLIMOPS_RETURN_FOR_CPU_ISA(&isa::epilogue_rows<scalar_t>);
}
template EpilogueRows<float> epilogue_rows_for_cpu<float>();
template EpilogueRows<double> epilogue_rows_for_cpu<double>();

template <typename scalar_t>
void epilogue_planes(scalar_t* out, int64_t n, int64_t c, int64_t p, const scalar_t* scale,
                     const scalar_t* shift, const scalar_t* residual, int64_t activation) {
  const EpilogueRows<scalar_t> epilogue = epilogue_rows_for_cpu<scalar_t>();
  run_ranges(n * c, p, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t k = row % c;
      epilogue(out + row * p, p, 1, p, scale + k, shift + k,
               residual ? residual + row * p : nullptr, activation);
    }
  });
}
template void epilogue_planes<float>(float*, int64_t, int64_t, int64_t, const float*,
                                     const float*, const float*, int64_t);
template void epilogue_planes<double>(double*, int64_t, int64_t, int64_t, const double*,
                                      const double*, const double*, int64_t);

TORCH_LIBRARY_IMPL(slimops, CPU, m) {
  SLIMOPS_CPU_IMPL("epilogue_backward", epilogue_backward);
}

}  // namespace cpu
}  // namespace slimops
