// A fork/join pool of persistent threads for the CPU kernels. ParallelFor(n, fn) runs fn(i) for
// every i in [0, n) on the caller and the workers, which claim indices from a shared counter. The
// caller never waits for a worker that has not started: on shared, oversubscribed cores a
// preempted worker simply claims nothing and the caller does the work. Workers spin briefly
// between calls (a forward step issues hundreds of back-to-back kernels) and then sleep, so an
// idle engine costs no CPU.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

namespace dyn {

class ThreadPool {
 public:
  // num_threads >= 1 counts the calling thread.
  explicit ThreadPool(int num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return num_threads_; }

  // Calls fn(i) once for each i in [0, n), in any order and on any thread; returns when all are
  // done. Not reentrant; one caller thread at a time.
  template <class Fn>
  void ParallelFor(int64_t n, Fn&& fn) {
    if (n <= 0) return;
    if (num_threads_ == 1 || n == 1) {
      for (int64_t i = 0; i < n; ++i) fn(i);
      return;
    }
    auto trampoline = [](void* ctx, int64_t i) { (*static_cast<std::remove_reference_t<Fn>*>(ctx))(i); };
    Dispatch(trampoline, const_cast<void*>(static_cast<const void*>(&fn)), n);
  }

 private:
  using Task = void (*)(void* ctx, int64_t index);
  void Dispatch(Task task, void* ctx, int64_t n);
  // Claims and runs indices of job `epoch` until none are left.
  void Drain(uint32_t epoch);
  void WorkerLoop();

  int num_threads_;
  std::vector<std::thread> workers_;
  std::atomic<Task> task_{nullptr};
  std::atomic<void*> ctx_{nullptr};
  std::atomic<int64_t> count_{0};
  // High 32 bits: job epoch; low 32 bits: next unclaimed index, or 0xFFFFFFFF while Dispatch
  // writes the job (next_ leaves the old epoch first, so a late worker cannot claim an index of
  // the old job once the task and count it reads may be the new job's).
  std::atomic<uint64_t> next_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<bool> stop_{false};
  std::atomic<int> sleepers_{0};
  std::mutex mu_;
  std::condition_variable cv_;
};

}  // namespace dyn
