// C++ smoke test of libslimops (built by CMakeLists.txt, run by ctest): the ops registered
// by the library's static TORCH_LIBRARY / TORCH_LIBRARY_IMPL initializers are reachable
// through the dispatcher, and slimops::linear on a channel prefix of a larger weight
// matches at::linear on the narrowed weight and bias.
//
// It calls no symbol of libslimops directly, so it also checks that the library was kept
// on the link line (-Wl,--no-as-needed, see CMakeLists.txt): otherwise the schema lookup
// fails.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <iostream>
#include <optional>

namespace {

using LinearFn = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            int64_t);

bool check(const char* what, const at::Tensor& got, const at::Tensor& expected) {
  if (got.sizes() == expected.sizes() && got.scalar_type() == expected.scalar_type() &&
      at::allclose(got, expected, /*rtol=*/1e-5, /*atol=*/1e-5)) {
    return true;
  }
  std::cerr << "slimops_smoke: MISMATCH in " << what << "\n  got shape " << got.sizes()
            << " dtype " << got.scalar_type() << "\n  expected shape " << expected.sizes()
            << " dtype " << expected.scalar_type() << "\n";
  if (got.sizes() == expected.sizes()) {
    std::cerr << "  max abs diff " << (got - expected).abs().max().item<double>() << "\n";
  }
  std::cerr << "got:\n" << got << "\nexpected:\n" << expected << "\n";
  return false;
}

}  // namespace

int main() {
  try {
    auto linear = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("slimops::linear", "")
                      .typed<LinearFn>();

    at::manual_seed(0);
    // Full weight [8, 6]; the active width is in_features 4 (the input's last dim) and
    // out_features 5: the kernel reads W[:5, :4] and b[:5] in place.
    const at::Tensor weight = at::randn({8, 6});
    const at::Tensor bias = at::randn({8});
    const at::Tensor input = at::randn({2, 4});
    const int64_t out_features = 5;
    const at::Tensor w = weight.narrow(0, 0, out_features).narrow(1, 0, input.size(-1));

    bool ok = true;
    ok &= check("linear with bias", linear.call(input, weight, bias, out_features),
                at::linear(input, w, bias.narrow(0, 0, out_features)));
    ok &= check("linear without bias", linear.call(input, weight, std::nullopt, out_features),
                at::linear(input, w));
    if (!ok) return 1;
  } catch (const c10::Error& e) {
    std::cerr << "slimops_smoke: FAILED: " << e.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "slimops_smoke: FAILED: " << e.what() << "\n";
    return 1;
  }
  std::cout << "slimops_smoke: ok" << std::endl;
  return 0;
}
