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
// Disaggregated serving (docs/disaggregation.md): a kPrefillOnly request computes its prompt and
// its first token, then its blocks are detached under a lease (MockerToken::lease_id) until
// ReleaseLease. A kDecodeImported request reserves blocks for its prompt (reusing the local prefix
// cache) in a Step, which reports the transfer it needs (MockerImport: the uncached blocks, their
// bytes and the modelled transfer time); the caller lets that time pass and calls CompleteImport,
// and the request decodes from output index 1 (index 0 is the prefill side's first token), so a
// disaggregated request emits the same tokens as an aggregated one.
//
// No threads and no clock: the caller decides what a step's or a transfer's duration means
// (MockerEngine sleeps it, scaled by a speedup ratio; a simulator adds it to virtual time).
// Not thread-safe.
#pragma once

#include <cstdint>
#include <deque>
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
  // KV transfer model (kDecodeImported). Bytes of KV per token: Llama-3.1-8B in bf16,
  // 32 layers * 2 (K and V) * 8 KV heads * 128 head dim * 2 bytes.
  int64_t kv_bytes_per_token = 131072;
  // Bandwidth of the decode worker's pull, GB/s (1e9 bytes/s). 25 GB/s is a 200 Gb/s RDMA NIC
  // (one ConnectX-6/7 port per GPU, the usual inter-node path for disaggregated serving) at full
  // rate; NVLink within a node is an order of magnitude faster and makes transfers negligible.
  double kv_transfer_gbps = 25.0;
  // Fixed cost of each transfer (handshake, descriptor exchange, completion), ms.
  double kv_transfer_latency_ms = 0.0;
};

// The timing model, in milliseconds of simulated time.
double MockerPrefillMs(int new_tokens);  // 0 when new_tokens <= 0
double MockerDecodeMs(double kv_usage);  // kv_usage in [0, 1]
// Bytes and simulated time of moving `blocks` whole KV blocks (0 blocks: no transfer, 0 ms).
int64_t MockerTransferBytes(const MockerConfig& config, int blocks);
double MockerTransferMs(const MockerConfig& config, int blocks);

struct MockerRequest {
  uint64_t id = 0;
  std::vector<uint32_t> prompt;
  int max_tokens = 16;
  uint64_t seed = 0;  // output tokens depend only on (seed, index)
  RequestPhase phase = RequestPhase::kFull;
  uint32_t first_token = 0;  // kDecodeImported: the prefill side's token (output index 0)
};

// One token produced by a step.
struct MockerToken {
  uint64_t id = 0;
  uint32_t token = 0;
  int index = 0;              // output index (0: the request's first token)
  bool finished = false;      // the request is gone from the core: max_tokens-th token, or handed off
  bool first = false;         // the first token this core emits for the request (index 1 for imports)
  int prompt_tokens = 0;      // with first
  int cached_tokens = 0;      // with first: prompt tokens served from the local prefix cache
  // kPrefillOnly, with finished when decoding continues elsewhere: the lease now holding the
  // prompt's blocks (0: none, the first token ended the request).
  uint64_t lease_id = 0;
  std::vector<int32_t> lease_blocks;
};

// A kDecodeImported request whose blocks were reserved in this step: the caller moves
// `transfer_blocks` blocks (the prompt's uncached part), then calls CompleteImport(id, ok).
struct MockerImport {
  uint64_t id = 0;
  int prompt_tokens = 0;
  int cached_tokens = 0;     // prompt tokens found in the local prefix cache (no transfer)
  int first_block = 0;       // blocks [first_block, first_block + transfer_blocks) are moved
  int transfer_blocks = 0;
  int64_t transfer_bytes = 0;
  double transfer_ms = 0;    // MockerTransferMs of transfer_blocks
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
  std::vector<MockerImport> imports;                // reserved before this pass, transfer now
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

  // Queues a request. Fails, queueing nothing, on an empty prompt, max_tokens < 1 (< 2 for
  // kDecodeImported: the first token is already out), a used id, or when prompt + max_tokens
  // tokens could not fit the pool even alone.
  Status Add(MockerRequest request);

  // Marks a request for removal; its blocks are freed at the start of the next Step. False if
  // the id is unknown (finished, failed or never added).
  bool Cancel(uint64_t id);

  // Runs one pass: removes cancelled requests, activates completed imports (while fewer than
  // max_num_seqs run), reserves blocks for waiting imports (in arrival order, while they fit),
  // schedules a batch, computes its duration and produces a token for every sequence whose chunk
  // reached its end. A step with nothing to run has duration 0 and batch_size 0.
  MockerStepResult Step();

  // ---- disaggregated serving ----
  // Prefill side: frees a lease's blocks (full ones stay in the prefix cache). False if unknown.
  bool ReleaseLease(uint64_t lease_id);
  // Decode side: the transfer of an import reported by Step is over. ok: the request joins the
  // running set at the next Step; !ok: it ends and its blocks are freed. False if `id` is not an
  // import waiting for its transfer (unknown, cancelled, already completed).
  bool CompleteImport(uint64_t id, bool ok);

  bool Contains(uint64_t id) const { return reqs_.count(id) != 0; }
  bool has_unfinished() const { return !reqs_.empty(); }
  int num_running() const { return scheduler_.num_running(); }
  int num_waiting() const { return scheduler_.num_waiting(); }
  int num_leases() const { return static_cast<int>(leases_.size()); }
  // Imports queued for blocks, or waiting for their transfer or activation.
  int num_importing() const { return static_cast<int>(import_queue_.size() + transferring_.size() + transferred_.size()); }

  // Running/waiting counts, KV usage, leases and totals since construction (kv_transfer_seconds
  // is modelled time, the sum of completed transfers' transfer_ms). migrations stays 0.
  EngineMetrics Metrics() const;
  double simulated_ms() const { return simulated_ms_; }  // sum of every step's duration

  // KV events of the pool go to `sink` from now on (nullptr: none); called inside Step and
  // ReleaseLease / CompleteImport, on the caller's thread. The sink must outlive the core or be reset.
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
    bool sent_first = false;
    RequestPhase phase = RequestPhase::kFull;
    uint32_t first_token = 0;
    std::vector<uint32_t> import_prompt;  // kDecodeImported, until its blocks are reserved
    MockerImport import;                  // kDecodeImported, once reserved
  };

  void ReserveImports(MockerStepResult& res);
  void ActivateImports();
  void Remove(uint64_t id);  // a request that is not running (cancelled, failed import)

  MockerConfig config_;
  BlockPool pool_;
  Scheduler scheduler_;
  std::unordered_map<uint64_t, Req> reqs_;
  std::unordered_set<uint64_t> cancel_;
  std::unordered_map<uint64_t, std::vector<int32_t>> leases_;
  uint64_t next_lease_ = 1;
  std::deque<uint64_t> import_queue_;          // no blocks yet, arrival order
  std::unordered_set<uint64_t> transferring_;  // reserved, transfer in progress
  std::deque<uint64_t> transferred_;           // transfer done, activated at the next Step
  double simulated_ms_ = 0;
  uint64_t prompt_tokens_ = 0, cached_prompt_tokens_ = 0, generated_tokens_ = 0, steps_ = 0;
  uint64_t kv_transfers_ = 0, kv_transfer_failures_ = 0, kv_transfer_bytes_ = 0;
  double kv_transfer_ms_ = 0;
};

}  // namespace dyn
