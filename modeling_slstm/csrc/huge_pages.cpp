// Weights that stream from memory, backed by 2 MiB pages. A decoding step reads every weight once; from 4 KiB pages
// that is a TLB miss every 4 KiB and a restart of the hardware prefetchers at every page boundary. Measured at the
// 125m preset (batch 1, alternated in one process, weights collapsed vs not): float32 step 17.7 -> 14.3 ms, bfloat16
// 10.0 -> 9.4 ms, batch 8 29.4 -> 27.0 ms; a streaming read of the same bytes gains as much.
//
// The kernels hand every weight they stream to advise_huge_pages. Its 2 MiB-aligned regions are queued, and a
// background thread asks Linux to back each with a huge page (madvise MADV_COLLAPSE, Linux 6.1+): the contents stay
// exactly as they are, the copy (~1 GB/s) never holds up a call, and a region that cannot be collapsed (not anonymous
// memory, no huge page free, an older kernel) stays as it was. A region's edges may hold other memory of the process,
// backed the same way, contents unchanged. A weight seen again kAgain after it was queued is queued again (a region
// already huge returns at once): memory freed and reused by the next model's weights, a refusal that was passing.
// Left alone: a region with a page this process shares with another (copy-on-write after a fork: a collapse would
// copy it, and a prefork server's workers would each hold their own copy of the weights), a machine whose
// administrator disabled huge pages (transparent_hugepage/enabled = never), SLSTM_HUGE_PAGES=0 (or false, off, no),
// and a forked child (it asks for nothing; the worker thread stays behind in the parent).

#include <fcntl.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <string>
#include <system_error>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "slstm_cpu.h"

#if defined(__linux__) && !defined(MADV_COLLAPSE)
#define MADV_COLLAPSE 25  // the value since Linux 6.1; older headers lack it, older kernels refuse it (EINVAL)
#endif

namespace {

using Clock = std::chrono::steady_clock;
constexpr uintptr_t kHugePage = 2 << 20, kPage = 4096;
constexpr Clock::duration kAgain = std::chrono::seconds(10);
constexpr int64_t kMaxBytes = int64_t{1} << 46;  // more than any weight: a wild size asks for nothing

struct Advice {
  std::mutex lock;
  std::condition_variable changed;
  std::unordered_map<const void*, std::pair<int64_t, Clock::time_point>> tensors;  // bytes queued, and when
  std::unordered_set<uintptr_t> pending;  // regions queued or being collapsed
  std::vector<uintptr_t> queue;           // regions to collapse
  bool worker = false;                    // the worker thread runs (in this process)
  bool off = false;

  void stop() { queue.clear(), pending.clear(), off = true; }  // with the lock held: nothing more is asked for
};

bool switched_off() {
  if (const char* env = std::getenv("SLSTM_HUGE_PAGES")) {
    std::string value(env);
    std::transform(value.begin(), value.end(), value.begin(), [](unsigned char c) { return std::tolower(c); });
    if (value == "0" || value == "false" || value == "off" || value == "no") return true;
  }
  std::ifstream sysfs("/sys/kernel/mm/transparent_hugepage/enabled");
  std::string modes;
  std::getline(sysfs, modes);
  return modes.find("[never]") != std::string::npos;
}

// Never destroyed: the worker may still hold it while the process exits.
Advice& advice() {
  static Advice* const state = [] {
    auto* fresh = new Advice;
#if defined(__linux__)
    fresh->off = switched_off();
#else
    fresh->off = true;
#endif
    return fresh;
  }();
  return *state;
}

// From the library's load on: no thread may hold the lock while a fork copies the address space; the child has no
// worker and asks for nothing (its weights are its parent's, shared copy-on-write).
[[maybe_unused]] const int at_fork = pthread_atfork([] { advice().lock.lock(); }, [] { advice().lock.unlock(); }, [] {
  Advice& child = advice();
  child.stop(), child.worker = false;
  child.lock.unlock();
});

// Whether every page of the region that is present is mapped by this process alone (/proc/self/pagemap: bit 63
// present, bit 62 swapped, bit 56 exclusively mapped). Unreadable: no.
bool exclusive(uintptr_t region) {
  static const int pagemap = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
  uint64_t entries[kHugePage / kPage];
  const ssize_t got = pagemap < 0 ? -1 : pread(pagemap, entries, sizeof(entries), region / kPage * sizeof(uint64_t));
  if (got != static_cast<ssize_t>(sizeof(entries))) return false;
  for (const uint64_t entry : entries)
    if ((entry >> 62 & 1) || ((entry >> 63 & 1) && !(entry >> 56 & 1))) return false;
  return true;
}

void collapse_queued() {
#if defined(__linux__)
  // this thread only, 10 below the process: at the 125m preset in float32, the first 40 steps took ~37 ms each beside
  // a worker of the same priority (19 ms without one), ~22 ms at 10 below, which still had every region done within
  // ~4 s of decoding; 19 below, it had done 40 MB after 200 steps
  const id_t self = static_cast<id_t>(syscall(SYS_gettid));
  errno = 0;
  const int base = getpriority(PRIO_PROCESS, self);
  setpriority(PRIO_PROCESS, self, std::min(19, (errno ? 0 : base) + 10));
#endif
  Advice& a = advice();
  std::unique_lock<std::mutex> held(a.lock);
  for (;;) {
    a.changed.wait(held, [&] { return !a.queue.empty(); });
    const uintptr_t region = a.queue.back();
    a.queue.pop_back();
    held.unlock();
#if defined(__linux__)
    if (exclusive(region))
      madvise(reinterpret_cast<void*>(region), kHugePage, MADV_COLLAPSE);  // a refusal leaves the region as it was
#endif
    held.lock();
    a.pending.erase(region);
    a.changed.notify_all();
  }
}

}  // namespace

namespace slstm {

void advise_huge_pages(const void* p, int64_t bytes) {
  if (!p || bytes <= 0 || bytes > kMaxBytes) return;
  Advice& a = advice();
  const Clock::time_point now = Clock::now();
  std::lock_guard<std::mutex> held(a.lock);
  if (a.off) return;
  auto& [queued, when] = a.tensors[p];
  if (queued >= bytes && now - when < kAgain) return;
  queued = bytes, when = now;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(p), end = begin + static_cast<uintptr_t>(bytes);
  bool added = false;
  for (uintptr_t region = begin & ~(kHugePage - 1); region < end; region += kHugePage)
    if (a.pending.insert(region).second) a.queue.push_back(region), added = true;
  if (!added) return;
  if (!a.worker) {
    try {
      std::thread(collapse_queued).detach();
      a.worker = true;
    } catch (const std::system_error&) {  // no thread to be had: leave the pages as they are
      a.stop();
    }
  }
  a.changed.notify_all();
}

void stop_huge_pages() {
  Advice& a = advice();
  std::lock_guard<std::mutex> held(a.lock);
  a.stop();
}

}  // namespace slstm

extern "C" {
// For Python (a streaming floor read from the same pages, tests): advise [p, p + bytes), then with `wait` block until
// every queued region has been tried. Returns the regions still queued or being collapsed.
int64_t slstm_huge_pages(const void* p, int64_t bytes, int wait) {
  slstm::advise_huge_pages(p, bytes);
  Advice& a = advice();
  std::unique_lock<std::mutex> held(a.lock);
  if (wait) a.changed.wait(held, [&] { return a.pending.empty(); });
  return static_cast<int64_t>(a.pending.size());
}
}
