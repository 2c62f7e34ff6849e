// A fork/join pool of persistent threads for the CPU kernels. Run() hands one function to every
// thread (the caller is thread 0) and returns when all are done. Workers spin briefly between
// calls (a forward step issues hundreds of back-to-back kernels) and then sleep, so an idle
// engine costs no CPU.
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

  // Calls fn(thread_index, num_threads) on every thread; not reentrant.
  template <class Fn>
  void Run(Fn&& fn) {
    if (num_threads_ == 1) {
      fn(0, 1);
      return;
    }
    auto trampoline = [](void* ctx, int tid, int n) { (*static_cast<std::remove_reference_t<Fn>*>(ctx))(tid, n); };
    Dispatch(trampoline, const_cast<void*>(static_cast<const void*>(&fn)));
  }

 private:
  using Task = void (*)(void* ctx, int tid, int n);
  void Dispatch(Task task, void* ctx);
  void WorkerLoop(int tid);

  int num_threads_;
  std::vector<std::thread> workers_;
  Task task_ = nullptr;
  void* ctx_ = nullptr;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<bool> stop_{false};
  std::mutex mu_;
  std::condition_variable cv_;
};

}  // namespace dyn
