// Scheduler and sampler microbenchmarks.
#include <benchmark/benchmark.h>

#include <random>

#include "engine/native/sched/batch_sampler.h"
#include "engine/native/sched/sampler.h"
#include "engine/native/sched/scheduler.h"

namespace dyn {
namespace {

// One decode step with `n` running sequences (prompts of 512 tokens, all prefilled): Schedule,
// CommitStep and AppendToken for every sequence. Sequences are replaced when they reach 1024
// tokens, so prefix hashing of newly full blocks is included at its steady rate.
void BM_SchedulerDecodeStep(benchmark::State& state) {
  const int n = static_cast<int>(state.range(0));
  BlockPool pool(16384, 16);
  Scheduler sched(pool, SchedulerConfig{n, 8192, 0});
  std::mt19937 rng(1);
  SeqId next = 1;
  auto add = [&] {
    std::vector<uint32_t> prompt(512);
    for (auto& t : prompt) t = rng() % 32000;
    (void)sched.Add(next++, std::move(prompt));
  };
  for (int i = 0; i < n; ++i) add();
  for (int i = 0; i < 100 && sched.num_waiting() > 0; ++i) {  // prefill everything
    auto out = sched.Schedule();
    sched.CommitStep();
    for (auto& c : out.batch) {
      if (c.sample) sched.AppendToken(c.id, 7);
    }
  }
  int batch = 0;
  for (auto _ : state) {
    auto out = sched.Schedule();
    sched.CommitStep();
    batch = static_cast<int>(out.batch.size());
    for (auto& c : out.batch) {
      if (!c.sample) continue;
      if (sched.tokens(c.id).size() >= 1024) {
        sched.Finish(c.id);
        add();
      } else {
        sched.AppendToken(c.id, static_cast<uint32_t>(rng() % 32000));
      }
    }
  }
  state.counters["batch"] = batch;
  state.SetItemsProcessed(state.iterations() * n);
}
BENCHMARK(BM_SchedulerDecodeStep)->Arg(64)->Arg(256);

// Logits shaped like a language model's: mostly N(0, 2), a few tokens well above.
std::vector<float> LmLikeLogits(int vocab) {
  std::mt19937 rng(3);
  std::normal_distribution<float> noise(0.0f, 2.0f);
  std::vector<float> l(vocab);
  for (auto& x : l) x = noise(rng);
  for (int i = 0; i < 20; ++i) l[rng() % vocab] += 8.0f + static_cast<float>(i % 5);
  return l;
}

void RunSampler(benchmark::State& state, const SamplingParams& params) {
  const int vocab = static_cast<int>(state.range(0));
  const auto logits = LmLikeLogits(vocab);
  std::vector<float> scratch(vocab);
  std::vector<uint32_t> prompt(256), output(128);
  for (size_t i = 0; i < prompt.size(); ++i) prompt[i] = static_cast<uint32_t>(i * 97 % vocab);
  for (size_t i = 0; i < output.size(); ++i) output[i] = static_cast<uint32_t>(i * 31 % vocab);
  Sampler sampler(vocab);
  SamplerRng rng(5);
  for (auto _ : state) {
    scratch = logits;  // the engine samples each row once, in place
    benchmark::DoNotOptimize(sampler.Sample(scratch, params, prompt, output, {}, rng, nullptr));
  }
  state.SetItemsProcessed(state.iterations());
}

void BM_SampleGreedy(benchmark::State& state) {
  SamplingParams p;
  p.temperature = 0;
  RunSampler(state, p);
}
BENCHMARK(BM_SampleGreedy)->Arg(49152)->Arg(151936);

void BM_SampleTopP(benchmark::State& state) {
  SamplingParams p;
  p.temperature = 0.8f;
  p.top_p = 0.95f;
  RunSampler(state, p);
}
BENCHMARK(BM_SampleTopP)->Arg(49152)->Arg(151936);

void BM_SampleTopKTopPPenalties(benchmark::State& state) {
  SamplingParams p;
  p.temperature = 0.7f;
  p.top_k = 50;
  p.top_p = 0.9f;
  p.repetition_penalty = 1.1f;
  p.frequency_penalty = 0.2f;
  RunSampler(state, p);
}
BENCHMARK(BM_SampleTopKTopPPenalties)->Arg(49152)->Arg(151936);

// A step's host sampling: 64 rows of Llama 3's vocabulary (128256) at top_p 0.95, on 1 or 2
// threads (BatchSampler, what the engine runs); items = rows. The logits are restored between
// iterations (sampling modifies them in place) outside the timed part.
void BM_BatchSampleTopP(benchmark::State& state) {
  const int vocab = 128256, rows = 64, threads = static_cast<int>(state.range(0));
  const auto logits = LmLikeLogits(vocab);
  std::vector<std::vector<float>> scratch(rows);
  std::vector<SamplerRng> rngs;
  for (int r = 0; r < rows; ++r) rngs.emplace_back(r + 1);
  SamplingParams p;
  p.temperature = 0.8f;
  p.top_p = 0.95f;
  BatchSampler sampler(vocab, threads);
  std::vector<BatchSampler::Row> batch(rows);
  for (auto _ : state) {
    state.PauseTiming();
    for (int r = 0; r < rows; ++r) {
      scratch[r] = logits;
      batch[r].logits = scratch[r];
      batch[r].params = &p;
      batch[r].rng = &rngs[r];
    }
    state.ResumeTiming();
    sampler.Sample(batch);
    benchmark::DoNotOptimize(batch[0].token);
  }
  state.SetItemsProcessed(state.iterations() * rows);
}
BENCHMARK(BM_BatchSampleTopP)->Arg(1)->Arg(2)->UseRealTime();

void BM_SampleTemperatureOnly(benchmark::State& state) {
  SamplingParams p;
  p.temperature = 1.0f;
  RunSampler(state, p);
}
BENCHMARK(BM_SampleTemperatureOnly)->Arg(49152)->Arg(151936);

void BM_SampleGreedyWithLogprobs(benchmark::State& state) {
  const int vocab = static_cast<int>(state.range(0));
  const auto logits = LmLikeLogits(vocab);
  std::vector<float> scratch(vocab);
  Sampler sampler(vocab);
  SamplerRng rng(5);
  SamplingParams p;
  p.temperature = 0;
  p.logprobs = true;
  p.top_logprobs = 5;
  TokenLogprob lp;
  for (auto _ : state) {
    scratch = logits;
    benchmark::DoNotOptimize(sampler.Sample(scratch, p, {}, {}, {}, rng, &lp));
  }
}
BENCHMARK(BM_SampleGreedyWithLogprobs)->Arg(151936);

// The copy that every sampler benchmark above includes, for subtraction.
void BM_CopyLogits(benchmark::State& state) {
  const int vocab = static_cast<int>(state.range(0));
  const auto logits = LmLikeLogits(vocab);
  std::vector<float> scratch(vocab);
  for (auto _ : state) {
    scratch = logits;
    benchmark::DoNotOptimize(scratch.data());
  }
}
BENCHMARK(BM_CopyLogits)->Arg(49152)->Arg(151936);

}  // namespace
}  // namespace dyn

BENCHMARK_MAIN();
