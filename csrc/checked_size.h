// Size arithmetic of the ops' geometry in checked 64-bit integers, shared by the CPU kernels
// and the CUDA bindings: a stride, padding or dilation near 2^63 must give a clear error (or
// the right answer), never a wrapped size that a kernel then indexes with.
//
// The output size of one spatial dimension also bounds every index a kernel forms from it:
// an input coordinate o*stride - pad + k*dilation lies in [-pad, size + pad), and size + 2*pad
// itself is checked here, so no kernel's index arithmetic can overflow once this passes.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>

namespace slimops {

inline int64_t checked_add(int64_t a, int64_t b, const char* op, const char* what) {
  int64_t r = 0;
  TORCH_CHECK(!__builtin_add_overflow(a, b, &r), "slimops::", op, ": ", what,
              " overflows 64-bit integers (", a, " + ", b, ")");
  return r;
}

inline int64_t checked_mul(int64_t a, int64_t b, const char* op, const char* what) {
  int64_t r = 0;
  TORCH_CHECK(!__builtin_mul_overflow(a, b, &r), "slimops::", op, ": ", what,
              " overflows 64-bit integers (", a, " * ", b, ")");
  return r;
}

// Output size of a convolution along one dimension ("height" / "width"): input `size`,
// kernel `k`, and the op's stride, padding, dilation (already checked positive /
// non-negative by the caller). An error names the dimension and the sizes when the dilated
// kernel does not fit the padded input.
inline int64_t conv_output_size(const char* op, const char* dim, int64_t size, int64_t k,
                                int64_t stride, int64_t padding, int64_t dilation) {
  const int64_t padded =
      checked_add(size, checked_mul(2, padding, op, "the padding"), op, "the padded input");
  const int64_t span = checked_add(checked_mul(dilation, k - 1, op, "the dilated kernel"), 1,
                                   op, "the dilated kernel");
  TORCH_CHECK(padded >= span, "slimops::", op, ": the padded input ", dim, " ", padded,
              " (size ", size, " + 2 * padding ", padding, ") is smaller than the dilated kernel's ",
              span, " (dilation ", dilation, " * (", k, " - 1) + 1)");
  return (padded - span) / stride + 1;
}

// The number of elements of a tensor of `sizes`, checked.
template <typename Sizes>
inline int64_t checked_numel(const Sizes& sizes, const char* op, const char* what) {
  int64_t n = 1;
  for (int64_t v : sizes) n = checked_mul(n, v, op, what);
  return n;
}

}  // namespace slimops
