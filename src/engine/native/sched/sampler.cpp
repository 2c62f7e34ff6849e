#include "engine/native/sched/sampler.h"

#include <algorithm>
#include <cassert>
#include <cmath>
#include <limits>

namespace dyn {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Uniform in [0, 1) from the top 53 bits: same values on every platform (unlike std::
// uniform_real_distribution, whose algorithm is the library's choice).
double Uniform01(SamplerRng& rng) { return static_cast<double>(rng() >> 11) * 0x1.0p-53; }

uint32_t ArgMax(std::span<const float> logits) {
  uint32_t best = 0;
  for (uint32_t i = 1; i < logits.size(); ++i) {
    if (logits[i] > logits[best]) best = i;
  }
  return best;
}

double LogSumExp(std::span<const float> logits) {
  const float m = logits[ArgMax(logits)];
  if (m == kNegInf) return kNegInf;
  double sum = 0;
  for (float l : logits) sum += std::exp(static_cast<double>(l - m));
  return m + std::log(sum);
}

// The n best tokens by logit, best first, ties to the lowest id.
std::vector<TopLogprob> TopN(std::span<const float> logits, int n, double lse) {
  std::vector<std::pair<float, uint32_t>> best;  // sorted: best first
  best.reserve(static_cast<size_t>(n) + 1);
  for (uint32_t i = 0; i < logits.size(); ++i) {
    const float l = logits[i];
    if (static_cast<int>(best.size()) == n && !(l > best.back().first)) continue;
    auto pos = std::upper_bound(best.begin(), best.end(), l,
                                [](float v, const std::pair<float, uint32_t>& e) { return v > e.first; });
    best.insert(pos, {l, i});
    if (static_cast<int>(best.size()) > n) best.pop_back();
  }
  std::vector<TopLogprob> out;
  for (auto& [l, id] : best) out.push_back({id, static_cast<float>(l - lse)});
  return out;
}

}  // namespace

Status ValidateSamplingParams(const SamplingParams& p) {
  if (!std::isfinite(p.temperature) || p.temperature < 0) return Status::InvalidArgument("temperature must be >= 0");
  if (!(p.top_p > 0 && p.top_p <= 1)) return Status::InvalidArgument("top_p must be in (0, 1]");
  if (p.top_k < 0) return Status::InvalidArgument("top_k must be >= 0 (0 disables it)");
  if (!(p.min_p >= 0 && p.min_p <= 1)) return Status::InvalidArgument("min_p must be in [0, 1]");
  if (!std::isfinite(p.repetition_penalty) || p.repetition_penalty <= 0) {
    return Status::InvalidArgument("repetition_penalty must be > 0");
  }
  if (!std::isfinite(p.frequency_penalty) || !std::isfinite(p.presence_penalty)) {
    return Status::InvalidArgument("frequency_penalty and presence_penalty must be finite");
  }
  if (p.top_logprobs < 0 || p.top_logprobs > 20) return Status::InvalidArgument("top_logprobs must be in [0, 20]");
  return Status::Ok();
}

SamplerRng MakeSamplerRng(const SamplingParams& params) {
  if (params.seed) return SamplerRng(*params.seed);
  std::random_device rd;
  std::seed_seq seq{rd(), rd(), rd(), rd()};
  return SamplerRng(seq);
}

Sampler::Sampler(int vocab_size) : vocab_size_(vocab_size), counts_(vocab_size), seen_(vocab_size) {
  candidates_.reserve(vocab_size);
  weights_.reserve(vocab_size);
}

void Sampler::ApplyPenalties(std::span<float> logits, const SamplingParams& p, std::span<const uint32_t> prompt,
                             std::span<const uint32_t> output) {
  if (p.repetition_penalty != 1.0f) {
    const float rp = p.repetition_penalty;
    auto penalise = [&](std::span<const uint32_t> tokens) {
      for (uint32_t t : tokens) {
        if (seen_[t]) continue;
        seen_[t] = 1;
        logits[t] = logits[t] > 0 ? logits[t] / rp : logits[t] * rp;
      }
    };
    penalise(prompt);
    penalise(output);
    for (uint32_t t : prompt) seen_[t] = 0;
    for (uint32_t t : output) seen_[t] = 0;
  }
  if (p.frequency_penalty != 0.0f || p.presence_penalty != 0.0f) {
    for (uint32_t t : output) ++counts_[t];
    for (uint32_t t : output) {
      if (counts_[t] == 0) continue;  // already applied
      logits[t] -= static_cast<float>(counts_[t]) * p.frequency_penalty + p.presence_penalty;
      counts_[t] = 0;
    }
  }
}

uint32_t Sampler::Draw(std::span<const float> logits, const SamplingParams& p, SamplerRng& rng) {
  const float max_logit = logits[ArgMax(logits)];
  const float inv_t = 1.0f / p.temperature;
  const bool use_top_k = p.top_k > 0 && p.top_k < vocab_size_;
  const bool truncate = use_top_k || p.top_p < 1.0f || p.min_p > 0.0f;
  if (!truncate) {
    // Plain temperature sampling over the whole vocabulary.
    weights_.resize(vocab_size_);
    double sum = 0;
    for (int i = 0; i < vocab_size_; ++i) sum += weights_[i] = std::exp((logits[i] - max_logit) * inv_t);
    double u = Uniform01(rng) * sum;
    for (int i = 0; i < vocab_size_; ++i) {
      u -= weights_[i];
      if (u < 0 && weights_[i] > 0) return static_cast<uint32_t>(i);
    }
    return ArgMax(logits);
  }

  // Candidates with their weight w = exp((l - max) / T) = p / p_max; a total order (weight, then
  // lowest id) keeps the selection deterministic.
  candidates_.clear();
  for (int i = 0; i < vocab_size_; ++i) {
    const float w = std::exp((logits[i] - max_logit) * inv_t);
    if (w > 0) candidates_.push_back({w, i});
  }
  auto better = [](const Candidate& a, const Candidate& b) { return a.w > b.w || (a.w == b.w && a.id < b.id); };
  auto first = candidates_.begin();
  if (use_top_k && static_cast<size_t>(p.top_k) < candidates_.size()) {
    std::nth_element(first, first + (p.top_k - 1), candidates_.end(), better);
    candidates_.resize(p.top_k);
  }
  size_t keep = candidates_.size();
  if (p.top_p < 1.0f) {
    // Smallest best-first prefix whose mass reaches top_p, by repeated partitioning (expected
    // linear time): [0, lo) is known to be kept, the boundary lies in [lo, hi).
    double total = 0;
    for (const Candidate& c : candidates_) total += c.w;
    double need = static_cast<double>(p.top_p) * total;
    size_t lo = 0, hi = candidates_.size();
    while (hi - lo > 64) {
      const size_t mid = lo + (hi - lo) / 2;
      std::nth_element(first + lo, first + mid, first + hi, better);
      double mass = 0;
      for (size_t i = lo; i < mid; ++i) mass += candidates_[i].w;
      if (mass >= need) {
        hi = mid;
      } else {
        need -= mass;
        lo = mid;
      }
    }
    std::sort(first + lo, first + hi, better);
    keep = hi;
    for (size_t i = lo; i < hi; ++i) {
      need -= candidates_[i].w;
      if (need <= 0) {
        keep = i + 1;
        break;
      }
    }
  }
  if (p.min_p > 0.0f) {
    // p_i >= min_p * p_max  <=>  w_i >= min_p; the top token (w = 1) always stays.
    size_t kept = 0;
    for (size_t i = 0; i < keep; ++i) {
      if (candidates_[i].w >= p.min_p) candidates_[kept++] = candidates_[i];
    }
    keep = kept;
  }
  double sum = 0;
  for (size_t i = 0; i < keep; ++i) sum += candidates_[i].w;
  double u = Uniform01(rng) * sum;
  for (size_t i = 0; i < keep; ++i) {
    u -= candidates_[i].w;
    if (u < 0) return static_cast<uint32_t>(candidates_[i].id);
  }
  return keep > 0 ? static_cast<uint32_t>(candidates_[keep - 1].id) : ArgMax(logits);
}

uint32_t Sampler::Sample(std::span<float> logits, const SamplingParams& params, std::span<const uint32_t> prompt,
                         std::span<const uint32_t> output, std::span<const uint32_t> banned, SamplerRng& rng,
                         TokenLogprob* logprob) {
  assert(static_cast<int>(logits.size()) == vocab_size_);
  ApplyPenalties(logits, params, prompt, output);
  for (uint32_t t : banned) logits[t] = kNegInf;
  const uint32_t token = params.temperature == 0.0f ? ArgMax(logits) : Draw(logits, params, rng);
  if (logprob && (params.logprobs || params.top_logprobs > 0)) {
    const double lse = LogSumExp(logits);
    logprob->token = token;
    logprob->logprob = static_cast<float>(logits[token] - lse);
    logprob->top.clear();
    if (params.top_logprobs > 0) logprob->top = TopN(logits, params.top_logprobs, lse);
  }
  return token;
}

}  // namespace dyn
