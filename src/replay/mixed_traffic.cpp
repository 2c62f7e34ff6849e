// MixedTrafficTrace (replay.h): long-prompt and decode-heavy requests with Poisson arrivals.
#include <algorithm>
#include <random>

#include "replay/replay.h"

namespace dyn::replay {

std::vector<workload::TraceRequest> MixedTrafficTrace(const MixedTraffic& mix) {
  std::mt19937_64 rng(mix.seed);
  std::exponential_distribution<double> gap_s(mix.rate > 0 ? mix.rate : 1.0);
  std::bernoulli_distribution is_long(mix.long_fraction);
  std::uniform_int_distribution<int> long_prompt(mix.long_prompt_min, std::max(mix.long_prompt_min, mix.long_prompt_max));
  std::uniform_int_distribution<int> short_prompt(mix.short_prompt_min,
                                                  std::max(mix.short_prompt_min, mix.short_prompt_max));
  std::uniform_int_distribution<int> short_output(mix.short_output_min,
                                                  std::max(mix.short_output_min, mix.short_output_max));
  std::vector<workload::TraceRequest> trace;
  trace.reserve(mix.requests);
  double t_ms = 0;
  for (size_t i = 0; i < mix.requests; ++i) {
    if (i > 0) t_ms += 1000.0 * gap_s(rng);
    workload::TraceRequest r;
    r.arrival_ms = t_ms;
    if (is_long(rng)) {
      r.input_length = long_prompt(rng);
      r.output_length = mix.long_output;
    } else {
      r.input_length = short_prompt(rng);
      r.output_length = short_output(rng);
    }
    trace.push_back(std::move(r));
  }
  return trace;
}

}  // namespace dyn::replay
