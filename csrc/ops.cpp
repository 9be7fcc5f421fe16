// Schemas of every slimops op, in one place. Kernels register against these in
// csrc/cpu/*.cpp (TORCH_LIBRARY_IMPL(slimops, CPU, m)), autograd in csrc/autograd/*.cpp
// (TORCH_LIBRARY_IMPL(slimops, Autograd, m)); fakes are registered from Python
// (slimops/ops/*.py) so the ops trace under torch.compile and pass opcheck.
//
// Conventions (docs/ARCHITECTURE.md, slimops/reference.py for the exact math):
//  * weights and biases are passed full size; the active width is the input's channel
//    count plus an explicit output channel count, and kernels read the channel prefix
//    through the full tensor's strides (no copy);
//  * `activation`: 0 = none, 1 = relu, 2 = relu6;
//  * the fused epilogue is act((z + bias) * scale + shift + residual);
//  * backward ops that return a weight gradient return it at the full weight's shape,
//    with the prefix filled and the rest zero, so autograd can accumulate it as is.
#include <torch/library.h>

#include <string>
#include <vector>

#include "cpu/isa.h"
#include "cpu/parallel.h"
#include "cpu/route.h"

namespace {
// The instruction set the CPU kernels' vectorised loops run with ("avx512", "avx2",
// "base"): the CPU's best, capped by SLIMOPS_CPU_ISA. Reported by slimops.backend_info().
std::string cpu_isa() { return slimops::cpu::isa_name(slimops::cpu::cpu_isa()); }

// How many conv passes measured so far (csrc/cpu/route.h) go to oneDNN and how many to the
// kernels, and how many measurements ran (first and later ones): [onednn, kernels, rounds];
// `clear` forgets them (the next call of each shape measures again). Reported by
// slimops.backend_info(); benchmarks clear between settings.
std::vector<int64_t> conv2d_routes(bool clear) {
  auto& cache = slimops::cpu::route_cache();
  std::vector<int64_t> counts = {cache.count(true), cache.count(false), cache.rounds()};
  if (clear) cache.clear();
  return counts;
}

// The load watch (csrc/cpu/parallel.h's rule 5): [policy, contended, joins, slow_joins,
// serial_ops, slow_join_us, samples, busy_samples] (policy 0 adaptive, 1 off, 2 serial;
// contended 1 while ops run serial; counts since the process started, serial_ops counting op
// calls and serial_while_contended blocks; the join time counted as slow, microseconds;
// CPU-time windows sampled and those that found the machine busy).
// `policy` >= 0 sets the policy first, `slow_join_us` >= 0 the threshold; -1 only reads.
std::vector<int64_t> load_watch(int64_t policy, int64_t slow_join_us) {
  using slimops::cpu::LoadPolicy;
  auto& w = slimops::cpu::load_watch();
  TORCH_CHECK(policy >= -1 && policy <= static_cast<int64_t>(LoadPolicy::kSerial),
              "slimops::load_watch: policy must be -1 (read), 0 (adaptive), 1 (off) or "
              "2 (serial), got ", policy);
  TORCH_CHECK(slow_join_us >= -1 && slow_join_us <= int64_t{1} << 40,
              "slimops::load_watch: slow_join_us must be -1 (read) or 0 to 2^40, got ",
              slow_join_us);
  if (policy >= 0) w.policy.store(policy);
  if (slow_join_us >= 0) w.slow_join.store(slow_join_us * 1000);
  return {w.policy.load(),     slimops::cpu::machine_contended() ? 1 : 0,
          w.joins.load(),      w.slow_joins.load(),
          w.serial_ops.load(), w.slow_join.load() / 1000,
          w.samples.load(),    w.busy_samples.load()};
}
}  // namespace

TORCH_LIBRARY(slimops, m) {
  m.def("cpu_isa() -> str", &cpu_isa);
  m.def("conv2d_routes(bool clear=False) -> int[]", &conv2d_routes);
  m.def("load_watch(int policy=-1, int slow_join_us=-1) -> int[]", &load_watch);
  // Dense / grouped convolution; groups = G fixed across widths, per-group prefixes.
  m.def(
      "conv2d(Tensor input, Tensor weight, Tensor? bias, int out_channels, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, Tensor? scale, Tensor? shift, "
      "Tensor? residual, int activation) -> Tensor");
  m.def(
      "conv2d_backward_input(Tensor grad_z, Tensor weight, int[] input_size, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups) -> Tensor");
  m.def(
      "conv2d_backward_weight(Tensor grad_z, Tensor input, Tensor weight, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups) -> Tensor");
  // Both gradients in one call (conv2d's autograd uses it when it needs both).
  m.def(
      "conv2d_backward(Tensor grad_z, Tensor input, Tensor weight, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups) -> (Tensor, Tensor)");

  // Depthwise convolution on W[:C] of a [C_full, 1, kh, kw] weight.
  m.def(
      "depthwise_conv2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, "
      "int[2] padding, int[2] dilation, Tensor? scale, Tensor? shift, Tensor? residual, "
      "int activation) -> Tensor");
  m.def(
      "depthwise_conv2d_backward_input(Tensor grad_z, Tensor weight, int[] input_size, "
      "int[2] stride, int[2] padding, int[2] dilation) -> Tensor");
  m.def(
      "depthwise_conv2d_backward_weight(Tensor grad_z, Tensor input, Tensor weight, "
      "int[2] stride, int[2] padding, int[2] dilation) -> Tensor");

  // grad of z (the pre-epilogue conv output) from grad of the epilogue's output:
  // grad_out * act'(out) * scale[c]; scale optional.
  m.def("epilogue_backward(Tensor grad_out, Tensor out, Tensor? scale, int activation) -> Tensor");

  // Linear on W[:out_features, :in_features] and b[:out_features].
  m.def("linear(Tensor input, Tensor weight, Tensor? bias, int out_features) -> Tensor");
  m.def("linear_backward_input(Tensor grad_out, Tensor weight, int in_features) -> Tensor");
  m.def("linear_backward_weight(Tensor grad_out, Tensor input, Tensor weight) -> Tensor");

  // One width's batch norm (+ residual) + activation. Training normalises with the batch
  // statistics, eval with the running ones (required then). Functional: returns
  // (out, mean, var) — the statistics used, var biased — and the caller folds batch
  // statistics into the width's running stats (torch.library autograd needs a functional op).
  m.def(
      "batch_norm_act(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean, "
      "Tensor? running_var, bool training, float eps, Tensor? residual, int activation) "
      "-> (Tensor, Tensor, Tensor)");
  // Folds a batch's statistics (mean, biased var over `count` values per channel) into a
  // width's running statistics in place, as F.batch_norm does (momentum, unbiased variance).
  m.def(
      "update_running_stats(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, "
      "Tensor var, int count, float momentum) -> ()");
  // Returns (grad_input, grad_weight, grad_bias); grad of residual is epilogue_backward.
  m.def(
      "batch_norm_act_backward(Tensor grad_out, Tensor input, Tensor out, Tensor? weight, "
      "Tensor mean, Tensor var, float eps, bool training, int activation) "
      "-> (Tensor, Tensor, Tensor)");
}
