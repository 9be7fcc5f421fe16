// Shared helpers of the CPU kernels: activation codes, argument checks, the fused epilogue.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cstdint>

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

inline void check_activation(int64_t activation) {
  TORCH_CHECK(activation >= 0 && activation <= 2,
              "slimops: activation must be 0 (none), 1 (relu) or 2 (relu6), got ", activation);
}

template <typename scalar_t>
inline scalar_t activate(scalar_t v, int64_t activation) {
  if (activation == kRelu) return v > scalar_t(0) ? v : scalar_t(0);
  if (activation == kRelu6) return std::min(std::max(v, scalar_t(0)), scalar_t(6));
  return v;
}

// d act / d pre evaluated from the activation's *output* (so the pre-activation need not be
// saved): relu passes where out > 0, relu6 where 0 < out < 6.
template <typename scalar_t>
inline scalar_t activation_mask(scalar_t out, int64_t activation) {
  if (activation == kRelu) return out > scalar_t(0) ? scalar_t(1) : scalar_t(0);
  if (activation == kRelu6)
    return (out > scalar_t(0) && out < scalar_t(6)) ? scalar_t(1) : scalar_t(0);
  return scalar_t(1);
}

inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "slimops::", op,
              ": the CPU kernel supports float32 and float64; ", name, " is ", t.scalar_type());
}

inline void check_same(const at::Tensor& t, const at::Tensor& ref, const char* op,
                       const char* name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "slimops::", op, ": ", name, " has dtype ",
              t.scalar_type(), " but input has ", ref.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), "slimops::", op, ": ", name, " is on ", t.device(),
              " but input is on ", ref.device());
}

inline void check_vector(const c10::optional<at::Tensor>& t, int64_t len, const at::Tensor& ref,
                         const char* op, const char* name) {
  if (!t.has_value() || !t->defined()) return;
  check_same(*t, ref, op, name);
  TORCH_CHECK(t->dim() == 1 && t->size(0) == len, "slimops::", op, ": ", name,
              " must be a vector of length ", len, ", got shape ", t->sizes());
}

inline const at::Tensor* opt_ptr(const c10::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? &*t : nullptr;
}

}  // namespace cpu
}  // namespace slimops
