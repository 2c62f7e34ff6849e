// Private pieces shared by the discovery backends (discovery*.cpp). Not part of the API.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "runtime/discovery.h"

namespace dyn::discovery_internal {

Result<std::unique_ptr<Discovery>> CreateMemDiscovery();
Result<std::unique_ptr<Discovery>> CreateFileDiscovery(const std::string& dir);
// urls: "http://host:port" each.
Result<std::unique_ptr<Discovery>> CreateEtcdDiscovery(const std::vector<std::string>& urls);

// Standard base64 (with padding), as etcd's JSON gateway encodes bytes.
std::string Base64Encode(std::string_view in);
Result<std::string> Base64Decode(std::string_view in);

// The smallest key greater than every key that starts with `prefix` (etcd's range_end for a
// prefix); "\0" (one zero byte) for an empty prefix, which etcd reads as "to the end".
std::string PrefixEnd(const std::string& prefix);

// File names for keys: bytes other than [A-Za-z0-9_-] become %XX, so any key (with '/', '.',
// binary) is one safe file name and decoding is exact.
std::string EncodeFileName(std::string_view key);
Result<std::string> DecodeFileName(std::string_view name);

// Joins `thread` unless it is the calling thread (a callback destroying its own watch), in which
// case it is detached: the thread owns its state through a shared_ptr and exits on its own.
void JoinOrDetach(std::thread& thread);

// A watch whose updates come from `State::Loop` on a thread of its own (the file and etcd
// backends). State has `mu`, `cv` and `stop`; destroying the handle sets stop, wakes the loop and
// joins it (or detaches when destroyed from its own callback).
template <class State>
class LoopWatchHandle : public WatchHandle {
 public:
  explicit LoopWatchHandle(std::shared_ptr<State> state) : state_(std::move(state)) {
    thread_ = std::thread(&State::Loop, state_);
  }
  ~LoopWatchHandle() override {
    {
      std::lock_guard lock(state_->mu);
      state_->stop = true;
    }
    state_->cv.notify_all();
    JoinOrDetach(thread_);
  }

 private:
  std::shared_ptr<State> state_;
  std::thread thread_;
};

// Runs one watch's callbacks on a private thread, one at a time and in the order pushed, so
// producers (writers holding a store lock) never call user code.
class CallbackRunner {
 public:
  explicit CallbackRunner(WatchCallback callback);
  ~CallbackRunner();  // Stop()
  CallbackRunner(const CallbackRunner&) = delete;
  CallbackRunner& operator=(const CallbackRunner&) = delete;

  void Push(WatchUpdate update);
  // No callback starts after Stop returns (one may be running if Stop is called from it).
  void Stop();

 private:
  struct State {
    std::mutex mu;
    std::condition_variable cv;
    std::deque<WatchUpdate> queue;
    bool stop = false;
    WatchCallback callback;
  };
  static void Loop(std::shared_ptr<State> state);

  std::shared_ptr<State> state_;
  std::thread thread_;
};

}  // namespace dyn::discovery_internal
