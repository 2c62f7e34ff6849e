// MockerCore: the algorithm of the mocker engine, a simulated LLM engine for routing and
// planning studies (in the manner of NVIDIA Dynamo's mocker).
//
// It runs the real scheduler (engine/native/sched/scheduler.h) over a real block pool with a
// prefix cache (kv/block_pool.h), so batching, chunked prefill, prefix hits, preemption and KV
// events behave as in the native engine; but instead of a forward pass each step costs a time
// taken from Dynamo's timing model (FACTS.md, "Mocker timing model"):
//   prefill, T = new (uncached) prompt tokens computed in the pass, T > 0:
//     4.209989e-7*T^2 + 1.518344e-2*T + 16.50142 ms
//   decode, when the pass has decode tokens; u = KV blocks in use / total blocks:
//     max(1, -25.74*u^2 + 54.01*u + 5.74) ms
//   a pass that does both costs the sum.
// Output tokens are pseudo-random, a function of (request seed, output index) only, so they do
// not change with batching or preemption; every request gets exactly max_tokens of them.
//
// No threads and no clock: the caller decides what a step's duration means (MockerEngine sleeps
// it, scaled by a speedup ratio; a simulator adds it to virtual time). Not thread-safe.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "base/status.h"
#include "engine/engine.h"
#include "engine/native/sched/scheduler.h"
#include "kv/block_pool.h"

namespace dyn {

// Dynamo's mocker defaults.
struct MockerConfig {
  int block_size = 64;
  int num_blocks = 16384;
  int max_num_seqs = 256;
  int max_num_batched_tokens = 8192;
  bool enable_prefix_caching = true;
  uint32_t vocab_size = 32000;  // output token ids are < vocab_size
};

// The timing model, in milliseconds of simulated time.
double MockerPrefillMs(int new_tokens);  // 0 when new_tokens <= 0
double MockerDecodeMs(double kv_usage);  // kv_usage in [0, 1]

struct MockerRequest {
  uint64_t id = 0;
  std::vector<uint32_t> prompt;
  int max_tokens = 16;
  uint64_t seed = 0;  // output tokens depend only on (seed, index)
};

// One token produced by a step.
struct MockerToken {
  uint64_t id = 0;
  uint32_t token = 0;
  bool finished = false;      // the request's max_tokens-th token; the request is gone
  bool first = false;         // the request's first token
  int prompt_tokens = 0;      // with first
  int cached_tokens = 0;      // with first: prompt tokens served from the prefix cache
};

struct MockerStepResult {
  double duration_ms = 0;  // prefill_ms + decode_ms
  double prefill_ms = 0;
  double decode_ms = 0;
  int prefill_tokens = 0;  // T: tokens computed this pass that were not single-token decodes
  int decode_tokens = 0;
  int batch_size = 0;      // sequences in the pass (0: nothing ran, duration 0)
  double kv_usage = 0;     // used blocks / total after scheduling the pass
  std::vector<MockerToken> tokens;
  std::vector<uint64_t> preempted;
  std::vector<std::pair<uint64_t, Status>> failed;  // removed: they can never fit the pool
  std::vector<uint64_t> cancelled;                  // removed by Cancel before this pass
};

// Fails if a size is < 1 or vocab_size is 0.
Status ValidateMockerConfig(const MockerConfig& config);

class MockerCore {
 public:
  // `config` must pass ValidateMockerConfig.
  explicit MockerCore(const MockerConfig& config);
  ~MockerCore();
  MockerCore(const MockerCore&) = delete;
  MockerCore& operator=(const MockerCore&) = delete;

  // Queues a request. Fails, queueing nothing, on an empty prompt, max_tokens < 1, a used id, or
  // when prompt + max_tokens tokens could not fit the pool even alone.
  Status Add(MockerRequest request);

  // Marks a request for removal; its blocks are freed at the start of the next Step. False if
  // the id is unknown (finished, failed or never added).
  bool Cancel(uint64_t id);

  // Runs one pass: removes cancelled requests, schedules a batch, computes its duration and
  // produces a token for every sequence whose chunk reached its end.
  MockerStepResult Step();

  bool Contains(uint64_t id) const { return reqs_.count(id) != 0; }
  bool has_unfinished() const { return !reqs_.empty(); }
  int num_running() const { return scheduler_.num_running(); }
  int num_waiting() const { return scheduler_.num_waiting(); }

  // Running/waiting counts, KV usage and totals since construction. migrations stays 0.
  EngineMetrics Metrics() const;
  double simulated_ms() const { return simulated_ms_; }  // sum of every step's duration

  // KV events of the pool go to `sink` from now on (nullptr: none); called inside Step, on the
  // caller's thread. The sink must outlive the core or be reset.
  void SetKvEventSink(KvEventSink* sink) { pool_.SetEventSink(sink); }
  const BlockPool& pool() const { return pool_; }
  const MockerConfig& config() const { return config_; }

  // The token a request with `seed` emits at output index `index` (deterministic).
  static uint32_t TokenAt(uint64_t seed, int index, uint32_t vocab_size);

 private:
  struct Req {
    int max_tokens = 0;
    uint64_t seed = 0;
    int generated = 0;
  };

  MockerConfig config_;
  BlockPool pool_;
  Scheduler scheduler_;
  std::unordered_map<uint64_t, Req> reqs_;
  std::unordered_set<uint64_t> cancel_;
  double simulated_ms_ = 0;
  uint64_t prompt_tokens_ = 0, cached_prompt_tokens_ = 0, generated_tokens_ = 0, steps_ = 0;
};

}  // namespace dyn
