// What dyn bench sends: a list of request specs built deterministically from a seed, so the same
// workload and seed give the very same requests on every run (runs are comparable).
//
// Sources: synthetic (input/output lengths from distributions, optional groups sharing a prefix),
// ShareGPT prompts (text), and request traces (src/workload/trace.h: Mooncake hash ids become
// deterministic 512-token blocks, so prompts share exactly the prefixes the trace says). Arrival
// times for open-loop runs come from AssignArrivals (Poisson or constant rate) or from the trace.
// No networking; the only I/O is LoadShareGptPrompts reading its file.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "base/status.h"
#include "workload/trace.h"

namespace dyn::loadgen {

struct RequestSpec {
  std::vector<uint32_t> prompt_ids;  // token ids (synthetic, trace); empty for text prompts
  std::string prompt_text;           // text (ShareGPT, or ids turned to text for chat)
  int max_tokens = 0;                // output tokens wanted (sent with ignore_eos)
  double arrival_ms = 0;             // open loop: when to send, from the start of the run
  int input_tokens = 0;              // prompt length when known here (0: from the server's usage)
};

// The deterministic random source of every workload (SplitMix64): the same on every platform and
// standard library, unlike std::normal_distribution.
class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed) {}
  uint64_t Next();
  double Uniform();             // [0, 1)
  double Normal();              // mean 0, stddev 1 (Box-Muller)
  double Exponential(double rate);

 private:
  uint64_t state_;
};

// A length distribution: a fixed value (stddev 0) or a normal around `mean`, clamped to [min, max].
struct LengthDistribution {
  double mean = 128;
  double stddev = 0;
  int min = 1;
  int max = 1 << 20;
  int Sample(Rng& rng) const;
};

struct SyntheticOptions {
  size_t num_requests = 100;
  LengthDistribution input{128, 0};
  LengthDistribution output{128, 0};
  // prefix_groups > 0: request i belongs to group (i % prefix_groups), and every request of a
  // group starts with the same prefix_tokens tokens (the input length includes the prefix).
  int prefix_groups = 0;
  int prefix_tokens = 0;
  uint64_t seed = 0;
  workload::PromptSynthesis vocab;  // token id range; its seed is mixed with `seed`
};

// Prompts of random token ids; request i's tokens depend only on (seed, i) and its group.
std::vector<RequestSpec> SyntheticWorkload(const SyntheticOptions& options);

// The human first turns of a ShareGPT file ([{"conversations": [{"from": "human", "value"}]}]).
Result<std::vector<std::string>> ParseShareGpt(std::string_view json_text);
Result<std::vector<std::string>> LoadShareGptPrompts(const std::string& path);

// num_requests prompts drawn (shuffled by `seed`, cycling when more are wanted than there are)
// with output lengths from `output`.
std::vector<RequestSpec> ShareGptWorkload(std::span<const std::string> prompts, size_t num_requests,
                                          const LengthDistribution& output, uint64_t seed);

// One spec per trace request: the synthesized prompt (trace.h), the trace's output length and
// arrival time (already scaled by the caller with workload::ScaleTrace).
std::vector<RequestSpec> TraceWorkload(std::span<const workload::TraceRequest> trace,
                                       const workload::PromptSynthesis& synth);

enum class Arrival { kPoisson, kConstant };
// Sets arrival_ms for a request rate (requests/s): exponential gaps (Poisson) or equal gaps, the
// first request at 0.
void AssignArrivals(std::span<RequestSpec> specs, double rate, Arrival arrival, uint64_t seed);

}  // namespace dyn::loadgen
