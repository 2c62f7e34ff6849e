// MockerEngine: the Engine (engine/engine.h) that simulates a model with MockerCore
// (mocker_core.h): real scheduling, prefix caching and KV events, no model, Dynamo's timing
// model for the cost of each pass.
//
// One step thread owns the core. Each step it drains the inbox (invalid requests end with one
// kError delta), ends cancelled streams (kCancelled; their blocks are freed by the next pass),
// runs one MockerCore::Step and then sleeps the pass's duration divided by speedup_ratio, measured
// from the start of the step, before sending the pass's tokens: tokens are stamped at the end of
// their pass, as in Dynamo's mocker. Every stream gets exactly max_tokens tokens and finishes
// with kLength (EOS, stop ids and min_tokens are ignored: the tokens are random). The first delta
// carries prompt_tokens and cached_tokens.
//
// Disaggregated serving, with the native engine's KvTransferHooks (docs/disaggregation.md):
//  - kPrefillOnly (needs hooks.describe): after the first token the prompt's blocks stay under a
//    lease; the stream's one delta carries the token, kv_transfer = describe(lease, blocks,
//    prompt tokens) and kLength. ReleaseKvLease frees them, or hooks.lease_timeout does.
//  - kDecodeImported (needs a descriptor, no hook): blocks are reserved for the prompt (local
//    prefix hits are not moved); the simulated transfer of the rest takes MockerTransferMs /
//    speedup_ratio of real time while other requests keep stepping; then hooks.release(descriptor)
//    (if set) and the request decodes from its second token. Nothing is copied, so hooks.pull is
//    never called. The first delta's cached_tokens are the locally reused prompt tokens.
#pragma once

#include "base/status.h"
#include "engine/engine.h"
#include "engine/kv_transfer_hooks.h"
#include "engine/mocker/mocker_core.h"
#include "kv/block_pool.h"

namespace dyn {

struct MockerEngineOptions {
  MockerConfig core;
  // Simulated time / real time: 1 runs at the modelled speed, 10 ten times faster; a huge value
  // (1e9) effectively never sleeps.
  double speedup_ratio = 1.0;
  // Receives the block pool's KV events on the engine's step thread; must outlive the engine.
  KvEventSink* kv_event_sink = nullptr;
  // Disaggregated serving: describe (prefill side), release and lease_timeout; pull is not used.
  KvTransferHooks kv_transfer;
};

// Fails if the options are out of range (ValidateMockerConfig, speedup_ratio <= 0).
Result<EnginePtr> CreateMockerEngine(const MockerEngineOptions& options);

}  // namespace dyn
