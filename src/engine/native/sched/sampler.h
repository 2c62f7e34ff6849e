// Sampler: turns one sequence's logits into its next token.
//
// Order of operations:
//   1. penalties on the raw logits: repetition (HF style, over prompt + output tokens: positive
//      logits are divided by the penalty, negative ones multiplied), then frequency and presence
//      (OpenAI style, over output tokens: logit -= count * frequency + presence), then banned
//      tokens (EOS and stop ids before min_tokens) are set to -inf;
//   2. logprobs, when asked for, are the log-softmax of these penalised logits: before
//      temperature and truncation, so they describe the model (plus penalties) rather than the
//      sampling knobs, and greedy and sampled requests report comparable numbers;
//   3. temperature 0 is greedy: argmax, ties to the lowest id; otherwise logits / temperature,
//      then top-k, then top-p (smallest set of most likely tokens whose mass reaches top_p,
//      computed after top-k), then min-p (drop tokens below min_p * the top probability), and a
//      draw from what is left with the request's own RNG.
// A request's RNG is seeded from SamplingParams::seed when given (same request, same seed -> same
// tokens, whatever else is batched) and from std::random_device otherwise.
#pragma once

#include <cstdint>
#include <random>
#include <span>
#include <vector>

#include "base/status.h"
#include "engine/engine.h"

namespace dyn {

using SamplerRng = std::mt19937_64;

// Checks ranges: temperature >= 0, 0 < top_p <= 1, top_k >= 0, 0 <= min_p <= 1,
// repetition_penalty > 0, 0 <= top_logprobs <= 20, all finite.
Status ValidateSamplingParams(const SamplingParams& params);

SamplerRng MakeSamplerRng(const SamplingParams& params);

// Uniform in [0, 1) from the top 53 bits: same values on every platform (unlike std::
// uniform_real_distribution, whose algorithm is the library's choice). Sampler's draws use it.
inline double SamplerUniform01(SamplerRng& rng) { return static_cast<double>(rng() >> 11) * 0x1.0p-53; }

// Whether a device backend can sample with these params (Model::ForwardSample): greedy or
// temperature sampling at one SamplerUniform01 draw as Sample would make (plain: the same token;
// truncated, where the device can: the same kept set and distribution); penalties and logprobs
// need this Sampler.
// `truncation`: the device also applies top-k / top-p / min-p (Model::samples_truncated_on_device).
inline bool DeviceSamplable(const SamplingParams& p, int vocab_size, bool truncation = false) {
  return p.repetition_penalty == 1.0f && p.frequency_penalty == 0.0f && p.presence_penalty == 0.0f && !p.logprobs &&
         p.top_logprobs == 0 &&
         (p.temperature == 0.0f || truncation || ((p.top_k <= 0 || p.top_k >= vocab_size) && p.top_p >= 1.0f && p.min_p <= 0.0f));
}

// Owns scratch buffers sized to the vocabulary; one per thread (not thread-safe).
class Sampler {
 public:
  explicit Sampler(int vocab_size);

  // Picks the next token. `logits` (vocab_size floats) is modified in place. `prompt` and
  // `output` are the sequence's tokens so far (all < vocab_size); `banned` tokens get -inf.
  // With params.logprobs or top_logprobs > 0 and `logprob` non-null, fills it.
  uint32_t Sample(std::span<float> logits, const SamplingParams& params, std::span<const uint32_t> prompt,
                  std::span<const uint32_t> output, std::span<const uint32_t> banned, SamplerRng& rng,
                  TokenLogprob* logprob);

 private:
  void ApplyPenalties(std::span<float> logits, const SamplingParams& params, std::span<const uint32_t> prompt,
                      std::span<const uint32_t> output);
  uint32_t Draw(std::span<const float> logits, const SamplingParams& params, SamplerRng& rng);

  int vocab_size_;
  std::vector<int32_t> counts_;       // per token, zero between calls
  std::vector<uint8_t> seen_;         // per token, zero between calls
  struct Candidate {
    float w;  // exp((logit - max) / temperature)
    int32_t id;
  };
  std::vector<Candidate> candidates_;
  std::vector<float> weights_;
};

}  // namespace dyn
