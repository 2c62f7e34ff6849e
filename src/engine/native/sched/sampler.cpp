#include "engine/native/sched/sampler.h"

#include <algorithm>
#include <cassert>
#include <cmath>
#include <bit>
#include <limits>

namespace dyn {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

double Uniform01(SamplerRng& rng) { return SamplerUniform01(rng); }

// The vocabulary-wide loops below are written lane-wise (kLanes independent accumulators) so
// that the compiler vectorises them without -ffast-math; at vocab 151936 this is the difference
// between tens and hundreds of microseconds per token.
constexpr int kLanes = 16;

float MaxValue(std::span<const float> x) {
  float lane[kLanes];
  for (float& v : lane) v = kNegInf;
  size_t i = 0;
  for (; i + kLanes <= x.size(); i += kLanes) {
    for (int j = 0; j < kLanes; ++j) lane[j] = x[i + j] > lane[j] ? x[i + j] : lane[j];
  }
  float m = kNegInf;
  for (float v : lane) m = v > m ? v : m;
  for (; i < x.size(); ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// Lowest id among the maxima.
uint32_t ArgMax(std::span<const float> logits) {
  const float m = MaxValue(logits);
  for (uint32_t i = 0; i < logits.size(); ++i) {
    if (logits[i] == m) return i;
  }
  return 0;  // only NaNs
}

// exp(x) for x <= 0 (Cephes expf polynomial, ~1 ulp); 0 below -87 and for -inf.
inline float ExpNonPositive(float x) {
  const float keep = x >= -87.0f ? 1.0f : 0.0f;  // a multiply, not a branch: the loop vectorises
  x = std::max(x, -87.0f);
  // Nearest integer to x / ln 2 (x <= 0: truncating x / ln 2 - 0.5 rounds to nearest).
  const int32_t ni = static_cast<int32_t>(x * 1.44269504088896341f - 0.5f);
  const float n = static_cast<float>(ni);
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  return y * std::bit_cast<float>((ni + 127) << 23) * keep;
}

// out[i] = exp((x[i] - shift) * scale) with x[i] <= shift (a plain map, which vectorises).
void ExpShifted(std::span<const float> x, float shift, float scale, float* __restrict out) {
  const float* __restrict in = x.data();
  const size_t n = x.size();
  for (size_t i = 0; i < n; ++i) out[i] = ExpNonPositive((in[i] - shift) * scale);
}

double Sum(std::span<const float> x) {
  float lane[kLanes] = {};
  size_t i = 0;
  for (; i + kLanes <= x.size(); i += kLanes) {
    for (int j = 0; j < kLanes; ++j) lane[j] += x[i + j];
  }
  double sum = 0;
  for (float v : lane) sum += v;
  for (; i < x.size(); ++i) sum += x[i];
  return sum;
}

double LogSumExp(std::span<const float> logits, std::vector<float>& scratch) {
  const float m = MaxValue(logits);
  if (m == kNegInf) return kNegInf;
  scratch.resize(logits.size());
  ExpShifted(logits, m, 1.0f, scratch.data());
  return m + std::log(Sum(scratch));
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
  const float max_logit = MaxValue(logits);
  const float inv_t = 1.0f / p.temperature;
  const bool use_top_k = p.top_k > 0 && p.top_k < vocab_size_;
  const bool truncate = use_top_k || p.top_p < 1.0f || p.min_p > 0.0f;
  if (!truncate) {
    // Plain temperature sampling over the whole vocabulary.
    weights_.resize(vocab_size_);
    ExpShifted(logits, max_logit, inv_t, weights_.data());
    const double sum = Sum(weights_);
    double u = Uniform01(rng) * sum;
    for (int i = 0; i < vocab_size_; ++i) {
      u -= weights_[i];
      if (u < 0 && weights_[i] > 0) return static_cast<uint32_t>(i);
    }
    return ArgMax(logits);
  }

  // Candidates with their weight w = exp((l - max) / T) = p / p_max; a total order (weight, then
  // lowest id) keeps the selection deterministic.
  weights_.resize(vocab_size_);
  ExpShifted(logits, max_logit, inv_t, weights_.data());
  auto collect = [&](float min_w) {
    candidates_.clear();
    double mass = 0;
    for (int i = 0; i < vocab_size_; ++i) {
      if (weights_[i] > 0 && weights_[i] >= min_w) {
        candidates_.push_back({weights_[i], i});
        mass += weights_[i];
      }
    }
    return mass;
  };
  auto better = [](const Candidate& a, const Candidate& b) { return a.w > b.w || (a.w == b.w && a.id < b.id); };
  double total = 0;  // the mass top-p is a fraction of: after top-k, before min-p
  if (use_top_k) {
    // The k best are among the tokens within 1e-4 of the top when there are k of those.
    collect(1e-4f);
    if (candidates_.size() < static_cast<size_t>(p.top_k)) collect(0.0f);
    if (static_cast<size_t>(p.top_k) < candidates_.size()) {
      std::nth_element(candidates_.begin(), candidates_.begin() + (p.top_k - 1), candidates_.end(), better);
      candidates_.resize(p.top_k);
    }
    for (const Candidate& c : candidates_) total += c.w;
  } else {
    // Without top-k, candidates below min_p can never be chosen; for top-p, first try the tokens
    // within 1e-4 of the top probability: if they already hold the nucleus's mass, the nucleus
    // lies among them (it is a best-first prefix) and the long tail need not be partitioned.
    total = Sum(weights_);
    const float kTail = 1e-4f;
    const bool try_head = p.top_p < 1.0f && p.min_p < kTail;
    const double head_mass = collect(try_head ? kTail : p.min_p);
    if (try_head && head_mass < static_cast<double>(p.top_p) * total) collect(p.min_p);
  }
  auto first = candidates_.begin();
  size_t keep = candidates_.size();
  if (p.top_p < 1.0f) {
    // Smallest best-first prefix whose mass reaches top_p, by repeated partitioning (expected
    // linear time): [0, lo) is known to be kept, the boundary lies in [lo, hi).
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
    const double lse = LogSumExp(logits, weights_);
    logprob->token = token;
    logprob->logprob = static_cast<float>(logits[token] - lse);
    logprob->top.clear();
    if (params.top_logprobs > 0) logprob->top = TopN(logits, params.top_logprobs, lse);
  }
  return token;
}

}  // namespace dyn
