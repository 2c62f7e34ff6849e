// NativeEngine: the Engine (engine/engine.h) that runs a Model (model/model.h) in-process.
//
// One step thread owns the model, the block pool, the scheduler and the sampler. Generate() puts
// the request in an inbox and returns; each step the thread drains the inbox (validating new
// requests: invalid ones end with one kError delta), ends cancelled streams (kCancelled, blocks
// freed), schedules a batch (scheduler.h), runs Model::Forward over it, samples each finished
// sequence's next token (sampler.h) and sends it as one delta. The first delta of a stream
// carries prompt_tokens and cached_tokens (prompt tokens served from the prefix cache).
//
// Disaggregated serving (PreprocessedRequest::phase): a kPrefillOnly request ends after its first
// token with its blocks kept under a lease and a descriptor (KvTransferHooks::describe) in the
// final delta; ReleaseKvLease or the lease timeout frees them. A kDecodeImported request reserves
// blocks for its prompt (reusing the local prefix cache), has the rest copied on the engine's
// transfer thread (KvTransferHooks::pull) while other requests keep running, then decodes from
// the prefill worker's first token; a failed copy ends it with "Unavailable: ..." so the caller
// can fall back.
//
// Stop conditions, checked after each token, first match wins: an EOS id (unless ignore_eos) or
// a stop id ends with kStop and the token is included; max_tokens generated ends with kLength;
// prompt + generated reaching the context length ends with kLength. Before min_tokens are
// generated, EOS and stop ids are masked out of sampling (as vLLM and HF do). The context length
// is the model's max_position_embeddings, capped by the KV pool's capacity
// (num_kv_blocks * block_size) so that one sequence can always run alone; a prompt longer than
// it is rejected with kError before scheduling.
#pragma once

#include <cstddef>
#include <memory>

#include "base/status.h"
#include "engine/engine.h"
#include "engine/kv_transfer_hooks.h"
#include "engine/native/model/model.h"
#include "kv/block_pool.h"

namespace dyn {

struct NativeEngineOptions {
  int block_size = 16;
  int num_kv_blocks = 0;  // 0: derive from kv_cache_bytes
  size_t kv_cache_bytes = 512u << 20;
  int max_num_seqs = 64;
  int max_num_batched_tokens = 2048;
  bool enable_prefix_caching = true;
  // Pure decode steps on a model that pipelines sampling (Model::samples_pipelined, the CUDA
  // backend) are launched before the previous step's ids are back: the host's work between steps
  // overlaps the device's (batch 1 of the 8B shape on an H200: 3.92 against 4.00 ms a step).
  bool pipelined_decode = true;
  // Threads that sample a step's rows on the host (BatchSampler), counting the step thread.
  // 0: up to 8 when the model samples on a device (the host cores are idle during the step),
  // else 1 (a CPU model's cores are its backend's).
  int sampling_threads = 0;
  // Receives the block pool's KV events on the engine's step thread; must outlive the engine.
  KvEventSink* kv_event_sink = nullptr;
  // Disaggregated serving (RequestPhase): without describe, kPrefillOnly requests are refused;
  // without pull, kDecodeImported ones are.
  KvTransferHooks kv_transfer;
  // Disaggregated serving with a device KV cache (a GPU): the transfer layer reads and writes host
  // memory only, so a prompt's KV travels through this much host memory ("staging" blocks). The
  // prefill side copies a finished prompt's blocks there and frees them on the device at once; they
  // stay staged until the decode worker has pulled them. Bounds the prompts staged at a time.
  size_t kv_staging_bytes = size_t{2} << 30;
};

// Sizes the KV pool, calls model->InitKvCache and starts the step thread. Fails if the options
// are out of range or the cache cannot hold one block.
Result<EnginePtr> CreateNativeEngine(std::unique_ptr<Model> model, const NativeEngineOptions& options);

}  // namespace dyn
