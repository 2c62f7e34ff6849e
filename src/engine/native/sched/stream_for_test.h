// Test helpers shared by the native engine's tests: a Stream that collects one request's deltas
// (Wait() returns once the final one arrived), and deterministic prompts and greedy requests.
#pragma once

#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "engine/engine.h"

namespace dyn::testing {

struct Stream {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<uint32_t> tokens;
  std::vector<TokenLogprob> logprobs;
  std::optional<FinishReason> finish;
  std::string error;
  std::string kv_transfer;  // the final delta's (prefill-only requests)
  int deltas = 0;
  int deltas_after_finish = 0;
  uint32_t prompt_tokens = 0, cached_tokens = 0;

  OutputSink Sink() {
    return [this](EngineOutput&& o) {
      std::lock_guard lock(mu);
      if (finish) ++deltas_after_finish;
      if (deltas++ == 0) {
        prompt_tokens = o.prompt_tokens;
        cached_tokens = o.cached_tokens;
      }
      tokens.insert(tokens.end(), o.token_ids.begin(), o.token_ids.end());
      logprobs.insert(logprobs.end(), o.logprobs.begin(), o.logprobs.end());
      if (o.finish_reason) {
        finish = o.finish_reason;
        error = o.error;
        kv_transfer = o.kv_transfer;
        cv.notify_all();
      }
    };
  }
  bool Wait(std::chrono::milliseconds timeout = std::chrono::seconds(20)) {
    std::unique_lock lock(mu);
    return cv.wait_for(lock, timeout, [&] { return finish.has_value(); });
  }
};

// Polls `pred` until it holds (true) or about 4 s pass (false): for state another thread settles.
inline bool Eventually(const std::function<bool()>& pred) {
  for (int i = 0; i < 800; ++i) {
    if (pred()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return pred();
}

inline std::vector<uint32_t> Prompt(int n, uint32_t seed, int vocab = 64) {
  std::vector<uint32_t> t(n);
  for (int i = 0; i < n; ++i) t[i] = (seed * 2654435761u + i * 40503u) % vocab;
  return t;
}

// A greedy request for `max_tokens` tokens.
inline PreprocessedRequest Request(std::vector<uint32_t> prompt, int max_tokens) {
  PreprocessedRequest r;
  r.request_id = "r";
  r.token_ids = std::move(prompt);
  r.sampling.temperature = 0;
  r.stop.max_tokens = max_tokens;
  return r;
}

}  // namespace dyn::testing
