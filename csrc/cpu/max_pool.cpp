// Max pooling of an NCHW batch for inference (see max_pool.h for why).
#include "cpu/max_pool.h"

#include "checked_size.h"
#include "cpu/isa.h"
#include "cpu/parallel.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

namespace slimops {
namespace cpu {

#define SLIMOPS_ISA_INC "cpu/max_pool_rows.inc"
#include "cpu/isa_variants.h"

namespace {

template <typename scalar_t>
struct MaxPoolRows {
  void (*row)(const scalar_t* const*, int64_t, int64_t, const int64_t*, scalar_t*, int64_t);
  void (*field_row)(const scalar_t*, int64_t, int64_t, int64_t, int64_t, scalar_t*);
  int64_t lanes;  // outputs per vector of `row`
};

template <typename scalar_t>
const MaxPoolRows<scalar_t>& rows_for_cpu() {
  static const MaxPoolRows<scalar_t> rows = []() -> MaxPoolRows<scalar_t> {
    SLIMOPS_RETURN_FOR_CPU_ISA(MaxPoolRows<scalar_t>{
        &isa::max_pool_row<scalar_t>, &isa::max_pool_field_row<scalar_t>,
        isa::pool_lanes<scalar_t>()});
  }();
  return rows;
}

// floor(a / b) for b > 0 (PyTorch's div_rtn).
int64_t floor_div(int64_t a, int64_t b) { return a / b - (a % b != 0 && a < 0 ? 1 : 0); }

// PyTorch's pooling output size (pooling_output_shape), checked: in ceil mode the last window
// must start inside the padded input's left part.
int64_t pooled_size(int64_t in, int64_t k, int64_t s, int64_t p, int64_t d, bool ceil_mode,
                    const char* side) {
  TORCH_CHECK(k > 0 && s > 0 && d > 0, "slimops max_pool2d: kernel, stride and dilation must "
              "be positive, got ", k, ", ", s, ", ", d, " (", side, ")");
  TORCH_CHECK(p >= 0 && p <= k / 2, "slimops max_pool2d: padding ", p, " must be between 0 "
              "and half the kernel ", k, " (", side, ")");
  TORCH_CHECK(in <= (int64_t{1} << 40) && k <= (int64_t{1} << 20) && s <= (int64_t{1} << 20) &&
                  d <= (int64_t{1} << 20), "slimops max_pool2d: sizes out of range (", side, ")");
  int64_t out = floor_div(in + 2 * p - d * (k - 1) - 1 + (ceil_mode ? s - 1 : 0), s) + 1;
  if (ceil_mode && (out - 1) * s >= in + p) --out;
  TORCH_CHECK(out >= 1, "slimops max_pool2d: the output would be empty (", side, ": input ", in,
              ", kernel ", k, ", stride ", s, ", padding ", p, ", dilation ", d, ")");
  return out;
}

}  // namespace

at::Tensor max_pool2d_nchw(const at::Tensor& input, int64_t kh, int64_t kw, int64_t sh,
                           int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw,
                           bool ceil_mode) {
  TORCH_CHECK(input.dim() == 4 && input.is_cpu() && input.is_contiguous(),
              "slimops max_pool2d: expected a contiguous 4-D NCHW CPU tensor, got ",
              input.sizes(), " with strides ", input.strides());
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble,
              "slimops max_pool2d: float32 and float64 only, got ", input.scalar_type());
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  TORCH_CHECK(H > 0 && W > 0, "slimops max_pool2d: empty plane ", input.sizes());
  const int64_t Ho = pooled_size(H, kh, sh, ph, dh, ceil_mode, "height");
  const int64_t Wo = pooled_size(W, kw, sw, pw, dw, ceil_mode, "width");
  at::Tensor out = at::empty({N, C, Ho, Wo}, input.options());
  const int64_t planes = N * C;
  if (planes == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "slimops_max_pool2d", [&] {
    const MaxPoolRows<scalar_t>& fn = rows_for_cpu<scalar_t>();
    // Slots per phase of a field row: every input column, and every slot a tap reads for a
    // whole vector of outputs (fn.row rounds the output row up to whole vectors; the last
    // window's last tap may lie past the right padding in ceil mode).
    const int64_t lq = std::max((W + pw + sw - 1) / sw,
                                (Wo + fn.lanes - 1) / fn.lanes * fn.lanes + ((kw - 1) * dw) / sw);
    const int64_t field_row = checked_mul(sw, lq, "max_pool2d", "a field row");
    const int64_t field_size = checked_mul(H, field_row, "max_pool2d", "a plane's field");
    // Per plane: its field, and a compare per output and tap.
    const int64_t work = field_size + checked_mul(checked_mul(Ho, Wo, "max_pool2d", "the output"),
                                                  kh * kw, "max_pool2d", "the taps");
    // Where tap column j of output column 0 lies in a field row (phase, then slot).
    std::vector<int64_t> taps(static_cast<size_t>(kw));
    for (int64_t j = 0; j < kw; ++j) taps[j] = ((j * dw) % sw) * lq + (j * dw) / sw;
    const scalar_t* in = input.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    run_ranges(planes, work, [&](int64_t p0, int64_t p1) {
      scalar_t* field = scratch<scalar_t>(ScratchSlot::kPoolField, field_size);
      std::vector<const scalar_t*> rows(static_cast<size_t>(kh));
      for (int64_t p = p0; p < p1; ++p) {
        const scalar_t* plane = in + p * H * W;
        for (int64_t ih = 0; ih < H; ++ih)
          fn.field_row(plane + ih * W, W, pw, sw, lq, field + ih * field_row);
        for (int64_t oh = 0; oh < Ho; ++oh) {
          for (int64_t i = 0; i < kh; ++i) {
            const int64_t ih = oh * sh - ph + i * dh;
            rows[i] = ih >= 0 && ih < H ? field + ih * field_row : nullptr;
          }
          fn.row(rows.data(), kh, kw, taps.data(), o + (p * Ho + oh) * Wo, Wo);
        }
      }
    });
  });
  return out;
}

}  // namespace cpu
}  // namespace slimops
