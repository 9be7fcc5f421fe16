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
//   auto     (default) measure per shape on its first call (the candidates back to back),
//            then time them in place on a few later calls (windows of six calls from the
//            2nd, 16th, 64th, 256th, 1024th and 4096th call after it); run the faster
//            back to back unless the in-place times say otherwise by more than 10%;
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

// When a measured key is timed again, in place: windows of kRouteWindowCalls calls that
// alternate the kernels and oneDNN, each call timed as it finds its operands (the caches as
// the previous op left them); each route's window time is the median of its calls there.
// Windows start on the 2nd call after the first measurement, then the 16th, 64th, 256th,
// 1024th and 4096th (then never).
//
// Why in place: the first measurement runs the candidates back to back, so every run after
// the first finds its operands in cache, which a call inside a network does not. A grouped
// 5x5 stride-2 conv (512 -> 96, 14x14, batch 8, AVX2; im2col chunks of 3.8 MB) took 2.6 ms on
// the kernels and 3.3 on oneDNN back to back, but 5.4 and 3.2 with 64 MiB written between
// calls, and 4.2-5.5 against oneDNN's 3.1 inside that layer's training step, which the
// back-to-back choice made 1.12-1.15x the reference style's (2-core Intel Xeon). Evicting the
// caches before each back-to-back run instead moved single-layer benchmarks, whose operands
// do stay in cache between calls, onto their slower route (1.03 -> 1.08-1.12).
//
// Why medians, and a margin: one call's in-place time spreads far more than a back-to-back
// run's (the grouped conv above: 3.0 to 5.5 ms on the kernels inside the step; its fastest
// call would have kept the kernels), and near-equal routes swapped places between windows
// when a window timed one call each (a 5x5 stride-2 conv, 64 -> 6 channels on 34x34 at batch
// 1: oneDNN 0.221 ms, the kernels 0.253 back to back; in place 0.289 / 0.277 in one window,
// 0.240 / 0.272 in the next). So the in-place times overturn the first measurement's choice
// only by more than kRouteInPlaceMargin.
//
// Why repeated: on a shared machine one window can fall where another process holds a
// core, and the two routes slow down by different factors there. On a 2-core AMD EPYC Zen 3
// with one core kept busy, a [1, 64, 56, 56] 3x3 conv at full width (the kernels 1.25x
// slower than oneDNN idle) got the kernels from the first measurement in 5 of 8 fresh
// processes (idle: 0 of 6); with later measurements 7 of 8 ran oneDNN after 300 calls, and
// idle choices did not change. Each route keeps its best window time: contention only adds
// time, so the best windows converge on what each route costs unhindered, and a later window
// without contention corrects a choice made under it.
constexpr int64_t kRouteWindowCalls = 6;  // three per route
constexpr int64_t kRouteFirstWindow = 2;
constexpr int64_t kRouteSecondWindow = 16;
constexpr int64_t kRouteWindowGrowth = 4;
constexpr int64_t kRouteLastWindow = 4096;
constexpr double kRouteInPlaceMargin = 0.10;
// A window runs the route not chosen three times. Where the back-to-back times are far apart
// (the slower more than kRouteFarRatio x the faster: pointwise convs at batch 1, 2-3x slower
// on oneDNN) the windows before the kRouteFarFirstWindow-th call are skipped: S-MobileNet
// v2's training step at 224, batch 1, took 1.07-1.11x its time with them in its 25th-40th
// steps (its 361 passes' windows; 2-core Intel Xeon), while the one wrong back-to-back
// choice found was 1.27x apart (the grouped conv above). Their later windows still run.
// SLIMOPS_CONV_ROUTE_EARLY_WINDOWS=1 keeps them for every pass (tests check the schedule).
constexpr double kRouteFarRatio = 1.5;
constexpr int64_t kRouteFarFirstWindow = 256;

inline bool route_early_windows_forced() {
  const char* v = std::getenv("SLIMOPS_CONV_ROUTE_EARLY_WINDOWS");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

class RouteCache {
 public:
  // What a call of a key runs: `route` 1 = oneDNN, 0 = the kernels, -1 = not measured yet
  // (the caller measures); `timed` when the call is one of an in-place window's: the
  // window's first call count and this call's place in it (record_in_place's arguments).
  struct Visit {
    int route;
    bool timed;
    int64_t window = 0, slot = 0;
  };
  // Counts a call of `key` and says what it runs.
  Visit visit(const RouteKey& key) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = entries_.find(key);
    if (it == entries_.end()) return {-1, false};
    Entry& e = it->second;
    ++e.calls;
    const int64_t slot = e.calls - e.next_window;  // the call's place in the window
    if (e.next_window > 0 && slot >= 0 && slot < kRouteWindowCalls)
      return {int(slot % 2), true, e.next_window, slot};
    return {e.onednn() ? 1 : 0, false};
  }
  // `key`'s route (as visit's) without counting a call: for a pass inside another pass's
  // in-place window (conv2d_backward's pair runs its two passes as its kernels route), whose
  // time must be the passes' chosen routes', not their own windows'.
  int chosen(const RouteKey& key) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = entries_.find(key);
    return it == entries_.end() ? -1 : it->second.onednn() ? 1 : 0;
  }
  // Folds the first measurement's best times (seconds, candidates back to back) into `key`'s
  // entry.
  void record(const RouteKey& key, double onednn_s, double kernels_s) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto [it, first] = entries_.try_emplace(key);
    Entry& e = it->second;
    e.onednn_s = std::min(e.onednn_s, onednn_s);
    e.kernels_s = std::min(e.kernels_s, kernels_s);
    if (first) {
      e.next_window = e.far_apart() && !route_early_windows_forced() ? kRouteFarFirstWindow
                                                                     : kRouteFirstWindow;
    }
    ++rounds_;
  }
  // Folds the in-place time (seconds) of `visit`, a window's call, into `key`'s entry; the
  // window's last time to arrive completes a measurement: each route's median there, kept
  // where it beats its best. (A call that threw leaves its window open, and the key with
  // the routes measured so far.)
  void record_in_place(const RouteKey& key, const Visit& visit, double seconds) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = entries_.find(key);
    if (it == entries_.end()) return;  // cleared meanwhile
    Entry& e = it->second;
    if (visit.window != e.next_window) return;
    e.window[visit.slot] = seconds;
    if (++e.filled < kRouteWindowCalls) return;
    e.filled = 0;
    for (int r = 0; r < 2; ++r) {
      std::array<double, kRouteWindowCalls / 2> times;
      for (int64_t i = 0; i < kRouteWindowCalls / 2; ++i) times[i] = e.window[2 * i + r];
      std::sort(times.begin(), times.end());
      double& best = r ? e.onednn_in_place_s : e.kernels_in_place_s;
      best = std::min(best, times[times.size() / 2]);
    }
    e.next_window = e.next_window == kRouteFirstWindow ? kRouteSecondWindow
                    : e.next_window < kRouteLastWindow  ? e.next_window * kRouteWindowGrowth
                                                        : 0;
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
  // The best time `key`'s faster route took in its first measurement (seconds, back to back,
  // as another first measurement times its candidates); infinity when `key` was never
  // measured.
  double best(const RouteKey& key) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = entries_.find(key);
    if (it == entries_.end()) return std::numeric_limits<double>::infinity();
    return std::min(it->second.onednn_s, it->second.kernels_s);
  }
  // Measurements run since the last clear (first ones and completed windows).
  int64_t rounds() {
    std::lock_guard<std::mutex> lock(mutex_);
    return rounds_;
  }

 private:
  struct Entry {
    static constexpr double kNever = std::numeric_limits<double>::infinity();
    double onednn_s = kNever, kernels_s = kNever;                     // back to back
    double onednn_in_place_s = kNever, kernels_in_place_s = kNever;  // best window medians
    std::array<double, kRouteWindowCalls> window{};  // the current window's times
    int64_t filled = 0;                               // how many of them have arrived
    int64_t calls = 0;        // calls since the first measurement
    int64_t next_window = 0;  // the call count that starts the next window; 0: none
    bool far_apart() const {
      return std::max(onednn_s, kernels_s) > kRouteFarRatio * std::min(onednn_s, kernels_s);
    }
    bool onednn() const {
      const bool back_to_back = onednn_s < kernels_s;
      const double chosen = back_to_back ? onednn_in_place_s : kernels_in_place_s;
      const double other = back_to_back ? kernels_in_place_s : onednn_in_place_s;
      // (infinite before the first window: never overturned)
      return back_to_back != (other * (1 + kRouteInPlaceMargin) < chosen);
    }
  };
  std::mutex mutex_;
  std::map<RouteKey, Entry> entries_;
  int64_t rounds_ = 0;
};

inline RouteCache& route_cache() {
  static RouteCache cache;
  return cache;
}

// Whether this thread is inside a window call of run_routed (one flag for every
// instantiation of the template).
inline bool& route_in_window() {
  thread_local bool in_window = false;
  return in_window;
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
// 1.3x). A window's call (kRouteFirstWindow...) runs its one route, timed in place; a pass
// run inside it runs its own chosen route, untimed (route_in_window). The faster route back
// to back runs, unless the windows' times overturn it (Entry::onednn); a measuring call
// returns a result of a route it ran (either is the op's result).
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
  // inside another pass's window call (this thread): the chosen route, no window of its own
  bool& in_window = route_in_window();
  const RouteCache::Visit visit =
      in_window ? RouteCache::Visit{route_cache().chosen(key), false} : route_cache().visit(key);
  if (visit.route >= 0 && !visit.timed) return visit.route ? onednn() : kernels();
  using clock = std::chrono::steady_clock;
  const auto seconds = [](clock::time_point t0) {
    return std::chrono::duration<double>(clock::now() - t0).count();
  };
  if (visit.timed) {  // a window's call: its route timed in place
    struct InWindow {  // reset on exceptions too
      bool& flag;
      explicit InWindow(bool& f) : flag(f) { flag = true; }
      ~InWindow() { flag = false; }
    };
    const auto t0 = clock::now();
    Result result;
    {
      const InWindow scope(in_window);
      result = visit.route ? onednn() : kernels();
    }
    route_cache().record_in_place(key, visit, seconds(t0));
    return result;
  }
  double best_onednn = std::numeric_limits<double>::infinity(), best_kernels = best_onednn;
  Result result;
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
