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
#pragma once

#include "base/status.h"
#include "engine/engine.h"
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
};

// Fails if the options are out of range (ValidateMockerConfig, speedup_ratio <= 0).
Result<EnginePtr> CreateMockerEngine(const MockerEngineOptions& options);

}  // namespace dyn
