// "mem" event plane: one bus per process. Each subscription owns a delivery thread and a bounded
// queue, so a slow subscriber neither blocks publishers nor other subscribers; when its queue is
// full the oldest message is dropped (at-most-once, like NATS' slow-consumer handling).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "base/log.h"
#include "runtime/event_plane_internal.h"

namespace dyn::event_plane_internal {
namespace {

struct Message {
  std::string subject;
  std::string payload;
};

std::atomic<uint64_t> g_dropped{0};

struct SubState;
// The delivery thread of the subscription running the current callback, if any; Flush from inside
// a callback must not wait for that callback to finish.
thread_local const SubState* t_delivering = nullptr;

struct SubState {
  SubState(std::string p, EventCallback c, MemQueueLimits l)
      : pattern(std::move(p)), callback(std::move(c)), limits(l) {}

  const std::string pattern;
  const EventCallback callback;
  const MemQueueLimits limits;

  std::mutex mu;
  std::condition_variable wake;  // the delivery thread: a message arrived or stop
  std::condition_variable done_cv;  // Flush: `done` advanced
  std::deque<std::shared_ptr<const Message>> queue;
  size_t queued_bytes = 0;
  uint64_t enqueued = 0;  // messages ever queued
  uint64_t done = 0;      // messages delivered, dropped or discarded at unsubscribe
  uint64_t dropped = 0;
  bool stop = false;

  void Enqueue(const std::shared_ptr<const Message>& m) {
    std::lock_guard<std::mutex> lock(mu);
    if (stop) return;
    // The delivery thread sleeps only on an empty queue (checked under `mu`), so only the first
    // message after it emptied needs a wake-up.
    bool was_empty = queue.empty();
    queue.push_back(m);
    queued_bytes += m->payload.size();
    ++enqueued;
    // Keep the newest message even if it alone exceeds max_bytes.
    while (queue.size() > 1 && (queue.size() > limits.max_messages || queued_bytes > limits.max_bytes)) {
      queued_bytes -= queue.front()->payload.size();
      queue.pop_front();
      ++done;
      ++dropped;
      g_dropped.fetch_add(1, std::memory_order_relaxed);
      // Log the first drop and then at powers of two, so a stuck subscriber cannot flood the log.
      if ((dropped & (dropped - 1)) == 0) {
        DYN_LOG(WARN) << "event plane mem: subscriber '" << pattern << "' is slow, dropped " << dropped
                      << " messages so far";
      }
    }
    if (was_empty) wake.notify_one();
  }

  void Run() {
    std::unique_lock<std::mutex> lock(mu);
    for (;;) {
      wake.wait(lock, [&] { return stop || !queue.empty(); });
      if (stop) return;
      std::shared_ptr<const Message> m = std::move(queue.front());
      queue.pop_front();
      queued_bytes -= m->payload.size();
      lock.unlock();
      t_delivering = this;
      try {
        callback(m->subject, m->payload);
      } catch (const std::exception& e) {
        DYN_LOG(ERROR) << "event plane mem: callback for '" << pattern << "' threw: " << e.what();
      } catch (...) {
        DYN_LOG(ERROR) << "event plane mem: callback for '" << pattern << "' threw";
      }
      t_delivering = nullptr;
      lock.lock();
      ++done;
      done_cv.notify_all();
    }
  }
};

// Never destroyed: subscriptions and their threads may outlive static destruction at exit.
class Bus {
 public:
  static Bus& Get() {
    static Bus* bus = new Bus;
    return *bus;
  }

  void Add(const std::shared_ptr<SubState>& s) {
    std::lock_guard<std::mutex> lock(mu_);
    subs_.push_back(s);
  }

  void Remove(const SubState* s) {
    std::lock_guard<std::mutex> lock(mu_);
    for (size_t i = 0; i < subs_.size(); ++i) {
      if (subs_[i].get() == s) {
        subs_[i] = std::move(subs_.back());
        subs_.pop_back();
        return;
      }
    }
  }

  void Publish(const std::string& subject, std::string_view payload) {
    std::shared_ptr<const Message> m;
    // Queue under the bus lock so that every subscriber sees one publisher's messages in the
    // order they were published.
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& s : subs_) {
      if (!SubjectMatches(s->pattern, subject)) continue;
      // One copy of the message, shared by every matching subscription.
      if (!m) m = std::make_shared<const Message>(Message{subject, std::string(payload)});
      s->Enqueue(m);
    }
  }

  std::vector<std::shared_ptr<SubState>> Snapshot() {
    std::lock_guard<std::mutex> lock(mu_);
    return subs_;
  }

 private:
  std::mutex mu_;
  std::vector<std::shared_ptr<SubState>> subs_;
};

class MemSubscription final : public Subscription {
 public:
  explicit MemSubscription(std::shared_ptr<SubState> state)
      : state_(std::move(state)), thread_([s = state_] { s->Run(); }) {}

  ~MemSubscription() override {
    Bus::Get().Remove(state_.get());
    {
      std::lock_guard<std::mutex> lock(state_->mu);
      state_->stop = true;
      // Queued messages are discarded; a concurrent Flush sees `stop` and stops waiting.
      state_->queue.clear();
      state_->queued_bytes = 0;
      state_->wake.notify_all();
      state_->done_cv.notify_all();
    }
    // Destroyed from its own callback: that callback is the last one; the thread ends after it
    // returns and keeps the state alive through its own reference.
    if (thread_.get_id() == std::this_thread::get_id()) {
      thread_.detach();
    } else {
      thread_.join();
    }
  }

 private:
  std::shared_ptr<SubState> state_;
  std::thread thread_;
};

class MemEventPlane final : public EventPlane {
 public:
  explicit MemEventPlane(MemQueueLimits limits) : limits_(limits) {}

  Status Publish(const std::string& subject, std::string_view payload) override {
    DYN_RETURN_IF_ERROR(ValidateSubject(subject, /*allow_wildcards=*/false));
    if (payload.size() > kMaxPayloadBytes) {
      return Status::TooLarge("event payload of " + std::to_string(payload.size()) + " bytes exceeds " +
                              std::to_string(kMaxPayloadBytes));
    }
    Bus::Get().Publish(subject, payload);
    return Status::Ok();
  }

  Result<std::unique_ptr<Subscription>> Subscribe(const std::string& subject, EventCallback callback) override {
    DYN_RETURN_IF_ERROR(ValidateSubject(subject, /*allow_wildcards=*/true));
    if (!callback) return Status::InvalidArgument("empty event callback");
    auto state = std::make_shared<SubState>(subject, std::move(callback), limits_);
    auto sub = std::make_unique<MemSubscription>(state);
    Bus::Get().Add(state);
    return std::unique_ptr<Subscription>(std::move(sub));
  }

  Status Flush(int timeout_ms) override {
    auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(std::max(timeout_ms, 0));
    for (const auto& s : Bus::Get().Snapshot()) {
      // Called from this subscription's callback: neither that callback nor the messages queued
      // behind it can be delivered while we wait here.
      if (s.get() == t_delivering) continue;
      std::unique_lock<std::mutex> lock(s->mu);
      // Wait only for what is queued now; later publishes must not keep Flush waiting forever.
      uint64_t target = s->enqueued;
      if (!s->done_cv.wait_until(lock, deadline, [&] { return s->stop || s->done >= target; })) {
        return Status::DeadlineExceeded("event plane mem: subscriber '" + s->pattern + "' still has " +
                                        std::to_string(target - s->done) + " messages after " +
                                        std::to_string(timeout_ms) + " ms");
      }
    }
    return Status::Ok();
  }

  std::string Describe() const override { return "mem"; }

 private:
  const MemQueueLimits limits_;
};

}  // namespace

std::unique_ptr<EventPlane> CreateMemEventPlane(MemQueueLimits limits) {
  if (limits.max_messages == 0) limits.max_messages = 1;
  return std::make_unique<MemEventPlane>(limits);
}

uint64_t MemDroppedMessages() { return g_dropped.load(std::memory_order_relaxed); }

}  // namespace dyn::event_plane_internal
