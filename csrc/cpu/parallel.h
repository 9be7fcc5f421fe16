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
#pragma once

#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>  // at::internal::GRAIN_SIZE

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <vector>

namespace slimops {
namespace cpu {

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
  at::parallel_for(0, std::min(threads, tasks), 1, [&](int64_t, int64_t) {
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
