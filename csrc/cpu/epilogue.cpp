// Backward of the fused epilogue: grad_z = grad_out * act'(out) * scale[c].
#include "cpu/common.h"

#include <torch/library.h>

namespace slimops {
namespace cpu {
namespace {

at::Tensor epilogue_backward(const at::Tensor& grad_out, const at::Tensor& out,
                             const c10::optional<at::Tensor>& scale, int64_t activation) {
  check_activation(activation);
  check_float(out, "epilogue_backward", "out");
  check_same(grad_out, out, "epilogue_backward", "grad_out");
  TORCH_CHECK(grad_out.sizes() == out.sizes(), "slimops::epilogue_backward: grad_out shape ",
              grad_out.sizes(), " differs from out shape ", out.sizes());
  TORCH_CHECK(out.dim() >= 2, "slimops::epilogue_backward: expected at least 2 dims, got ",
              out.sizes());
  const int64_t N = out.size(0), C = out.size(1);
  check_vector(scale, C, out, "epilogue_backward", "scale");
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
    at::parallel_for(0, N * C, grain_for(HW), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const scalar_t s = sp ? sp[(row % C) * ss] : scalar_t(1);
        const int64_t base = row * HW;
        for (int64_t i = 0; i < HW; ++i)
          rp[base + i] = gp[base + i] * activation_mask<scalar_t>(op[base + i], activation) * s;
      }
    });
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(slimops, CPU, m) { m.impl("epilogue_backward", &epilogue_backward); }

}  // namespace cpu
}  // namespace slimops
