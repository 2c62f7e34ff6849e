// BatchSampler: the host Sampler over all rows of a step at once, on a pool of threads (each
// with its own Sampler). Rows are independent (each has its own logits, parameters and RNG), so
// the tokens are those of sampling the rows one by one. A device engine's host cores are idle
// while the step's logits are sampled, and a top-p draw over a 128k vocabulary costs ~0.3 ms a
// row on one core: a step of 256 such rows took ~70 ms on the engine thread alone.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "engine/native/sched/sampler.h"

namespace dyn {

class ThreadPool;

class BatchSampler {
 public:
  // threads >= 1 counts the calling thread; 1 samples on the caller only.
  BatchSampler(int vocab_size, int threads);
  ~BatchSampler();

  struct Row {
    std::span<float> logits;  // vocab_size floats, modified in place
    const SamplingParams* params = nullptr;
    std::span<const uint32_t> prompt, output, banned;
    SamplerRng* rng = nullptr;
    TokenLogprob* logprob = nullptr;  // filled when params ask for logprobs; may be null
    uint32_t token = 0;               // out
  };
  // Samples every row (Sampler::Sample each); rows must not share an RNG.
  void Sample(std::span<Row> rows);

 private:
  std::vector<std::unique_ptr<Sampler>> samplers_;  // one per group of rows
  std::unique_ptr<ThreadPool> pool_;                // null with one thread
};

}  // namespace dyn
