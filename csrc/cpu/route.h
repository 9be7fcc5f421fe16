// Which implementation runs a pass of an op, chosen by measuring both on the first call of each
// shape (as torch.backends.cudnn.benchmark does on GPUs).
//
// Why measure instead of a fixed rule: the two candidates (slimops' kernels on the weight
// prefix in place, and oneDNN, the library behind the reference style's F.conv2d) trade places
// by CPU vendor, ISA, shape and load. On a 2-core AMD EPYC (Zen 4) oneDNN ran 3x3 convs on 8x8
// planes at batch 64 2-3x faster than the kernels (MKL's GEMM takes its AVX2 path on AMD),
// while the kernels ran most pointwise convs at batch 1 2-3x faster than oneDNN (which lays
// the weight out in its blocked format on every call). Rules drawn from one machine's sweep
// have lost to plain PyTorch on another; a measurement on the machine that runs the model,
// under the load it runs with, does not. The reference path is the speed floor (DESIGN.md):
// "a kernel is at least as fast as reference.py on the same input, or the op uses the
// reference".
//
// SLIMOPS_CONV_ROUTE (read on every call, so one process can compare them):
//   auto     (default) measure per shape, keep the faster (cached for the process);
//   fixed    the fixed rules only (no measurement): deterministic, the same route every run
//            (oneDNN only at full input width, where its weight is the contiguous prefix);
//   onednn   oneDNN wherever it applies (tests use it to check that route's results).
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>

namespace slimops {
namespace cpu {

enum class RouteMode { kAuto, kFixed, kOnednn };

inline RouteMode route_mode() {
  const char* v = std::getenv("SLIMOPS_CONV_ROUTE");
  if (v == nullptr || std::strcmp(v, "auto") == 0 || *v == '\0') return RouteMode::kAuto;
  if (std::strcmp(v, "fixed") == 0) return RouteMode::kFixed;
  if (std::strcmp(v, "onednn") == 0) return RouteMode::kOnednn;
  TORCH_CHECK(false, "SLIMOPS_CONV_ROUTE must be auto, fixed or onednn, got '", v, "'");
}

// A pass's identity: every number its speed depends on (the geometry, the pass, the epilogue,
// the thread count, the ISA cap). Unused slots stay 0.
using RouteKey = std::array<int64_t, 24>;

class RouteCache {
 public:
  // 1 = oneDNN, 0 = kernels, -1 = not measured yet.
  int find(const RouteKey& key) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = choices_.find(key);
    return it == choices_.end() ? -1 : it->second;
  }
  void store(const RouteKey& key, bool onednn) {
    std::lock_guard<std::mutex> lock(mutex_);
    choices_[key] = onednn ? 1 : 0;
  }
  int64_t clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    const int64_t n = static_cast<int64_t>(choices_.size());
    choices_.clear();
    return n;
  }
  int64_t count(bool onednn) {
    std::lock_guard<std::mutex> lock(mutex_);
    return std::count_if(choices_.begin(), choices_.end(),
                         [&](const auto& kv) { return kv.second == (onednn ? 1 : 0); });
  }

 private:
  std::mutex mutex_;
  std::map<RouteKey, int> choices_;
};

inline RouteCache& route_cache() {
  static RouteCache cache;
  return cache;
}

// Below this many multiply-adds a pass is not measured (the fixed rule decides): a few
// microseconds of work, where timing noise is as large as any difference.
constexpr int64_t kRouteMeasureMacs = int64_t{1} << 18;

// Runs the pass on the chosen route and returns its result. `fixed_onednn` is the fixed
// rules' choice (fixed mode, and passes under kRouteMeasureMacs). In auto mode the first call
// of a key runs each candidate once untimed (page faults, oneDNN's primitive creation), then
// three times each, alternating, keeps the one with the better best time, and returns the
// last result computed (either is the op's result). Fewer timed runs picked the slower route
// on a noisy 2-core machine (a 256-channel 3x3 conv on a 7x7 plane, 1.3x).
template <typename Result, typename Onednn, typename Kernels>
Result run_routed(const RouteKey& key, bool onednn_possible, int64_t macs, bool fixed_onednn,
                  Onednn&& onednn, Kernels&& kernels) {
  if (!onednn_possible) return kernels();
  const RouteMode mode = route_mode();
  if (mode == RouteMode::kOnednn) return onednn();
  if (mode == RouteMode::kFixed || macs < kRouteMeasureMacs)
    return fixed_onednn ? onednn() : kernels();
  const int known = route_cache().find(key);
  if (known >= 0) return known ? onednn() : kernels();
  using clock = std::chrono::steady_clock;
  const auto seconds = [](clock::time_point t0) {
    return std::chrono::duration<double>(clock::now() - t0).count();
  };
  double best_onednn = std::numeric_limits<double>::infinity(), best_kernels = best_onednn;
  Result result = kernels();
  result = onednn();
  for (int rep = 0; rep < 3; ++rep) {
    auto t0 = clock::now();
    result = kernels();
    best_kernels = std::min(best_kernels, seconds(t0));
    t0 = clock::now();
    result = onednn();
    best_onednn = std::min(best_onednn, seconds(t0));
  }
  route_cache().store(key, best_onednn < best_kernels);
  return result;
}

}  // namespace cpu
}  // namespace slimops
