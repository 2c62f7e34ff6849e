#include "engine/native/sched/batch_sampler.h"

#include <algorithm>

#include "engine/native/backend/cpu/thread_pool.h"

namespace dyn {

namespace {
// Below this many rows a step samples on the caller: waking the pool costs more than it saves.
constexpr size_t kMinParallelRows = 4;
}  // namespace

BatchSampler::BatchSampler(int vocab_size, int threads) {
  threads = std::max(1, threads);
  for (int i = 0; i < threads; ++i) samplers_.push_back(std::make_unique<Sampler>(vocab_size));
  if (threads > 1) pool_ = std::make_unique<ThreadPool>(threads);
}

BatchSampler::~BatchSampler() = default;

void BatchSampler::Sample(std::span<Row> rows) {
  auto one = [](Sampler& s, Row& r) {
    r.token = s.Sample(r.logits, *r.params, r.prompt, r.output, r.banned, *r.rng, r.logprob);
  };
  if (!pool_ || rows.size() < kMinParallelRows) {
    for (Row& r : rows) one(*samplers_[0], r);
    return;
  }
  // Group g takes rows g, g + groups, ...: a Sampler's scratch is used by one thread at a time.
  const int64_t groups = std::min<int64_t>(static_cast<int64_t>(samplers_.size()), static_cast<int64_t>(rows.size()));
  pool_->ParallelFor(groups, [&](int64_t g) {
    for (size_t i = static_cast<size_t>(g); i < rows.size(); i += static_cast<size_t>(groups)) one(*samplers_[g], rows[i]);
  });
}

}  // namespace dyn
