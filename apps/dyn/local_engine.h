// Building a model's engine in this process from flags: shared by `dyn run` (frontend and engine
// together) and `dyn worker` (engine behind the request plane).
#pragma once

#include <cstdint>
#include <string>

#include "apps/dyn/serving_model.h"
#include "base/status.h"
#include "engine/kv_transfer_hooks.h"
#include "frontend/frontend.h"

namespace dyn {

class FlagSet;
class KvEventSink;

struct LocalEngineFlags {
  std::string model_path, served_name, engine_name = "native", chat_template;
  std::string device = "auto";  // native engine backend: cpu | cuda | auto (cuda when a GPU is visible)
  std::string load_format = "auto";  // native engine: auto (weight files) | dummy (config.json, random weights)
  int64_t threads = 0, block_size = 16, kv_cache_mb = 512, num_kv_blocks = 0;
  int64_t max_num_seqs = 64, max_batched = 2048, context_length = 0;
  double gpu_memory_utilization = 0.9;  // native engine on a GPU (see Register)
  double echo_delay_ms = 0;
  double speedup_ratio = 1;  // mocker: simulated time / real time
  int64_t kv_bytes_per_token = 131072;  // mocker: KV transfer size (Llama-3.1-8B bf16)
  double kv_transfer_gbps = 25;         // mocker: simulated KV transfer bandwidth
  KvEventSink* kv_event_sink = nullptr;  // not a flag: receives the engine's KV block events
  KvTransferHooks kv_transfer;           // not a flag: disaggregated serving (a worker's role)
  int64_t kv_staging_mb = 2048;          // dyn worker's --kv-staging-mb (NativeEngineOptions::kv_staging_bytes)
  bool prefix_caching = true;
  bool pipelined_decode = true;  // native engine: launch decode steps before the previous ids are back

  void Register(FlagSet& fs);
  // Whether a flag was given (not left at its default); false before Register/Parse.
  bool Given(const char* flag) const;

  const FlagSet* flag_set = nullptr;  // set by Register; outlives the command
};

// Loads tokenizer, chat template and engine. `served.name` is the served name.
// `kv_block_size` (optional) receives the engine's KV block size (0 for engines without a cache).
Result<ServedModel> BuildLocalModel(const LocalEngineFlags& flags, int* kv_block_size = nullptr);

}  // namespace dyn
