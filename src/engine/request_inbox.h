// The hand-off between an engine's Generate (any thread) and its step thread, shared by the
// engines that run a step loop (native, mocker): requests queue here, the step thread takes them
// at step boundaries, and closing the inbox wakes it to shut down.
#pragma once

#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "engine/engine.h"

namespace dyn {

struct IncomingRequest {
  PreprocessedRequest request;
  std::shared_ptr<RequestContext> context;
  OutputSink sink;
};

// Ends a stream with one final delta.
inline void EndStream(const OutputSink& sink, FinishReason reason, std::string error = {}) {
  EngineOutput out;
  out.finish_reason = reason;
  out.error = std::move(error);
  sink(std::move(out));
}

class RequestInbox {
 public:
  // Queues the request, or, once closed, ends its stream with an error.
  void Push(PreprocessedRequest request, std::shared_ptr<RequestContext> context, OutputSink sink) {
    {
      std::lock_guard lock(mu_);
      if (!closed_) {
        queue_.push_back({std::move(request), std::move(context), std::move(sink)});
        cv_.notify_one();
        return;
      }
    }
    EndStream(sink, FinishReason::kError, "engine is shut down");
  }

  // Step thread: moves what arrived into `out` (after waiting for something when `wait_if_empty`).
  // False once closed.
  bool Take(std::vector<IncomingRequest>* out, bool wait_if_empty) {
    std::unique_lock lock(mu_);
    if (wait_if_empty) cv_.wait(lock, [&] { return closed_ || !queue_.empty(); });
    if (closed_) return false;
    out->swap(queue_);
    return true;
  }

  // Step thread: sleeps until `deadline` or until closed; false if closed.
  bool SleepUntil(std::chrono::steady_clock::time_point deadline) {
    std::unique_lock lock(mu_);
    return !cv_.wait_until(lock, deadline, [&] { return closed_; });
  }

  void Close() {
    std::lock_guard lock(mu_);
    closed_ = true;
    cv_.notify_one();
  }

  // After the step thread has stopped: ends every request still queued as cancelled.
  void CancelRemaining() {
    std::vector<IncomingRequest> rest;
    {
      std::lock_guard lock(mu_);
      rest.swap(queue_);
    }
    for (IncomingRequest& in : rest) EndStream(in.sink, FinishReason::kCancelled);
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<IncomingRequest> queue_;
  bool closed_ = false;
};

// What every step-loop engine does the same way: Generate queues into the inbox, Metrics returns
// the copy the step thread last published (under metrics_mu_), Shutdown closes the inbox and joins
// the step thread. A derived engine starts thread_ last in its constructor and calls Shutdown() in
// its destructor, so its own members outlive the thread.
class StepLoopEngine : public Engine {
 public:
  void Generate(PreprocessedRequest request, std::shared_ptr<RequestContext> context, OutputSink sink) override {
    inbox_.Push(std::move(request), std::move(context), std::move(sink));
  }
  EngineMetrics Metrics() const override {
    std::lock_guard lock(metrics_mu_);
    return metrics_;
  }
  void Shutdown() override {
    inbox_.Close();
    if (thread_.joinable()) thread_.join();
  }

 protected:
  RequestInbox inbox_;
  mutable std::mutex metrics_mu_;
  EngineMetrics metrics_;
  std::thread thread_;  // the step thread
};

}  // namespace dyn
