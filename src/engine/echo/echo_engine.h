// The echo engine: streams the prompt's token ids back. It does no model work, so serving it
// measures the frontend's own overhead (HTTP, templating, tokenization, detokenization, SSE).
//
// Behaviour per request: emits prompt[0], prompt[1], ... one token per delta, cycling through the
// prompt, until max_tokens tokens were emitted (finish "length") or an emitted token is a stop
// token id or (unless ignore_eos) an EOS id after min_tokens tokens (finish "stop"). With
// logprobs it reports logprob 0 for each token and other prompt tokens as alternatives.
// Cancellation is noticed at the next step (finish "cancelled"). One thread serves all requests,
// a step emitting one token for every running request, then sleeping token_delay_ms.
#pragma once

#include "engine/engine.h"

namespace dyn {

struct EchoEngineOptions {
  double token_delay_ms = 0;  // pause between steps (0 = as fast as the thread runs)
};

EnginePtr CreateEchoEngine(const EchoEngineOptions& options);

}  // namespace dyn
