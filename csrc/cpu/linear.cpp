// Linear layer on the prefix W[:out_features, :in_features] of a full [O_full, I_full] weight.
//
// The prefix view of a contiguous weight has strides [I_full, 1]: a row-major matrix with
// leading dimension I_full, which BLAS takes as is (and its transpose as column-major), so every
// GEMM below reads the weight in place. The weight gradient is likewise written by the GEMM
// straight into the prefix view of the zero full-size result.
#include "cpu/common.h"

#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <vector>

namespace slimops {
namespace cpu {
namespace {

void check_weight(const at::Tensor& weight, const at::Tensor& ref, const char* op) {
  check_same(weight, ref, op, "weight");
  TORCH_CHECK(weight.dim() == 2, "slimops::", op, ": weight must be 2-D [O_full, I_full], got ",
              weight.sizes());
  TORCH_CHECK(weight.is_contiguous(), "slimops::", op,
              ": weight must be contiguous (its prefix is read in place, never copied); got "
              "strides ",
              weight.strides());
}

void check_feature_tensor(const at::Tensor& t, const char* op, const char* name) {
  check_float(t, op, name);
  check_device(t, c10::kCPU, op, name);
  TORCH_CHECK(t.dim() >= 1, "slimops::", op, ": ", name, " must be at least 1-D, got a scalar");
}

// `name` has `features` features (its last dim), which the weight's dim `dim` must cover:
// 1, the input features; 0, the output features.
void check_features(const char* op, const char* name, int64_t features, const at::Tensor& weight,
                    int64_t dim) {
  TORCH_CHECK(features <= weight.size(dim), "slimops::", op, ": ", name, " has ", features,
              " features but the weight has only ", weight.size(dim),
              dim == 1 ? " input features" : " output features");
}

// The [..., features] operand `t` named `name` (the input or grad_out) of a forward or
// input-gradient op, and the weight whose dim `dim` its features index: returns the features.
int64_t check_operand(const char* op, const char* name, const at::Tensor& t,
                      const at::Tensor& weight, int64_t dim) {
  check_feature_tensor(t, op, name);
  check_weight(weight, t, op);
  const int64_t features = t.size(-1);
  check_features(op, name, features, weight, dim);
  return features;
}

// The op's argument `name`: a width of the weight's dim `dim`, in [0, its size].
void check_width(const char* op, const char* name, int64_t width, const at::Tensor& weight,
                 int64_t dim) {
  TORCH_CHECK(width >= 0 && width <= weight.size(dim), "slimops::", op, ": ", name,
              " must be in [0, ", weight.size(dim), "], got ", width);
}

// Rows of the [..., features] tensor seen as a matrix (the product of the leading dims).
int64_t rows(const at::Tensor& t) {
  return c10::multiply_integers(t.sizes().begin(), t.sizes().end() - 1);
}

std::vector<int64_t> with_last(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> out(sizes.begin(), sizes.end());
  out.back() = last;
  return out;
}

at::Tensor prefix(const at::Tensor& weight, int64_t out_features, int64_t in_features) {
  return weight.narrow(0, 0, out_features).narrow(1, 0, in_features);
}

at::Tensor linear(const at::Tensor& input, const at::Tensor& weight,
                  const c10::optional<at::Tensor>& bias, int64_t out_features) {
  constexpr const char* op = "linear";
  const int64_t in_features = check_operand(op, "input", input, weight, 1);
  check_width(op, "out_features", out_features, weight, 0);
  check_vector(bias, weight.size(0), input, op, "bias");

  const int64_t M = rows(input);
  const at::Tensor x = input.reshape({M, in_features});
  const at::Tensor w_t = prefix(weight, out_features, in_features).t();
  at::Tensor out = at::empty({M, out_features}, input.options());
  if (const at::Tensor* b = opt_ptr(bias)) {
    // Seed the rows with the bias (read through its stride) and accumulate the GEMM in place;
    // at::addmm would seed them with a broadcast copy_ of the bias instead.
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "slimops_linear_bias", [&] {
      const scalar_t* bp = b->data_ptr<scalar_t>();
      const int64_t bs = b->stride(0);
      scalar_t* outp = out.data_ptr<scalar_t>();
      watched_parallel_for(0, M, 64, [&](int64_t begin, int64_t end) {
        for (int64_t m = begin; m < end; ++m)
          for (int64_t o = 0; o < out_features; ++o) outp[m * out_features + o] = bp[o * bs];
      });
    });
    out.addmm_(x, w_t);
  } else {
    at::mm_out(out, x, w_t);
  }
  return out.view(with_last(input.sizes(), out_features));
}

at::Tensor linear_backward_input(const at::Tensor& grad_out, const at::Tensor& weight,
                                 int64_t in_features) {
  constexpr const char* op = "linear_backward_input";
  const int64_t out_features = check_operand(op, "grad_out", grad_out, weight, 0);
  check_width(op, "in_features", in_features, weight, 1);

  const int64_t M = rows(grad_out);
  at::Tensor grad_input = at::empty({M, in_features}, grad_out.options());
  at::mm_out(grad_input, grad_out.reshape({M, out_features}),
             prefix(weight, out_features, in_features));
  return grad_input.view(with_last(grad_out.sizes(), in_features));
}

at::Tensor linear_backward_weight(const at::Tensor& grad_out, const at::Tensor& input,
                                  const at::Tensor& weight) {
  constexpr const char* op = "linear_backward_weight";
  check_feature_tensor(input, op, "input");
  check_feature_tensor(grad_out, op, "grad_out");
  check_same(grad_out, input, op, "grad_out");
  check_weight(weight, input, op);
  const int64_t in_features = input.size(-1), out_features = grad_out.size(-1);
  TORCH_CHECK(input.sizes().slice(0, input.dim() - 1) ==
                  grad_out.sizes().slice(0, grad_out.dim() - 1),
              "slimops::", op, ": grad_out ", grad_out.sizes(), " and input ", input.sizes(),
              " must have the same leading dimensions");
  check_features(op, "input", in_features, weight, 1);
  check_features(op, "grad_out", out_features, weight, 0);

  const int64_t M = rows(input);
  // Full weight shape: the part outside the prefix is zero so autograd accumulates it as is.
  // The GEMM overwrites the prefix (beta = 0), so only the rest is cleared: at full width
  // nothing is (zeroing a 1000 x 1024 classifier's gradient first was 4 MB of stores).
  at::Tensor grad_weight = at::empty(weight.sizes(), weight.options());
  if (out_features < weight.size(0))
    grad_weight.narrow(0, out_features, weight.size(0) - out_features).zero_();
  if (in_features < weight.size(1))
    grad_weight.narrow(0, 0, out_features).narrow(1, in_features, weight.size(1) - in_features)
        .zero_();
  at::Tensor grad_prefix = prefix(grad_weight, out_features, in_features);
  at::mm_out(grad_prefix, grad_out.reshape({M, out_features}).t(),
             input.reshape({M, in_features}));
  return grad_weight;
}

}  // namespace

SLIMOPS_CPU_IMPL_WITH_BACKWARDS(linear)

}  // namespace cpu
}  // namespace slimops
