// Shared helpers of the CPU kernels: activation codes, argument checks (those the CUDA
// bindings share are in arg_checks.h), the fused epilogue, the registration of an op family.
#pragma once

#include "arg_checks.h"
#include "cpu/parallel.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

// Registers CPU kernel `fn` of op `name` behind the load watch (parallel.h's rule 5): every
// CPU op is registered through this, inside a TORCH_LIBRARY_IMPL(slimops, CPU, m) block.
#define SLIMOPS_CPU_IMPL(name, fn) \
  m.impl(name, &::slimops::cpu::serial_when_contended<&fn>::call)

// Registers the CPU kernels of op `name` and of its two backward ops, `name`_backward_input
// and `name`_backward_weight: the functions of those names in the calling file. At namespace
// scope, after the three functions.
#define SLIMOPS_CPU_IMPL_WITH_BACKWARDS(name)                            \
  TORCH_LIBRARY_IMPL(slimops, CPU, m) {                                  \
    SLIMOPS_CPU_IMPL(#name, name);                                       \
    SLIMOPS_CPU_IMPL(#name "_backward_input", name##_backward_input);    \
    SLIMOPS_CPU_IMPL(#name "_backward_weight", name##_backward_weight);  \
  }

namespace slimops {
namespace cpu {

// Matches the schema's `int activation` (and slimops.ops._common.ACTIVATION_CODES).
enum Activation : int64_t { kNone = 0, kRelu = 1, kRelu6 = 2 };

// Grain size for at::parallel_for over items of `work_per_item` elements each: small layers
// (a 7x7 plane, a few channels) run on one thread instead of paying for a parallel region,
// which costs more than the work and stalls badly when the other core is busy.
inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, work_per_item));
}

// relu and relu6 as torch computes them, NaN included: a NaN pre-activation gives NaN (torch's
// relu is clamp_min and propagates it; `v > 0 ? v : 0` would turn it into 0).
template <typename scalar_t>
inline scalar_t activate(scalar_t v, int64_t activation) {
  if (activation == kRelu) return v <= scalar_t(0) ? scalar_t(0) : v;
  if (activation == kRelu6) return std::min(std::max(v, scalar_t(0)), scalar_t(6));  // NaN stays
  return v;
}

// Whether d act / d pre passes the incoming gradient, evaluated from the activation's *output*
// (so the pre-activation need not be saved), with torch's comparisons for a NaN: relu's
// threshold_backward zeroes where out <= 0, so a NaN passes its gradient; relu6's
// hardtanh_backward (vectorised loop) keeps only 0 < x < 6, so a NaN gets 0. (Its scalar
// remainder loop passes a NaN's gradient: torch gives 1 for a 4-element tensor and 0 in a
// 64-element one; slimops follows the vectorised loop every real tensor takes.) Written
// without branches, so that the element loops using it vectorise to a compare and a blend.
template <typename scalar_t>
inline bool passes_gradient(scalar_t out, int64_t activation) {
  if (activation == kRelu) return !(out <= scalar_t(0));
  if (activation == kRelu6) return (out > scalar_t(0)) & (out < scalar_t(6));
  return true;
}

inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "slimops::", op,
              ": the CPU kernel supports float32 and float64; ", name, " is ", t.scalar_type());
}

inline const at::Tensor* opt_ptr(const c10::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? &*t : nullptr;
}

// The first `n` entries of `t` along dim 0, for a library call (oneDNN) on the active prefix:
// `t` itself when that is all of it (full width). A narrow is a dispatcher call: a weight's two
// narrows and view and the bias's narrow took ~1.3 us per oneDNN call (2-core Intel Xeon).
inline at::Tensor leading(const at::Tensor& t, int64_t n) {
  return n == t.size(0) ? t : t.narrow(0, 0, n);
}

// Copies n elements (no overlap). The kernels' gathers and scatters move rows of small planes
// (2x2 to 8x8 at batch 64: 2 to 64 values each, thousands per call), where a library memmove
// call per row cost more than the copy: in the weight gradient of a 1x1 conv on 2x2 planes it
// was a third of the op. std::copy and plain loops become that call (GCC's
// -ftree-loop-distribute-patterns), so short runs are copied here in fixed-size pieces, which
// compile to vector moves inline; long ones still take memcpy.
template <typename T>
inline void copy_run(const T* src, int64_t n, T* dst) {
  if (n > 64) {
    std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(T));
    return;
  }
  int64_t q = 0;
  for (; q + 8 <= n; q += 8) std::memcpy(dst + q, src + q, 8 * sizeof(T));
  if (q + 4 <= n) {
    std::memcpy(dst + q, src + q, 4 * sizeof(T));
    q += 4;
  }
  if (q + 2 <= n) {
    std::memcpy(dst + q, src + q, 2 * sizeof(T));
    q += 2;
  }
  if (q < n) dst[q] = src[q];
}

}  // namespace cpu
}  // namespace slimops
