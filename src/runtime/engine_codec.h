// The binary encoding of PreprocessedRequest and EngineOutput on the request plane. Compact,
// little-endian, versioned by a leading byte; decoding rejects truncated or malformed input with
// InvalidArgument instead of crashing. docs/request_plane.md gives the layout.
#pragma once

#include <string>
#include <string_view>

#include "base/status.h"
#include "engine/engine.h"

namespace dyn {

std::string EncodeRequest(const PreprocessedRequest& request);
Result<PreprocessedRequest> DecodeRequest(std::string_view bytes);

std::string EncodeOutput(const EngineOutput& output);
Result<EngineOutput> DecodeOutput(std::string_view bytes);

// Appends `next` to `into` (token ids, logprobs; the finish and first-delta fields of whichever
// has them), for coalescing deltas of one stream.
void MergeOutput(EngineOutput& into, EngineOutput&& next);

}  // namespace dyn
