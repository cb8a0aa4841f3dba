// Work sharing for the CPU handler on the thread pool XLA gives custom calls (the pool
// that runs XLA:CPU's own compute). Loop items are claimed from a shared counter by the
// calling thread and by helper tasks; every item is run by exactly one thread, so a
// result written per item does not depend on how many threads took part.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace samoyeds {

// SAMOYEDS_CPU_THREADS=n caps the threads of one call (1: the calling thread alone); any
// n >= 1 gives the same bits. Unset: the size of XLA's pool. Read per call, so that a
// process can compare thread counts.
inline int CpuWorkers(xla::ffi::ThreadPool& pool) {
  if (const char* env = std::getenv("SAMOYEDS_CPU_THREADS")) {
    const long n = std::strtol(env, nullptr, 10);
    if (n >= 1) return static_cast<int>(n < 256 ? n : 256);
  }
  const int64_t n = pool.num_threads();
  return n >= 1 ? static_cast<int>(n < 256 ? n : 256) : 1;
}

namespace internal {

struct LoopState {
  std::atomic<int64_t> next{0};
  std::atomic<int> ids{1};  // worker id 0 is the calling thread
  int64_t count = 0;
  const void* fn = nullptr;
  void (*call)(const void* fn, int64_t item, int worker) = nullptr;
  std::mutex mu;
  std::condition_variable finished;
  int64_t done = 0;  // items finished, under mu
};

inline void RunItems(LoopState& s, int worker) {
  int64_t mine = 0;
  for (int64_t i; (i = s.next.fetch_add(1, std::memory_order_relaxed)) < s.count; ++mine)
    s.call(s.fn, i, worker);
  if (mine == 0) return;
  std::lock_guard<std::mutex> lock(s.mu);
  s.done += mine;
  if (s.done == s.count) s.finished.notify_all();
}

}  // namespace internal

// Runs fn(item, worker) for every item in [0, count) on at most `workers` threads, the
// calling one included; worker ids lie in [0, workers). Returns when every item is done.
// XLA's pool may start a helper late, or run it inline: the caller waits only for items
// that a thread has claimed, never for a helper to start, and a helper that starts after
// the loop has nothing left to claim (its state is shared, so it may outlive the call).
// May throw std::bad_alloc (the shared state, the pool's task); fn must not throw.
template <typename Fn>
void ParallelFor(xla::ffi::ThreadPool& pool, int workers, int64_t count, const Fn& fn) {
  const int64_t helpers = (workers < count ? workers : count) - 1;
  if (helpers <= 0) {
    for (int64_t i = 0; i < count; ++i) fn(i, 0);
    return;
  }
  auto state = std::make_shared<internal::LoopState>();
  state->count = count;
  state->fn = &fn;
  state->call = [](const void* f, int64_t item, int worker) {
    (*static_cast<const Fn*>(f))(item, worker);
  };
  for (int64_t h = 0; h < helpers; ++h)
    pool.Schedule([state] {
      internal::RunItems(*state, state->ids.fetch_add(1, std::memory_order_relaxed));
    });
  internal::RunItems(*state, 0);
  std::unique_lock<std::mutex> lock(state->mu);
  state->finished.wait(lock, [&] { return state->done == state->count; });
}

}  // namespace samoyeds
