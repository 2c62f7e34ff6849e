#include "engine/native/backend/cpu/thread_pool.h"

#include "engine/native/backend/cpu/simd.h"

namespace dyn {
namespace {
// About 100 us of spinning: longer than the gap between kernels of one step, far shorter than
// the gap between steps of an idle engine.
constexpr int kSpinIterations = 20000;
// Spinning waits give the core away every kYieldEvery pauses: on an oversubscribed machine the
// scheduler may put the caller and a worker on one core, and a pure spin there would hold the
// core for a whole time slice while the thread it waits for cannot run.
constexpr int kYieldEvery = 64;
uint32_t EpochOf(uint64_t v) { return static_cast<uint32_t>(v >> 32); }
// The index of an epoch whose job Dispatch is still writing: nothing to claim yet.
constexpr uint64_t kPublishing = 0xFFFFFFFFu;
bool Ready(uint64_t v, uint32_t seen) { return EpochOf(v) != seen && (v & 0xFFFFFFFFu) != kPublishing; }
}  // namespace

ThreadPool::ThreadPool(int num_threads) : num_threads_(num_threads < 1 ? 1 : num_threads) {
  for (int t = 1; t < num_threads_; ++t) workers_.emplace_back([this] { WorkerLoop(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_.store(true);
    next_.fetch_add(uint64_t{1} << 32);
  }
  cv_.notify_all();
  for (auto& w : workers_) w.join();
}

void ThreadPool::Drain(uint32_t epoch) {
  for (;;) {
    uint64_t v = next_.load(std::memory_order_seq_cst);
    // The task and count were written before the epoch was published; they stay valid while an
    // index of this epoch is unclaimed, because the caller waits for every claimed index.
    const Task task = task_.load(std::memory_order_relaxed);
    void* ctx = ctx_.load(std::memory_order_relaxed);
    const int64_t count = count_.load(std::memory_order_relaxed);
    // Pairs with Dispatch's release fence: if any of the three is the next job's, next_ has left
    // `epoch` for this thread too, and the compare-exchange below fails.
    std::atomic_thread_fence(std::memory_order_acquire);
    if (EpochOf(v) != epoch || static_cast<int64_t>(v & 0xFFFFFFFFu) >= count) return;
    if (!next_.compare_exchange_weak(v, v + 1, std::memory_order_seq_cst)) continue;
    task(ctx, static_cast<int64_t>(v & 0xFFFFFFFFu));
    done_.fetch_add(1, std::memory_order_seq_cst);
  }
}

void ThreadPool::Dispatch(Task task, void* ctx, int64_t n) {
  const uint32_t epoch = EpochOf(next_.load(std::memory_order_relaxed)) + 1;
  // next_ leaves the previous epoch before the job's fields change: a worker still in Drain of it
  // holds an index of that epoch it has not claimed yet, and without this step could read the new
  // task and count and still claim that stale index (next_ unchanged), running the new task before
  // it is published and adding one to done_ too many - a wait that never ends or ends early.
  next_.store((static_cast<uint64_t>(epoch) << 32) | kPublishing, std::memory_order_seq_cst);
  std::atomic_thread_fence(std::memory_order_release);
  task_.store(task, std::memory_order_relaxed);
  ctx_.store(ctx, std::memory_order_relaxed);
  count_.store(n, std::memory_order_relaxed);
  done_.store(0, std::memory_order_relaxed);
  next_.store(static_cast<uint64_t>(epoch) << 32, std::memory_order_seq_cst);
  if (sleepers_.load(std::memory_order_seq_cst) > 0) {
    std::lock_guard<std::mutex> lock(mu_);
    cv_.notify_all();
  }
  Drain(epoch);
  // Only indices a running worker already claimed are left.
  for (int spins = 1; done_.load(std::memory_order_seq_cst) != n; ++spins) {
    if (spins % kYieldEvery == 0) {
      std::this_thread::yield();
    } else {
      _mm_pause();
    }
  }
}

void ThreadPool::WorkerLoop() {
  uint32_t seen = 0;
  for (;;) {
    int spins = 0;
    uint64_t v;
    while (!Ready(v = next_.load(std::memory_order_seq_cst), seen)) {
      if (++spins < kSpinIterations) {
        if (spins % kYieldEvery == 0) {
          std::this_thread::yield();
        } else {
          _mm_pause();
        }
        continue;
      }
      std::unique_lock<std::mutex> lock(mu_);
      sleepers_.fetch_add(1, std::memory_order_seq_cst);
      cv_.wait(lock, [&] { return Ready(next_.load(std::memory_order_seq_cst), seen); });
      sleepers_.fetch_sub(1, std::memory_order_relaxed);
      spins = 0;
    }
    seen = EpochOf(v);
    if (stop_.load()) return;
    Drain(seen);
  }
}

}  // namespace dyn
