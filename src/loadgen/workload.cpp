#include "loadgen/workload.h"

#include <algorithm>
#include <cmath>
#include <numbers>

#include <boost/json.hpp>

#include "base/file.h"

namespace dyn::loadgen {
namespace json = boost::json;

uint64_t Rng::Next() {
  uint64_t z = (state_ += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

double Rng::Uniform() { return static_cast<double>(Next() >> 11) * 0x1.0p-53; }

double Rng::Normal() {
  const double u1 = 1.0 - Uniform();  // (0, 1]: log is finite
  const double u2 = Uniform();
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2);
}

double Rng::Exponential(double rate) { return -std::log(1.0 - Uniform()) / rate; }

int LengthDistribution::Sample(Rng& rng) const {
  double v = mean;
  if (stddev > 0) v = mean + stddev * rng.Normal();
  const long r = std::lround(v);
  return static_cast<int>(std::clamp<long>(r, min, max));
}

namespace {

// Seeds derived from (seed, stream, index) so that request i does not depend on how many random
// numbers earlier requests used.
uint64_t Mix(uint64_t seed, uint64_t stream, uint64_t index) {
  Rng r(seed ^ (stream * 0xd1b54a32d192ed03ULL) ^ (index * 0x9e3779b97f4a7c15ULL));
  r.Next();
  return r.Next();
}

void AppendRandomTokens(Rng& rng, int count, const workload::PromptSynthesis& vocab, std::vector<uint32_t>* out) {
  const uint64_t span = vocab.vocab_size > vocab.first_token ? vocab.vocab_size - vocab.first_token : 1;
  for (int i = 0; i < count; ++i) out->push_back(vocab.first_token + static_cast<uint32_t>(rng.Next() % span));
}

}  // namespace

std::vector<RequestSpec> SyntheticWorkload(const SyntheticOptions& o) {
  std::vector<std::vector<uint32_t>> prefixes;
  if (o.prefix_groups > 0 && o.prefix_tokens > 0) {
    for (int g = 0; g < o.prefix_groups; ++g) {
      Rng rng(Mix(o.seed ^ o.vocab.seed, 1, g));
      prefixes.emplace_back();
      AppendRandomTokens(rng, o.prefix_tokens, o.vocab, &prefixes.back());
    }
  }
  Rng lengths(Mix(o.seed, 2, 0));
  std::vector<RequestSpec> specs(o.num_requests);
  for (size_t i = 0; i < o.num_requests; ++i) {
    RequestSpec& s = specs[i];
    int input = o.input.Sample(lengths);
    s.max_tokens = o.output.Sample(lengths);
    if (!prefixes.empty()) {
      const auto& prefix = prefixes[i % prefixes.size()];
      input = std::max<int>(input, static_cast<int>(prefix.size()) + 1);
      s.prompt_ids = prefix;
    }
    Rng rng(Mix(o.seed ^ o.vocab.seed, 3, i));
    AppendRandomTokens(rng, input - static_cast<int>(s.prompt_ids.size()), o.vocab, &s.prompt_ids);
    s.input_tokens = input;
  }
  return specs;
}

Result<std::vector<std::string>> ParseShareGpt(std::string_view json_text) {
  json::error_code ec;
  json::value v = json::parse(json_text, ec);
  if (ec) return Status::InvalidArgument("ShareGPT: not JSON: " + ec.message());
  if (!v.is_array()) return Status::InvalidArgument("ShareGPT: expected a list of conversations");
  std::vector<std::string> prompts;
  for (const json::value& conv : v.get_array()) {
    const json::value* turns = conv.is_object() ? conv.get_object().if_contains("conversations") : nullptr;
    if (!turns || !turns->is_array()) continue;
    for (const json::value& t : turns->get_array()) {
      if (!t.is_object()) continue;
      const json::value* from = t.get_object().if_contains("from");
      const json::value* value = t.get_object().if_contains("value");
      if (from && from->is_string() && from->get_string() == "human" && value && value->is_string() &&
          !value->get_string().empty()) {
        prompts.emplace_back(value->get_string());
        break;  // the first human turn only
      }
    }
  }
  if (prompts.empty()) return Status::InvalidArgument("ShareGPT: no human turns found");
  return prompts;
}

Result<std::vector<std::string>> LoadShareGptPrompts(const std::string& path) {
  DYN_ASSIGN_OR_RETURN(std::string text, ReadFile(path));
  auto prompts = ParseShareGpt(text);
  if (!prompts.ok()) return prompts.status().WithContext(path);
  return prompts;
}

std::vector<RequestSpec> ShareGptWorkload(std::span<const std::string> prompts, size_t num_requests,
                                          const LengthDistribution& output, uint64_t seed) {
  std::vector<size_t> order(prompts.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  Rng shuffle(Mix(seed, 4, 0));
  for (size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[shuffle.Next() % i]);
  Rng lengths(Mix(seed, 5, 0));
  std::vector<RequestSpec> specs(prompts.empty() ? 0 : num_requests);
  for (size_t i = 0; i < specs.size(); ++i) {
    specs[i].prompt_text = prompts[order[i % order.size()]];
    specs[i].max_tokens = output.Sample(lengths);
  }
  return specs;
}

std::vector<RequestSpec> TraceWorkload(std::span<const workload::TraceRequest> trace,
                                       const workload::PromptSynthesis& synth) {
  std::vector<RequestSpec> specs(trace.size());
  for (size_t i = 0; i < trace.size(); ++i) {
    specs[i].prompt_ids = workload::SynthesizePrompt(trace[i], i, synth);
    specs[i].input_tokens = static_cast<int>(specs[i].prompt_ids.size());
    specs[i].max_tokens = std::max(1, trace[i].output_length);
    specs[i].arrival_ms = trace[i].arrival_ms;
  }
  return specs;
}

void AssignArrivals(std::span<RequestSpec> specs, double rate, Arrival arrival, uint64_t seed) {
  Rng rng(Mix(seed, 6, 0));
  double t_ms = 0;
  for (size_t i = 0; i < specs.size(); ++i) {
    specs[i].arrival_ms = t_ms;
    t_ms += 1000.0 * (arrival == Arrival::kPoisson ? rng.Exponential(rate) : 1.0 / rate);
  }
}

}  // namespace dyn::loadgen
