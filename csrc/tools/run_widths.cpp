// slimops_run_widths: a C++ program (libtorch + libslimops, no Python) that loads a
// slimmable model saved from Python as TorchScript (slimops.export.torchscript_widths:
// forward(x, width), the slimops ops on the full shared weights) and runs it at two or more
// widths on the CPU.
//
//   slimops_run_widths MODEL.pt CHECK.pt
//
// CHECK.pt is a TorchScript module written by Python holding the attributes `input`
// (Tensor), `widths` (List[float]) and `expected` (List[Tensor], Python's outputs at those
// widths). The program prints each width's output shape and largest difference from
// Python's, and exits 1 on a mismatch (rtol 1e-4, atol 1e-5), 2 on bad usage or files.
#include <torch/script.h>

#include <exception>
#include <iostream>
#include <vector>

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: " << argv[0] << " MODEL.pt CHECK.pt\n";
    return 2;
  }
  torch::jit::Module model, check;
  try {
    model = torch::jit::load(argv[1]);
    check = torch::jit::load(argv[2]);
  } catch (const std::exception& e) {
    std::cerr << "slimops_run_widths: cannot load: " << e.what() << "\n";
    return 2;
  }
  model.eval();
  const at::Tensor input = check.attr("input").toTensor();
  const c10::List<double> widths = check.attr("widths").toDoubleList();
  const c10::List<at::Tensor> expected = check.attr("expected").toTensorList();
  if (widths.size() != expected.size() || widths.size() < 2) {
    std::cerr << "slimops_run_widths: CHECK.pt needs >= 2 widths and one output each\n";
    return 2;
  }
  torch::NoGradGuard no_grad;
  bool ok = true;
  for (size_t i = 0; i < widths.size(); ++i) {
    const double width = widths.get(i);
    const at::Tensor out = model.forward({input, width}).toTensor();
    const at::Tensor want = expected.get(i);
    const bool same_shape = out.sizes() == want.sizes();
    const double diff = same_shape ? (out - want).abs().max().item<double>() : -1.0;
    const bool match = same_shape && at::allclose(out, want, /*rtol=*/1e-4, /*atol=*/1e-5);
    std::cout << "width " << width << ": output " << out.sizes() << ", max |C++ - Python| "
              << diff << (match ? "  ok" : "  MISMATCH") << "\n";
    ok = ok && match;
  }
  // A width the module was not exported at is an error raised inside TorchScript.
  try {
    model.forward({input, 12.5});
    std::cout << "width 12.5: no error (unexpected)\n";
    ok = false;
  } catch (const std::exception&) {
    std::cout << "width 12.5: rejected (not exported)\n";
  }
  return ok ? 0 : 1;
}
