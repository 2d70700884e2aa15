// Weights that stream from memory, backed by 2 MiB pages. A decoding step reads every weight once; from 4 KiB pages
// that is a TLB miss every 4 KiB and a restart of the hardware prefetchers at every page boundary. Measured at the
// 125m preset (batch 1, alternated in one process, weights collapsed vs not): float32 step 17.7 -> 14.3 ms, bfloat16
// 10.0 -> 9.4 ms, batch 8 29.4 -> 27.0 ms; a streaming read of the same bytes gains as much.
//
// The kernels hand every weight they stream to advise_huge_pages. Each 2 MiB-aligned region it touches is queued once
// per process, and a background thread asks Linux to back it with a huge page (madvise MADV_COLLAPSE, Linux 6.1+):
// the contents stay exactly as they are, the copy (~1 GB/s) never holds up a call, and a region that cannot be
// collapsed (not anonymous memory, no huge page free, an older kernel) stays as it was. A region's edges may hold
// other memory of the process, which is backed the same way, contents unchanged. SLSTM_HUGE_PAGES=0 turns it off.
// A forked child does not advise (the worker thread stays behind in the parent).

#include <pthread.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
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

constexpr uintptr_t kHugePage = 2 << 20;

struct Advice {
  std::mutex lock;
  std::condition_variable changed;
  std::unordered_map<const void*, int64_t> tensors;  // bytes queued from each address: a lookup per weight and call
  std::unordered_set<uintptr_t> regions;    // regions already queued
  std::vector<uintptr_t> queue;             // regions to collapse
  int64_t busy = 0;                         // regions queued or being collapsed
  bool worker = false;                      // the worker thread runs (in this process)
  bool off = false;                         // SLSTM_HUGE_PAGES=0, not Linux, or a forked child
};

// Never destroyed: the worker may still hold it while the process exits.
Advice& advice() {
  static Advice* a = [] {
    auto* a = new Advice;
    const char* env = std::getenv("SLSTM_HUGE_PAGES");
#if defined(__linux__)
    a->off = env && std::strcmp(env, "0") == 0;
#else
    a->off = true;
#endif
    // fork: no thread may hold the lock while the address space is copied; the child has no worker and stays off
    pthread_atfork([] { advice().lock.lock(); }, [] { advice().lock.unlock(); }, [] {
      Advice& c = advice();
      c.queue.clear(), c.busy = 0, c.worker = false, c.off = true;
      c.lock.unlock();
    });
    return a;
  }();
  return *a;
}

void collapse_queued() {
#if defined(__linux__)
  // this thread only, below the kernels' team: at the 125m preset in float32, the first 40 steps took ~37 ms each
  // beside a worker of the same priority (19 ms without one), ~22 ms at nice 10, which still had every region done
  // within ~4 s of decoding; at nice 19 it had done 40 MB after 200 steps
  setpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)), 10);
#endif
  Advice& a = advice();
  std::unique_lock<std::mutex> held(a.lock);
  for (;;) {
    a.changed.wait(held, [&] { return !a.queue.empty(); });
    const uintptr_t region = a.queue.back();
    a.queue.pop_back();
    held.unlock();
#if defined(__linux__)
    madvise(reinterpret_cast<void*>(region), kHugePage, MADV_COLLAPSE);  // a failure leaves the region as it was
#endif
    held.lock();
    --a.busy;
    a.changed.notify_all();
  }
}

}  // namespace

namespace slstm {

void advise_huge_pages(const void* p, int64_t bytes) {
  if (!p || bytes <= 0) return;
  Advice& a = advice();
  std::lock_guard<std::mutex> held(a.lock);
  if (a.off) return;
  int64_t& queued = a.tensors[p];
  if (queued >= bytes) return;
  queued = bytes;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(p), end = begin + static_cast<uintptr_t>(bytes);
  int64_t added = 0;
  for (uintptr_t region = begin & ~(kHugePage - 1); region < end; region += kHugePage)
    if (a.regions.insert(region).second) a.queue.push_back(region), ++added;
  if (!added) return;
  a.busy += added;
  if (!a.worker) {
    try {
      std::thread(collapse_queued).detach();
      a.worker = true;
    } catch (const std::system_error&) {  // no thread to be had: leave the pages as they are
      a.queue.clear(), a.busy = 0, a.off = true;
    }
  }
  a.changed.notify_all();
}

}  // namespace slstm

extern "C" {
// For Python (a streaming floor read from the same pages, tests): advise [p, p + bytes), then with `wait` block until
// every queued region has been tried. Returns the regions still queued or being collapsed.
int64_t slstm_huge_pages(const void* p, int64_t bytes, int wait) {
  slstm::advise_huge_pages(p, bytes);
  Advice& a = advice();
  std::unique_lock<std::mutex> held(a.lock);
  if (wait) a.changed.wait(held, [&] { return a.busy == 0; });
  return a.busy;
}
}
