// Request traces and the prompts they stand for. Shared by `dyn replay` (router + simulated
// workers on a virtual clock) and `dyn bench` (a load generator against any OpenAI server), so the
// two send the very same requests for the same trace and seed.
//
// Mooncake traces (FAST'25; ../shared/traces/mooncake) give each request a list of hash ids: one
// id stands for one 512-token block of the prompt, and equal ids at the same place in two prompts
// mean a shared prefix. A trace prompt is built by turning each id into a deterministic block of
// tokens (same id, same tokens, whatever request it appears in); the last block is cut so the
// prompt has exactly input_length tokens. Azure 2023 traces (Splitwise CSV) have arrival times and
// lengths only: their prompts share nothing.
//
// No I/O beyond reading the trace file; no threads.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "base/status.h"

namespace dyn::workload {

struct TraceRequest {
  double arrival_ms = 0;              // from the start of the trace
  int input_length = 0;               // prompt tokens
  int output_length = 0;              // tokens to generate
  std::vector<uint64_t> hash_ids;     // Mooncake: one per block of the prompt; empty otherwise
};

// One JSON object per line: {"timestamp": ms, "input_length", "output_length", "hash_ids": [...]}.
// Errors name the line. Requests keep the file's order (sorted by timestamp in the real traces).
Result<std::vector<TraceRequest>> LoadMooncakeTrace(const std::string& path);

// CSV with a header TIMESTAMP,ContextTokens,GeneratedTokens (UTF-8 BOM allowed); timestamps like
// "2023-11-16 18:17:03.9799600" become ms from the first row.
Result<std::vector<TraceRequest>> LoadAzureTrace(const std::string& path);

// Which loader: ".jsonl" -> Mooncake, ".csv" -> Azure; anything else is an error.
Result<std::vector<TraceRequest>> LoadTrace(const std::string& path);

struct PromptSynthesis {
  int block_size = 512;          // tokens per hash id (Mooncake's unit)
  uint32_t vocab_size = 32000;   // token ids are drawn from [first_token, vocab_size)
  uint32_t first_token = 1000;   // skip low ids (special tokens in most vocabularies)
  uint64_t seed = 0;             // a different seed gives different (but equally shared) prompts
};

// The prompt of `request`: block i is the deterministic token block of hash_ids[i] (cut to the
// remaining length for the last one); with no hash ids (Azure) the prompt is unique to
// `request_index`. Always exactly input_length tokens.
std::vector<uint32_t> SynthesizePrompt(const TraceRequest& request, size_t request_index, const PromptSynthesis& synth);

// The deterministic tokens of one hash id's block.
std::vector<uint32_t> HashIdBlock(uint64_t hash_id, const PromptSynthesis& synth);

// Fraction of all prompt tokens that an infinite prefix cache would serve, from the hash ids: a
// request's leading blocks whose id chain (ids[0..i]) was seen before in trace order count as
// hits, block_size tokens each, the sum capped at the request's input_length (so a short last
// block counts its real length). This is the published definition: it gives 37.36 % for
// conversation_trace.jsonl and 65.12 % for synthetic_trace.jsonl (FACTS.md: 37.4 %, 65.1 %).
// Counting full blocks only (dropping the short last block) gives 37.33 % and 65.04 %: not it.
double InfiniteCacheHitRatio(std::span<const TraceRequest> requests, int block_size = 512);

// The same measure computed from prompts' tokens: blocks of block_size tokens (the last one may be
// short; its length is part of its hash), chained like a prefix cache, a hit counting the block's
// real length. On the Mooncake traces it equals InfiniteCacheHitRatio exactly, so the prompts
// actually sent can be checked against the trace's ids.
double InfiniteCacheHitRatioOfPrompts(std::span<const std::vector<uint32_t>> prompts, int block_size = 512);

// Scales arrival times by 1/speedup and keeps requests with arrival < max_ms (0: no limit) after
// scaling; the first `limit` requests only when limit > 0.
std::vector<TraceRequest> ScaleTrace(std::vector<TraceRequest> requests, double speedup, double max_ms = 0,
                                     size_t limit = 0);

}  // namespace dyn::workload
