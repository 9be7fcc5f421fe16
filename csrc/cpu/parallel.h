// The CPU kernels' thread policy, in one place.
//
// These machines have 2 cores and are often shared: another process may hold one core. An
// OpenMP region then waits at its closing barrier for a worker the OS has descheduled, which
// costs up to a scheduler slice per region, so a kernel made of many small regions (or of
// small BLAS calls that each enter the BLAS thread team) collapses under load. The rules:
//
//  1. Work below kParallelWork scalar operations runs on the calling thread: no region.
//  2. Otherwise an op enters *one* region per pass, whose threads claim tasks from a shared
//     counter (not a static split): a thread that the OS deschedules delays only the task it
//     holds, and the other thread takes the rest.
//  3. No nesting: inside a region, run_tasks runs inline, and a GEMM called from a task is
//     single-threaded (BLAS does not open a team inside an OpenMP region).
//  4. Results never depend on which thread ran a task: every task writes its own outputs, and
//     reductions go through per-task partials summed in task order (deterministic).
//  5. While another process holds a core, every op runs serial (the load watch below). Rules
//     1-3 bound what one region loses; they cannot stop the loss: the closing barrier still
//     waits for a worker the OS has not run, while libgomp's waiting thread spins on the free
//     core. Measured on a 2-core Intel Xeon with another process spinning on one core: an
//     S-MobileNet v2 training step (32x32, batch 64) took 2,434 ms on 2 threads and 219 ms
//     on 1; batch-1 S-ResNet-50 eval 384 ms against 59. Two signs of load: a region's second
//     thread joining later than kSlowJoinNs, twice within kSlowJoinPairNs
//     (watched_parallel_for times every region opened here; BLAS and oneDNN open their own,
//     so an op opens an empty probe region when no join was timed for kProbeIntervalNs),
//     and a 200 ms window in which other processes left this process's CPUs less than its
//     team needs (load_watch.cpp). Either marks the machine contended for kContendedHoldNs,
//     and while it is, each op runs on its calling thread alone, BLAS and oneDNN included
//     (LoadScope, registered around every CPU op).
//     SLIMOPS_LOAD_POLICY=off keeps the team always (the rounding of an idle machine; a serial
//     op rounds as under torch.set_num_threads(1)), `serial` never uses it; the load_watch op
//     reads and sets the same (slimops/ops/load_watch.py).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>  // at::internal::GRAIN_SIZE
#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <utility>
#include <vector>

// MKL's per-thread thread count for the calls that follow on this thread (0: back to the
// global setting); returns the previous one. The C entry: MKL's header maps
// mkl_set_num_threads_local to it, the lower-case symbol is the Fortran one (int* argument).
// Weak: a torch build without MKL leaves it null.
extern "C" int MKL_Set_Num_Threads_Local(int nt) __attribute__((weak));

namespace slimops {
namespace cpu {

// ---- Rule 5: the load watch -----------------------------------------------------------------

// A team member that joins a region this long after it opened was not running: the OS had
// given its core to another process. Idle joins on the 2-core machines here take 1-60 us
// (a spinning worker, or one woken from its futex); a descheduled one waits for the other
// process's time slice (milliseconds). The load_watch op can change it (LoadWatch::slow_join).
constexpr int64_t kSlowJoinNs = 1000 * 1000;
// A slow join marks the machine contended when another came within this long before it, or
// when it is contended already (renewing). Why not the first: a virtual CPU that the
// hypervisor pauses for a millisecond delays one join on an idle machine. On the 2-vCPU Intel
// Xeon, idle, a pass over the 8 S-MobileNet eval cells of bench/matrix.py (~75,000 joins)
// met 1-3 slow joins, never two within 250 ms; each turned the ops serial for
// kContendedHoldNs, and a cell that met them ran its median up to 1.5x slower (v2 at 0.75x:
// 3.7 -> 5.4 ms). Another process on a core delays joins every few milliseconds while the ops
// open regions, and a probe region (every kProbeIntervalNs) while they do not, so a second
// slow join follows within this window.
constexpr int64_t kSlowJoinPairNs = 250 * 1000 * 1000;
// How long one sign of load (a second slow join, a busy window) keeps the ops serial. A busy
// machine renews it (windows every 200 ms, probes every 100 ms); a load that goes away costs
// at most this long on one thread.
constexpr int64_t kContendedHoldNs = 1000 * 1000 * 1000;
// An op opens an empty region to time the join when none was timed for this long (its own
// regions may all be BLAS's or oneDNN's, or it runs serial): an idle probe costs
// microseconds, so at most ~0.01%.
constexpr int64_t kProbeIntervalNs = 100 * 1000 * 1000;

enum class LoadPolicy : int64_t { kAdaptive = 0, kOff = 1, kSerial = 2 };

struct LoadWatch {
  std::atomic<int64_t> policy{static_cast<int64_t>(initial_policy())};
  std::atomic<int64_t> contended_until{0};  // CLOCK_MONOTONIC ns; 0: never contended
  std::atomic<int64_t> last_join{0};        // when a join was last timed
  std::atomic<int64_t> last_slow_join{-kSlowJoinPairNs};  // when a join was last slow
  std::atomic<int64_t> slow_join{kSlowJoinNs};
  std::atomic<int64_t> joins{0}, slow_joins{0}, serial_ops{0};
  std::atomic<int64_t> samples{0}, busy_samples{0};  // load_watch.cpp's CPU-time windows

  static LoadPolicy initial_policy() {
    const char* v = std::getenv("SLIMOPS_LOAD_POLICY");
    if (v != nullptr && std::strcmp(v, "off") == 0) return LoadPolicy::kOff;
    if (v != nullptr && std::strcmp(v, "serial") == 0) return LoadPolicy::kSerial;
    return LoadPolicy::kAdaptive;
  }
};

inline LoadWatch& load_watch() {
  static LoadWatch watch;  // one per process (an inline function's static: one per library)
  return watch;
}

inline int64_t monotonic_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

inline LoadPolicy load_policy() {
  return static_cast<LoadPolicy>(load_watch().policy.load(std::memory_order_relaxed));
}

// True while ops should run serial: the policy says so, or a sign of load was seen in the
// last kContendedHoldNs (`now_ns`: the caller's clock reading, if it has one).
inline bool machine_contended(int64_t now_ns = -1) {
  const LoadPolicy policy = load_policy();
  if (policy != LoadPolicy::kAdaptive) return policy == LoadPolicy::kSerial;
  const int64_t until = load_watch().contended_until.load(std::memory_order_relaxed);
  return until != 0 && (now_ns < 0 ? monotonic_ns() : now_ns) < until;
}

inline void mark_contended(int64_t now_ns) {
  load_watch().contended_until.store(now_ns + kContendedHoldNs, std::memory_order_relaxed);
}

// Called once by each team thread other than the first, as it starts its part of a region
// opened at `opened_ns`.
inline void note_join(int64_t opened_ns) {
  LoadWatch& w = load_watch();
  const int64_t now = monotonic_ns();
  w.joins.fetch_add(1, std::memory_order_relaxed);
  w.last_join.store(now, std::memory_order_relaxed);
  if (now - opened_ns > w.slow_join.load(std::memory_order_relaxed)) {
    w.slow_joins.fetch_add(1, std::memory_order_relaxed);
    const int64_t previous = w.last_slow_join.exchange(now, std::memory_order_relaxed);
    if (now - previous < kSlowJoinPairNs || machine_contended(now)) mark_contended(now);
  }
}

// load_watch.cpp: at most every 200 ms, true when other processes left the CPUs this process
// may run on less than a team of `threads` needs since the last sample (counted in
// LoadWatch::samples / busy_samples); false between samples and where /proc cannot be read.
// probe_team calls it once next_sample_ns has passed.
bool sample_others_load(int64_t now_ns, int64_t threads);

// When the next CPU-time window may close (load_watch.cpp sets it): an op between samples
// reads one atomic, not the sampler's lock.
inline std::atomic<int64_t>& next_sample_ns() {
  static std::atomic<int64_t> next{0};
  return next;
}

template <typename F>
void watched_parallel_for(int64_t begin, int64_t end, int64_t grain, const F& fn);

// Under the adaptive policy, samples the machine's other load (load_watch.cpp, every 200 ms)
// and opens an empty region to time the team's join unless a join was timed in the last
// kProbeIntervalNs (or another thread is probing), contended or not: while the ops run serial
// nothing else times a join (a probe on a busy machine costs up to a time slice, a few % at
// one per 100 ms, against the 2-10x a two-thread op loses). Outside a region, with more than
// one thread.
// `now`: the caller's clock reading (monotonic_ns); `threads`: the team's size.
inline void probe_team(int64_t now, int64_t threads) {
  LoadWatch& w = load_watch();
  if (load_policy() != LoadPolicy::kAdaptive) return;
  if (now >= next_sample_ns().load(std::memory_order_relaxed) &&
      sample_others_load(now, threads))
    mark_contended(now);
  int64_t last = w.last_join.load(std::memory_order_relaxed);
  if (now - last < kProbeIntervalNs || !w.last_join.compare_exchange_strong(last, now)) return;
  watched_parallel_for(0, threads, 1, [](int64_t, int64_t) {});
}

// The calling thread's OpenMP and MKL thread counts, as serial_threads found them.
struct SavedThreads {
  int omp = 0;  // 0: nothing was changed
  int mkl = 0;
};

// When the machine is contended (probing first) and the calling thread has a team outside a
// region: sets the calling thread's OpenMP and MKL thread counts to 1, so everything it runs
// next (slimops' regions, BLAS, oneDNN, aten) sees one thread as under
// torch.set_num_threads(1), and returns what restore_threads puts back. Only per-thread
// settings change, nothing global (torch.set_num_threads would also resize torch's
// pthreadpool, creating threads on every call).
inline SavedThreads serial_threads() {
  SavedThreads saved;
  if (at::in_parallel_region()) return saved;
  const int64_t threads = at::get_num_threads();
  if (threads == 1) return saved;
  const int64_t now = monotonic_ns();
  probe_team(now, threads);
  if (!machine_contended(now)) return saved;
#ifdef _OPENMP  // a build without OpenMP has no team (at::parallel_for runs inline)
  saved.omp = omp_get_max_threads();
  omp_set_num_threads(1);
  if (MKL_Set_Num_Threads_Local != nullptr) saved.mkl = MKL_Set_Num_Threads_Local(1);
  load_watch().serial_ops.fetch_add(1, std::memory_order_relaxed);
#endif
  return saved;
}

inline void restore_threads(const SavedThreads& saved) {
  if (saved.omp == 0) return;
#ifdef _OPENMP
  omp_set_num_threads(saved.omp);
  if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(saved.mkl);
#endif
}

// Around every CPU op (registered through serial_when_contended below): the op runs serial
// while the machine is contended, and the thread counts come back on exit.
class LoadScope {
 public:
  LoadScope() : saved_(serial_threads()) {}
  ~LoadScope() { restore_threads(saved_); }
  LoadScope(const LoadScope&) = delete;
  LoadScope& operator=(const LoadScope&) = delete;

 private:
  SavedThreads saved_;
};

// serial_when_contended<&op>::call is `op` run inside a LoadScope, for TORCH_LIBRARY_IMPL.
template <auto Fn>
struct serial_when_contended;
template <typename R, typename... Args, R (*Fn)(Args...)>
struct serial_when_contended<Fn> {
  static R call(Args... args) {
    LoadScope scope;
    return Fn(std::forward<Args>(args)...);
  }
};

// at::parallel_for that records the team's join (rule 5): fn(begin, end) as at::parallel_for
// calls it.
template <typename F>
void watched_parallel_for(int64_t begin, int64_t end, int64_t grain, const F& fn) {
  const int64_t opened = monotonic_ns();
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
    if (at::get_thread_num() != 0) note_join(opened);
    fn(b, e);
  });
}

// ---- Rules 1-4 ------------------------------------------------------------------------------

// Below this many scalar operations (multiply-adds, element updates) a pass runs on one
// thread. Entering an OpenMP region costs microseconds on an idle 2-core machine (tens of
// thousands of vector multiply-adds) and up to a scheduler slice when the other core is busy,
// so the cut errs high: 128K operations, ~10-30 us of one core's vector work.
constexpr int64_t kParallelWork = int64_t{1} << 17;

// True when a pass of `work` scalar operations should use the thread team.
inline bool worth_threads(int64_t work) {
  return work >= kParallelWork && at::get_num_threads() > 1 && !at::in_parallel_region();
}

// Runs fn(task) for every task in [0, tasks), once each, on the thread team when the whole pass
// is at least kParallelWork operations (`work_per_task` each), else inline. Threads claim tasks
// dynamically (see rule 2 above). Tasks must be independent.
template <typename F>
void run_tasks(int64_t tasks, int64_t work_per_task, const F& fn) {
  if (tasks <= 0) return;
  const int64_t threads = at::get_num_threads();
  if (tasks == 1 || !worth_threads(tasks * std::max<int64_t>(1, work_per_task))) {
    for (int64_t t = 0; t < tasks; ++t) fn(t);
    return;
  }
  std::atomic<int64_t> next{0};
  watched_parallel_for(0, std::min(threads, tasks), 1, [&](int64_t, int64_t) {
    for (int64_t t = next.fetch_add(1, std::memory_order_relaxed); t < tasks;
         t = next.fetch_add(1, std::memory_order_relaxed))
      fn(t);
  });
}

// Splits `items` items of `work_per_item` operations each into tasks of at least ~32K
// operations (and at least 4 tasks per thread when there is enough work, so that claiming
// balances the load), and runs fn(begin, end) over each range with run_tasks.
template <typename F>
void run_ranges(int64_t items, int64_t work_per_item, const F& fn) {
  if (items <= 0) return;
  const int64_t work = std::max<int64_t>(1, work_per_item);
  const int64_t threads = at::get_num_threads();
  int64_t per_task = std::max<int64_t>(1, at::internal::GRAIN_SIZE / work);
  per_task = std::min(per_task, std::max<int64_t>(1, items / (4 * threads)));
  if (!worth_threads(items * work)) per_task = items;
  const int64_t tasks = (items + per_task - 1) / per_task;
  run_tasks(tasks, per_task * work, [&](int64_t t) {
    fn(t * per_task, std::min(items, (t + 1) * per_task));
  });
}

// A per-thread scratch buffer that keeps its memory between calls. glibc hands large blocks
// straight back to the OS on free, so a fresh multi-MB buffer per call pays page faults on
// every touch (measured: up to 2x a small CNN's step); a buffer that stays costs nothing after
// the first call. Each kernel uses its own slot so that buffers in use at once never alias.
enum class ScratchSlot : int {
  kCols,
  kGradT,
  kTmp,
  kField,
  kWinogradIn,      // conv2d_winograd.cpp: transformed input tiles
  kWinogradOut,     // transformed products or output-gradient tiles
  kWinogradWeight,  // transformed filters or their gradient
  kNarrowGemm,      // gemm_narrow.cpp: B packed, C's padded rows
  kPoolField,       // max_pool.cpp: a plane's padded, phase-split rows
  kCount
};

template <typename scalar_t>
scalar_t* scratch(ScratchSlot slot, int64_t count) {
  thread_local std::vector<double> buffers[static_cast<int>(ScratchSlot::kCount)];
  std::vector<double>& buf = buffers[static_cast<int>(slot)];
  const int64_t doubles = (count * static_cast<int64_t>(sizeof(scalar_t)) + 7) / 8;
  if (static_cast<int64_t>(buf.size()) < doubles) {
    buf.clear();
    buf.shrink_to_fit();
    buf.resize(static_cast<size_t>(doubles));
  }
  return reinterpret_cast<scalar_t*>(buf.data());
}

}  // namespace cpu
}  // namespace slimops
