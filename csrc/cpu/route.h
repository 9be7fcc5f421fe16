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
//   auto     (default) measure per shape on its first call and a few times later (on its
//            16th, 64th, 256th, 1024th and 4096th calls), run the route with the better best
//            time;
//   fixed    the fixed rules only (no measurement): deterministic, the same route every run
//            (oneDNN only at full input width, where its weight is the contiguous prefix);
//   onednn   oneDNN wherever it applies (tests use it to check that route's results).
#pragma once

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <map>
#include <mutex>
#include <utility>

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

// SLIMOPS_CONV_ONEDNN=0 turns the oneDNN route off altogether (tests run both paths); it also
// needs a PyTorch built with oneDNN, not turned off by torch.backends.mkldnn.
inline bool conv_onednn_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("SLIMOPS_CONV_ONEDNN");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return enabled && at::hasMKLDNN() && at::globalContext().userEnabledMkldnn();
}

// Whether oneDNN can run a pass on `t` at all: float32, the route enabled, and the geometry's
// `extents` (strides, dilations, padded input sides) inside 32-bit ranges. PyTorch's conv
// sizes its output in ways that break past them (stride 2^63 - 1 with padding 2^31 - 1 gave
// an empty output where the formula gives one row, and the epilogue then wrote through a null
// pointer; tests/fuzz_geometry.py), so such geometry stays on slimops' kernels, whose 64-bit
// arithmetic is checked.
inline bool onednn_takes(const at::Tensor& t, std::initializer_list<int64_t> extents) {
  for (int64_t v : extents) {
    if (v > std::numeric_limits<int32_t>::max()) return false;
  }
  return t.scalar_type() == at::kFloat && conv_onednn_enabled();
}

// oneDNN's result must have the shape slimops' checked geometry gives (a guard behind
// onednn_takes' ranges: a mis-sized result would be indexed past its end).
inline void check_onednn_shape(const at::Tensor& t, at::IntArrayRef expected, const char* op,
                               const char* what) {
  TORCH_CHECK(t.sizes() == expected, "slimops::", op, ": oneDNN's ", what, " has shape ",
              t.sizes(), " where the geometry gives ", expected,
              "; set SLIMOPS_CONV_ROUTE=fixed to run this geometry on slimops' kernels");
}

// A RouteKey's first slot is the op's base plus its pass, so the keys of different ops never
// meet: conv2d's passes are 0-3 (conv2d.cpp, Pass), depthwise_conv2d's 16-18.
enum class RouteOp : int64_t { kConv2d = 0, kDepthwiseConv2d = 16 };

// A pass's identity: every number its speed depends on (the geometry, the pass, the epilogue,
// the thread count, the ISA cap). Unused slots stay 0.
using RouteKey = std::array<int64_t, 24>;

// When a measured key is measured again: on its 16th call after the first measurement, then
// its 64th, 256th, 1024th and 4096th (then never). Why: on a shared machine the first
// measurement can fall in a window where another process holds a core, and the two routes
// slow down by different factors there. On a 2-core AMD EPYC Zen 3 with one core kept busy, a
// [1, 64, 56, 56] 3x3 conv at full width (the kernels 1.25x slower than oneDNN idle) got the
// kernels from the first measurement in 5 of 8 fresh processes (idle: 0 of 6); with this
// schedule 7 of 8 ran oneDNN after 300 calls, and idle choices did not change. Each route
// keeps the best time it ever took: contention only adds time, so the best times converge on
// what each route costs unhindered, and a later window without contention corrects a choice
// made under it.
constexpr int64_t kRouteFirstCheck = 16;
constexpr int64_t kRouteCheckGrowth = 4;
constexpr int64_t kRouteLastCheck = 4096;

class RouteCache {
 public:
  // Counts a call of `key` and returns its route for this call: 1 = oneDNN, 0 = kernels,
  // -1 = not measured yet. `remeasure` is set when this call is one of the key's later
  // measurements (kRouteFirstCheck...).
  int visit(const RouteKey& key, bool& remeasure) {
    std::lock_guard<std::mutex> lock(mutex_);
    remeasure = false;
    const auto it = entries_.find(key);
    if (it == entries_.end()) return -1;
    Entry& e = it->second;
    if (e.next_check > 0 && ++e.calls == e.next_check) {
      remeasure = true;
      e.next_check = e.next_check < kRouteLastCheck ? e.next_check * kRouteCheckGrowth : 0;
    }
    return e.onednn() ? 1 : 0;
  }
  // Folds one measurement's best times (seconds) into `key`'s entry.
  void record(const RouteKey& key, double onednn_s, double kernels_s) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto [it, first] = entries_.try_emplace(key);
    Entry& e = it->second;
    if (first) e.next_check = kRouteFirstCheck;
    e.best_onednn = std::min(e.best_onednn, onednn_s);
    e.best_kernels = std::min(e.best_kernels, kernels_s);
    ++rounds_;
  }
  int64_t clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    const int64_t n = static_cast<int64_t>(entries_.size());
    entries_.clear();
    rounds_ = 0;
    return n;
  }
  int64_t count(bool onednn) {
    std::lock_guard<std::mutex> lock(mutex_);
    return std::count_if(entries_.begin(), entries_.end(),
                         [&](const auto& kv) { return kv.second.onednn() == onednn; });
  }
  // The best time `key`'s faster route has taken (seconds); infinity when `key` was never
  // measured.
  double best(const RouteKey& key) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = entries_.find(key);
    if (it == entries_.end()) return std::numeric_limits<double>::infinity();
    return std::min(it->second.best_onednn, it->second.best_kernels);
  }
  // Measurements run since the last clear (first ones and later ones).
  int64_t rounds() {
    std::lock_guard<std::mutex> lock(mutex_);
    return rounds_;
  }

 private:
  struct Entry {
    double best_onednn = std::numeric_limits<double>::infinity();
    double best_kernels = std::numeric_limits<double>::infinity();
    int64_t calls = 0;       // calls since the first measurement
    int64_t next_check = 0;  // the call count that measures again; 0: none
    bool onednn() const { return best_onednn < best_kernels; }
  };
  std::mutex mutex_;
  std::map<RouteKey, Entry> entries_;
  int64_t rounds_ = 0;
};

inline RouteCache& route_cache() {
  static RouteCache cache;
  return cache;
}

// Below this many multiply-adds a pass is not measured: a few microseconds of work, where
// timing noise is as large as any difference. In auto mode such a pass runs the kernels (the
// fixed mode keeps its rule): oneDNN's per-call costs (its primitive, the weight's reorder,
// its thread team) exceed the work there. An 8 -> 8 3x3 conv on 4x4 planes at batch 2 took
// 111 us per eval call through oneDNN and 61 us on the kernels, 419 and 174 us per training
// step (2-core Intel Xeon, idle), and oneDNN's thread team waits a scheduler slice whenever
// both cores are busy.
constexpr int64_t kRouteMeasureMacs = int64_t{1} << 18;

// Runs the pass on the chosen route and returns its result. `fixed_onednn` is the fixed
// rules' choice (fixed mode); passes under kRouteMeasureMacs run the kernels in auto mode
// (see there). In auto mode the first call of a key runs each candidate once untimed (page
// faults, oneDNN's primitive creation), then three times each, alternating; fewer timed runs
// picked the slower route on a noisy 2-core machine (a 256-channel 3x3 conv on a 7x7 plane,
// 1.3x). A later measurement (kRouteFirstCheck...) times the call on its route and runs the
// other route once. The route with the better best time over all of them runs; a measuring
// call returns a result of a route it ran (either is the op's result).
//
// `kernels_best` (called after the first, untimed run of `kernels`) may give the kernels
// route's best time without timing it: a conv's gradient pair, whose kernels route is its two
// passes on their own routes, has the best times of those passes' own first measurements
// (which that untimed run made). A finite value stands for the three timed runs of `kernels`;
// infinity times them as usual.
template <typename Result, typename Onednn, typename Kernels, typename KernelsBest>
Result run_routed(const RouteKey& key, bool onednn_possible, int64_t macs, bool fixed_onednn,
                  Onednn&& onednn, Kernels&& kernels, KernelsBest&& kernels_best) {
  if (!onednn_possible) return kernels();
  const RouteMode mode = route_mode();
  if (mode == RouteMode::kOnednn) return onednn();
  if (mode == RouteMode::kFixed) return fixed_onednn ? onednn() : kernels();
  if (macs < kRouteMeasureMacs) return kernels();
  bool remeasure = false;
  const int known = route_cache().visit(key, remeasure);
  if (known >= 0 && !remeasure) return known ? onednn() : kernels();
  using clock = std::chrono::steady_clock;
  const auto seconds = [](clock::time_point t0) {
    return std::chrono::duration<double>(clock::now() - t0).count();
  };
  double best_onednn = std::numeric_limits<double>::infinity(), best_kernels = best_onednn;
  Result result;
  if (known >= 0) {
    // A later measurement: this call on its route, timed, and one run of the other route.
    // One extra run, not the first measurement's seven: the best times of earlier
    // measurements stand, so one more sample each is enough to correct a choice, and the
    // full rounds cost S-ResNet-50's training steps 1.3-1.4x while they ran (Zen 3, batch 8:
    // dozens of shapes re-measured in the same steps).
    auto t0 = clock::now();
    result = known ? onednn() : kernels();
    (known ? best_onednn : best_kernels) = seconds(t0);
    t0 = clock::now();
    Result other = known ? kernels() : onednn();
    (known ? best_kernels : best_onednn) = seconds(t0);
    route_cache().record(key, best_onednn, best_kernels);
    return result;
  }
  result = kernels();  // untimed: first-call costs
  result = onednn();
  const double known_kernels = kernels_best();
  for (int rep = 0; rep < 3; ++rep) {
    auto t0 = clock::now();
    if (!std::isfinite(known_kernels)) {
      result = kernels();
      best_kernels = std::min(best_kernels, seconds(t0));
      t0 = clock::now();
    }
    result = onednn();
    best_onednn = std::min(best_onednn, seconds(t0));
  }
  if (std::isfinite(known_kernels)) best_kernels = known_kernels;
  route_cache().record(key, best_onednn, best_kernels);
  return result;
}

template <typename Result, typename Onednn, typename Kernels>
Result run_routed(const RouteKey& key, bool onednn_possible, int64_t macs, bool fixed_onednn,
                  Onednn&& onednn, Kernels&& kernels) {
  return run_routed<Result>(key, onednn_possible, macs, fixed_onednn,
                            std::forward<Onednn>(onednn), std::forward<Kernels>(kernels),
                            [] { return std::numeric_limits<double>::infinity(); });
}

}  // namespace cpu
}  // namespace slimops
