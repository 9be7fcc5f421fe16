// The load watch's second signal (parallel.h, rule 5): how much of the CPUs this process may
// run on other processes used since the last sample.
//
// Why a second signal: a join timed late proves a busy core, but one timed early proves
// little. libgomp's workers spin for a while after each region, so on a machine where another
// process held one of the two cores, 65-73% of the joins timed here were still fast
// (S-MobileNet v2 and S-ResNet-50 eval, 2-core Intel Xeon); the ops ran serial, timed no more
// joins, the mark ran out, and a step started on two threads again. The CPU time the machine
// spent outside this process does not depend on what the team was doing: /proc/stat's busy
// time of the CPUs in this thread's affinity mask (steal time counted: a hypervisor giving the
// vCPU to another guest is the same loss), minus this process's own CPU time (getrusage), over
// the window between two samples. When what is left of those CPUs is less than the team needs
// (its threads less half a core), the team would wait on a busy core: the machine is
// contended.
//
// Linux only; elsewhere (or where /proc/stat cannot be read) the sampler reports nothing and
// the joins alone decide.
#include "cpu/parallel.h"

#include <sched.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>

namespace slimops {
namespace cpu {
namespace {

// Windows shorter than this are too coarse for /proc/stat's ticks (10 ms each). Longer than
// kMaxWindowNs the average says little about now, and the sample only starts a new window;
// up to that, a long window is still the best guess (a load that ended during it costs one
// kContendedHoldNs on one thread, then 200 ms windows clear it).
constexpr int64_t kMinWindowNs = 200 * 1000 * 1000;
constexpr int64_t kMaxWindowNs = int64_t{30} * 1000 * 1000 * 1000;

// Busy ticks of the CPUs in `mask` (user + nice + system + irq + softirq + steal) and how many
// of them /proc/stat listed; false when it cannot be read.
bool read_busy_ticks(const cpu_set_t& mask, int64_t& busy, int& cpus) {
  std::FILE* f = std::fopen("/proc/stat", "r");
  if (f == nullptr) return false;
  busy = 0;
  cpus = 0;
  char line[512];
  while (std::fgets(line, sizeof(line), f) != nullptr) {
    if (line[0] != 'c' || line[1] != 'p' || line[2] != 'u') break;  // the cpu lines come first
    if (line[3] < '0' || line[3] > '9') continue;                   // the "cpu " total
    char* p = line + 3;
    const long id = std::strtol(p, &p, 10);
    if (id < 0 || id >= CPU_SETSIZE || !CPU_ISSET(id, &mask)) continue;
    long long v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (long long& x : v) x = std::strtoll(p, &p, 10);
    // user nice system idle iowait irq softirq steal
    busy += v[0] + v[1] + v[2] + v[5] + v[6] + v[7];
    ++cpus;
  }
  std::fclose(f);
  return cpus > 0;
}

int64_t own_cpu_ns() {
  rusage u;
  if (getrusage(RUSAGE_SELF, &u) != 0) return -1;
  return (static_cast<int64_t>(u.ru_utime.tv_sec) + u.ru_stime.tv_sec) * 1000000000 +
         (static_cast<int64_t>(u.ru_utime.tv_usec) + u.ru_stime.tv_usec) * 1000;
}

struct Window {
  std::mutex mutex;
  int64_t start_ns = 0, busy_ticks = 0, own_ns = 0;
};

}  // namespace

bool sample_others_load(int64_t now_ns, int64_t threads) {
  static Window window;
  static const int64_t tick_ns = [] {
    const long hz = sysconf(_SC_CLK_TCK);
    return hz > 0 ? int64_t{1000000000} / hz : int64_t{10000000};
  }();
  std::unique_lock<std::mutex> lock(window.mutex, std::try_to_lock);
  if (!lock.owns_lock() || now_ns - window.start_ns < kMinWindowNs) return false;
  next_sample_ns().store(now_ns + kMinWindowNs, std::memory_order_relaxed);
  cpu_set_t mask;
  CPU_ZERO(&mask);
  int64_t busy = 0;
  int cpus = 0;
  const int64_t own = own_cpu_ns();
  if (sched_getaffinity(0, sizeof(mask), &mask) != 0 || own < 0 ||
      !read_busy_ticks(mask, busy, cpus)) {
    window.start_ns = now_ns;  // nothing to read: try again a window later
    return false;
  }
  const bool had_window = window.start_ns != 0 && now_ns - window.start_ns <= kMaxWindowNs;
  const int64_t span = now_ns - window.start_ns;
  const int64_t others_ns = (busy - window.busy_ticks) * tick_ns - (own - window.own_ns);
  window.start_ns = now_ns;
  window.busy_ticks = busy;
  window.own_ns = own;
  if (!had_window) return false;
  load_watch().samples.fetch_add(1, std::memory_order_relaxed);
  // CPUs left to this process, in cores, against what the team needs (its threads less half
  // a core: a team of 2 on 2 CPUs is contended once others take half a core).
  const double left = cpus - static_cast<double>(others_ns) / static_cast<double>(span);
  const bool busy_machine = left < static_cast<double>(threads) - 0.5;
  if (busy_machine) load_watch().busy_samples.fetch_add(1, std::memory_order_relaxed);
  return busy_machine;
}

}  // namespace cpu
}  // namespace slimops
