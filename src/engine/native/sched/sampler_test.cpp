#include "engine/native/sched/sampler.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <set>

#include "engine/native/sched/batch_sampler.h"

namespace dyn {
namespace {

std::vector<float> LogProbs(std::vector<double> p) {
  std::vector<float> l;
  for (double x : p) l.push_back(static_cast<float>(std::log(x)));
  return l;
}

// Draws n tokens and returns the counts per token.
std::vector<int> Histogram(Sampler& s, const std::vector<float>& logits, const SamplingParams& p, int n,
                           uint64_t seed = 1) {
  SamplerRng rng(seed);
  std::vector<int> counts(logits.size());
  for (int i = 0; i < n; ++i) {
    auto l = logits;
    ++counts[s.Sample(l, p, {}, {}, {}, rng, nullptr)];
  }
  return counts;
}

double ChiSquare(const std::vector<int>& counts, const std::vector<double>& expected_p) {
  const double n = std::accumulate(counts.begin(), counts.end(), 0.0);
  double chi = 0;
  for (size_t i = 0; i < counts.size(); ++i) {
    if (expected_p[i] == 0) {
      EXPECT_EQ(counts[i], 0) << "token " << i << " has probability 0";
      continue;
    }
    const double e = n * expected_p[i];
    chi += (counts[i] - e) * (counts[i] - e) / e;
  }
  return chi;
}

SamplingParams Greedy() {
  SamplingParams p;
  p.temperature = 0;
  return p;
}

TEST(SamplerTest, GreedyTakesArgmaxAndLowestIdOnTies) {
  Sampler s(5);
  SamplerRng rng(1);
  std::vector<float> l = {0.5f, 2.0f, -1.0f, 2.0f, 1.0f};
  EXPECT_EQ(s.Sample(l, Greedy(), {}, {}, {}, rng, nullptr), 1u);
}

TEST(SamplerTest, RepetitionPenaltyIsHfStyleOverPromptAndOutput) {
  Sampler s(4);
  SamplerRng rng(1);
  SamplingParams p = Greedy();
  p.repetition_penalty = 2.0f;
  std::vector<float> l = {3.0f, -1.0f, 2.0f, 1.0f};
  std::vector<uint32_t> prompt = {0, 1, 0}, output = {1};
  EXPECT_EQ(s.Sample(l, p, prompt, output, {}, rng, nullptr), 2u);
  EXPECT_FLOAT_EQ(l[0], 1.5f);   // divided once despite repeats
  EXPECT_FLOAT_EQ(l[1], -2.0f);  // negative: multiplied
  EXPECT_FLOAT_EQ(l[2], 2.0f);
  EXPECT_FLOAT_EQ(l[3], 1.0f);
}

TEST(SamplerTest, FrequencyAndPresencePenaltiesCountOutputOnly) {
  Sampler s(6);
  SamplerRng rng(1);
  SamplingParams p = Greedy();
  p.frequency_penalty = 0.5f;
  p.presence_penalty = 1.0f;
  std::vector<float> l(6, 4.0f);
  std::vector<uint32_t> prompt = {1, 1, 1}, output = {3, 3, 5};
  s.Sample(l, p, prompt, output, {}, rng, nullptr);
  EXPECT_FLOAT_EQ(l[1], 4.0f);
  EXPECT_FLOAT_EQ(l[3], 4.0f - 2 * 0.5f - 1.0f);
  EXPECT_FLOAT_EQ(l[5], 4.0f - 0.5f - 1.0f);
  // Scratch state is reset: a second call without output leaves logits alone.
  std::vector<float> l2(6, 4.0f);
  s.Sample(l2, p, prompt, {}, {}, rng, nullptr);
  EXPECT_EQ(l2, std::vector<float>(6, 4.0f));
}

TEST(SamplerTest, BannedTokensAreNeverChosen) {
  Sampler s(3);
  SamplerRng rng(1);
  std::vector<float> l = {5.0f, 1.0f, 0.0f};
  std::vector<uint32_t> banned = {0};
  EXPECT_EQ(s.Sample(l, Greedy(), {}, {}, banned, rng, nullptr), 1u);
  SamplingParams t;
  for (int i = 0; i < 200; ++i) {
    std::vector<float> l2 = {5.0f, 1.0f, 0.0f};
    EXPECT_NE(s.Sample(l2, t, {}, {}, banned, rng, nullptr), 0u);
  }
}

// Critical value of chi-square with 3 degrees of freedom at p = 0.001.
constexpr double kChi3 = 16.27;

TEST(SamplerTest, TemperatureOneFollowsTheDistribution) {
  Sampler s(4);
  std::vector<double> p = {0.1, 0.2, 0.3, 0.4};
  auto counts = Histogram(s, LogProbs(p), SamplingParams{}, 40000);
  EXPECT_LT(ChiSquare(counts, p), kChi3);
}

TEST(SamplerTest, TemperatureSharpensAndFlattens) {
  Sampler s(4);
  std::vector<double> p = {0.1, 0.2, 0.3, 0.4};
  SamplingParams half;
  half.temperature = 0.5f;  // p^2, renormalised
  std::vector<double> sharp = {0.01, 0.04, 0.09, 0.16};
  for (double& x : sharp) x /= 0.30;
  EXPECT_LT(ChiSquare(Histogram(s, LogProbs(p), half, 40000, 2), sharp), kChi3);
  SamplingParams two;
  two.temperature = 2.0f;  // sqrt(p), renormalised
  std::vector<double> flat;
  double z = 0;
  for (double x : p) z += std::sqrt(x);
  for (double x : p) flat.push_back(std::sqrt(x) / z);
  EXPECT_LT(ChiSquare(Histogram(s, LogProbs(p), two, 40000, 3), flat), kChi3);
  // A wrong distribution is rejected by the same test (the test can fail).
  EXPECT_GT(ChiSquare(Histogram(s, LogProbs(p), two, 40000, 3), p), kChi3);
}

TEST(SamplerTest, TopKTopPMinPTruncate) {
  Sampler s(4);
  std::vector<double> p = {0.1, 0.2, 0.3, 0.4};
  SamplingParams k;
  k.top_k = 2;
  EXPECT_LT(ChiSquare(Histogram(s, LogProbs(p), k, 20000, 4), {0, 0, 3.0 / 7, 4.0 / 7}), kChi3);
  SamplingParams tp;
  tp.top_p = 0.5f;  // 0.4 < 0.5 <= 0.7: keep {3, 2}
  EXPECT_LT(ChiSquare(Histogram(s, LogProbs(p), tp, 20000, 5), {0, 0, 3.0 / 7, 4.0 / 7}), kChi3);
  tp.top_p = 0.35f;
  EXPECT_LT(ChiSquare(Histogram(s, LogProbs(p), tp, 2000, 6), {0, 0, 0, 1}), kChi3);
  SamplingParams mp;
  mp.min_p = 0.6f;  // keep p >= 0.24
  EXPECT_LT(ChiSquare(Histogram(s, LogProbs(p), mp, 20000, 7), {0, 0, 3.0 / 7, 4.0 / 7}), kChi3);
  mp.min_p = 0.4f;  // keep p >= 0.16
  EXPECT_LT(ChiSquare(Histogram(s, LogProbs(p), mp, 20000, 8), {0, 2.0 / 9, 3.0 / 9, 4.0 / 9}), kChi3);
}

TEST(SamplerTest, TopPOnALargeVocabularyStaysInTheNucleus) {
  const int vocab = 49152;
  Sampler s(vocab);
  SamplerRng init(9);
  std::vector<float> logits(vocab);
  for (float& l : logits) l = static_cast<float>(static_cast<double>(init() >> 11) * 0x1.0p-53 * 12.0);
  // Brute-force nucleus for top_p = 0.9.
  std::vector<int> order(vocab);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int a, int b) { return logits[a] > logits[b]; });
  const float mx = logits[order[0]];
  double z = 0;
  for (float l : logits) z += std::exp(l - mx);
  std::vector<bool> in_nucleus(vocab);
  double cum = 0;
  int nucleus = 0;
  for (int id : order) {
    in_nucleus[id] = true;
    ++nucleus;
    cum += std::exp(logits[id] - mx) / z;
    if (cum >= 0.9) break;
  }
  SamplingParams p;
  p.top_p = 0.9f;
  SamplerRng rng(10);
  for (int i = 0; i < 300; ++i) {
    auto l = logits;
    EXPECT_TRUE(in_nucleus[s.Sample(l, p, {}, {}, {}, rng, nullptr)]);
  }
  EXPECT_GT(nucleus, 64);  // exercises the growing partial sort
}

TEST(SamplerTest, SeedMakesSamplingReproducible) {
  Sampler s(50);
  std::vector<float> logits(50);
  for (int i = 0; i < 50; ++i) logits[i] = static_cast<float>((i * 37) % 11) * 0.3f;
  SamplingParams p;
  p.seed = 1234;
  p.top_p = 0.95f;
  auto run = [&](const SamplingParams& params) {
    SamplerRng rng = MakeSamplerRng(params);
    std::vector<uint32_t> out;
    for (int i = 0; i < 100; ++i) {
      auto l = logits;
      out.push_back(s.Sample(l, params, {}, {}, {}, rng, nullptr));
    }
    return out;
  };
  auto a = run(p), b = run(p);
  EXPECT_EQ(a, b);
  SamplingParams other = p;
  other.seed = 1235;
  EXPECT_NE(run(other), a);
  SamplingParams unseeded = p;
  unseeded.seed.reset();
  EXPECT_NE(run(unseeded), run(unseeded));
}

TEST(SamplerTest, LogprobsAreLogSoftmaxAfterPenaltiesBeforeTemperature) {
  Sampler s(4);
  SamplerRng rng(1);
  SamplingParams p;
  p.temperature = 0.0f;
  p.logprobs = true;
  p.top_logprobs = 3;
  p.repetition_penalty = 2.0f;
  std::vector<float> l = {1.0f, 3.0f, 1.0f, 2.0f};
  std::vector<uint32_t> prompt = {1};  // 3 -> 1.5
  TokenLogprob lp;
  const uint32_t tok = s.Sample(l, p, prompt, {}, {}, rng, &lp);
  EXPECT_EQ(tok, 3u);
  const double lse = std::log(std::exp(1.0) + std::exp(1.5) + std::exp(1.0) + std::exp(2.0));
  EXPECT_EQ(lp.token, 3u);
  EXPECT_NEAR(lp.logprob, 2.0 - lse, 1e-5);
  ASSERT_EQ(lp.top.size(), 3u);
  EXPECT_EQ(lp.top[0].token, 3u);
  EXPECT_EQ(lp.top[1].token, 1u);
  EXPECT_EQ(lp.top[2].token, 0u);  // tie with 2: lowest id
  EXPECT_NEAR(lp.top[1].logprob, 1.5 - lse, 1e-5);
  // Temperature does not change the reported logprobs.
  SamplingParams hot = p;
  hot.temperature = 5.0f;
  std::vector<float> l2 = {1.0f, 3.0f, 1.0f, 2.0f};
  TokenLogprob lp2;
  const uint32_t tok2 = s.Sample(l2, hot, prompt, {}, {}, rng, &lp2);
  EXPECT_NEAR(lp2.logprob, l2[tok2] - lse, 1e-5);
  EXPECT_NEAR(lp2.top[0].logprob, 2.0 - lse, 1e-5);
}

TEST(SamplerTest, ValidatesParameters) {
  EXPECT_TRUE(ValidateSamplingParams(SamplingParams{}).ok());
  SamplingParams p;
  p.temperature = -1;
  EXPECT_FALSE(ValidateSamplingParams(p).ok());
  p = {};
  p.top_p = 0;
  EXPECT_FALSE(ValidateSamplingParams(p).ok());
  p = {};
  p.top_k = -1;
  EXPECT_FALSE(ValidateSamplingParams(p).ok());
  p = {};
  p.min_p = 1.5f;
  EXPECT_FALSE(ValidateSamplingParams(p).ok());
  p = {};
  p.repetition_penalty = 0;
  EXPECT_FALSE(ValidateSamplingParams(p).ok());
  p = {};
  p.top_logprobs = 21;
  EXPECT_FALSE(ValidateSamplingParams(p).ok());
}

// A batch sampled on 3 threads gives each row what sampling it alone gives: tokens and logprobs,
// over greedy, top-k/top-p, min-p, penalties and banned ids (each row has its own RNG).
TEST(BatchSamplerTest, ThreadsGiveTheTokensOfOneByOne) {
  const int vocab = 3000, rows = 40;
  std::mt19937 gen(4);
  std::normal_distribution<float> noise(0.0f, 2.0f);
  std::vector<std::vector<float>> logits(rows, std::vector<float>(vocab));
  for (auto& l : logits)
    for (float& x : l) x = noise(gen);
  std::vector<SamplingParams> params(rows);
  for (int r = 0; r < rows; ++r) {
    params[r].temperature = r % 7 == 0 ? 0.0f : 0.6f + 0.1f * (r % 5);
    params[r].top_k = r % 3 == 0 ? 40 : 0;
    params[r].top_p = r % 2 ? 0.9f : 1.0f;
    params[r].min_p = r % 4 == 3 ? 0.05f : 0.0f;
    params[r].repetition_penalty = r % 6 == 1 ? 1.2f : 1.0f;
    params[r].logprobs = r % 5 == 2;
    params[r].top_logprobs = r % 5 == 2 ? 4 : 0;
  }
  const std::vector<uint32_t> prompt = {5, 17, 999, 5}, output = {42, 7}, banned = {1, 2, 3};
  auto run = [&](int threads) {
    BatchSampler sampler(vocab, threads);
    std::vector<std::vector<float>> scratch = logits;
    std::vector<SamplerRng> rngs;
    for (int r = 0; r < rows; ++r) rngs.emplace_back(100 + r);
    std::vector<TokenLogprob> lps(rows);
    std::vector<BatchSampler::Row> batch(rows);
    for (int r = 0; r < rows; ++r) {
      batch[r].logits = scratch[r];
      batch[r].params = &params[r];
      batch[r].prompt = prompt;
      batch[r].output = output;
      batch[r].banned = r % 2 ? std::span<const uint32_t>(banned) : std::span<const uint32_t>();
      batch[r].rng = &rngs[r];
      batch[r].logprob = &lps[r];
    }
    sampler.Sample(batch);
    std::vector<std::pair<uint32_t, float>> out;
    for (int r = 0; r < rows; ++r) out.push_back({batch[r].token, params[r].logprobs ? lps[r].logprob : 0.0f});
    return out;
  };
  const auto one = run(1), three = run(3);
  EXPECT_EQ(three, one);
  std::set<uint32_t> distinct;
  for (auto& [t, lp] : one) distinct.insert(t);
  EXPECT_GT(distinct.size(), 10u);  // rows really differ
  for (int r = 1; r < rows; r += 2) {
    EXPECT_TRUE(one[r].first < 1 || one[r].first > 3) << "a banned id was drawn, row " << r;
  }
}

}  // namespace
}  // namespace dyn
