#include "engine/native/sched/scheduler.h"

#include <gtest/gtest.h>

#include <map>
#include <numeric>
#include <random>
#include <set>

#include "engine/native/sched/fake_model_for_test.h"

namespace dyn {
namespace {

using testing::FakeModel;

std::vector<uint32_t> Prompt(int n, uint32_t seed) {
  std::vector<uint32_t> t(n);
  for (int i = 0; i < n; ++i) t[i] = (seed * 131 + i * 7) % 64;
  return t;
}

// Drives a scheduler the way an engine does, with a FakeModel forward pass and greedy sampling,
// checking the batch invariants on every step.
class Driver {
 public:
  Driver(int num_blocks, int block_size, SchedulerConfig cfg, bool prefix_caching = true)
      : pool(num_blocks, block_size, prefix_caching), sched(pool, cfg), cfg_(cfg) {
    model.InitKvCache(num_blocks, block_size);
  }

  void Add(SeqId id, std::vector<uint32_t> prompt, int max_tokens) {
    ASSERT_TRUE(sched.Add(id, prompt).ok());
    max_tokens_[id] = max_tokens;
  }

  SchedulerOutput Step() {
    SchedulerOutput out = sched.Schedule();
    CheckInvariants(out);
    std::vector<ForwardSeq> batch;
    int rows = 0;
    for (auto& c : out.batch) {
      batch.push_back({c.tokens, c.start_pos, c.block_table, c.sample});
      rows += c.sample;
    }
    std::vector<float> logits(static_cast<size_t>(rows) * 64);
    if (!batch.empty()) {
      Status st = model.Forward(batch, logits.data());
      EXPECT_TRUE(st.ok()) << st.ToString();
    }
    sched.CommitStep();
    int row = 0;
    for (auto& c : out.batch) {
      if (!c.sample) continue;
      const float* l = logits.data() + 64 * row++;
      const uint32_t tok = static_cast<uint32_t>(std::max_element(l, l + 64) - l);
      outputs[c.id].push_back(tok);
      if (static_cast<int>(outputs[c.id].size()) >= max_tokens_[c.id]) {
        sched.Finish(c.id);
        finished.push_back(c.id);
      } else {
        sched.AppendToken(c.id, tok);
      }
    }
    ++steps;
    return out;
  }

  // Expect `max_tokens` outputs for a sequence added behind the driver's back (imported KV).
  void Expect(SeqId id, int max_tokens) { max_tokens_[id] = max_tokens; }

  void RunToCompletion(int max_steps = 10000) {
    while (sched.has_unfinished() && steps < max_steps) Step();
    ASSERT_FALSE(sched.has_unfinished());
  }

  void CheckInvariants(const SchedulerOutput& out) {
    EXPECT_LE(out.num_batched_tokens, cfg_.max_num_batched_tokens);
    EXPECT_LE(static_cast<int>(out.batch.size()), cfg_.max_num_seqs);
    EXPECT_LE(sched.num_running(), cfg_.max_num_seqs);
    int total = 0;
    std::set<SeqId> ids;
    std::map<int32_t, int> users;
    for (auto& c : out.batch) {
      EXPECT_TRUE(ids.insert(c.id).second) << "sequence twice in a batch";
      EXPECT_FALSE(c.tokens.empty());
      total += static_cast<int>(c.tokens.size());
      EXPECT_GE(static_cast<int>(c.block_table.size()) * pool.block_size(),
                c.start_pos + static_cast<int>(c.tokens.size()));
      // Blocks this chunk writes into must not be shared.
      for (int b = c.start_pos / pool.block_size(); b < static_cast<int>(c.block_table.size()); ++b) {
        EXPECT_EQ(++users[c.block_table[b]], 1) << "two sequences write block " << c.block_table[b];
      }
    }
    EXPECT_EQ(total, out.num_batched_tokens);
    EXPECT_EQ(pool.num_used_blocks() + pool.num_free_blocks(), pool.num_blocks());
  }

  FakeModel model;
  BlockPool pool;
  Scheduler sched;
  std::map<SeqId, std::vector<uint32_t>> outputs;
  std::vector<SeqId> finished;
  int steps = 0;

 private:
  SchedulerConfig cfg_;
  std::map<SeqId, int> max_tokens_;
};

TEST(SchedulerTest, ChunkedPrefillSplitsLongPrompts) {
  Driver d(64, 16, {8, 32});
  d.Add(1, Prompt(100, 1), 3);
  std::vector<int> chunks;
  std::vector<bool> samples;
  while (d.sched.has_unfinished()) {
    auto out = d.Step();
    ASSERT_EQ(out.batch.size(), 1u);
    chunks.push_back(static_cast<int>(out.batch[0].tokens.size()));
    samples.push_back(out.batch[0].sample);
  }
  EXPECT_EQ(chunks, (std::vector<int>{32, 32, 32, 4, 1, 1}));
  EXPECT_EQ(samples, (std::vector<bool>{false, false, false, true, true, true}));
  EXPECT_EQ(d.outputs[1], d.model.Greedy(Prompt(100, 1), 3));
}

TEST(SchedulerTest, RunningFirstThenFcfsAdmissionUnderBudget) {
  Driver d(256, 16, {4, 40});
  for (SeqId id = 1; id <= 6; ++id) d.Add(id, Prompt(30, static_cast<uint32_t>(id)), 5);
  auto s1 = d.Step();
  // 30 + 10 (chunk of the second): both admitted, FCFS.
  ASSERT_EQ(s1.batch.size(), 2u);
  EXPECT_EQ(s1.batch[0].id, 1u);
  EXPECT_EQ(s1.batch[1].id, 2u);
  EXPECT_EQ(s1.batch[1].tokens.size(), 10u);
  EXPECT_FALSE(s1.batch[1].sample);
  auto s2 = d.Step();
  // Running first: 1 decodes, 2 continues its prompt, then 3 gets what is left.
  ASSERT_GE(s2.batch.size(), 2u);
  EXPECT_EQ(s2.batch[0].id, 1u);
  EXPECT_EQ(s2.batch[0].tokens.size(), 1u);
  EXPECT_EQ(s2.batch[1].id, 2u);
  EXPECT_EQ(s2.batch[1].tokens.size(), 20u);
  EXPECT_EQ(s2.num_decode_tokens, 1);
  d.RunToCompletion();
  for (SeqId id = 1; id <= 6; ++id) EXPECT_EQ(d.outputs[id], d.model.Greedy(Prompt(30, static_cast<uint32_t>(id)), 5));
  EXPECT_LE(d.model.max_batch_seqs.load(), 4);
}

TEST(SchedulerTest, RandomWorkloadKeepsInvariantsAndOutputs) {
  std::mt19937 rng(7);
  Driver d(20, 8, {6, 64});
  std::map<SeqId, std::pair<std::vector<uint32_t>, int>> reqs;
  for (SeqId id = 1; id <= 40; ++id) {
    auto p = Prompt(1 + static_cast<int>(rng() % 90), static_cast<uint32_t>(rng() % 5));  // shared prefixes
    p.push_back(static_cast<uint32_t>(id % 64));
    int max_tokens = 1 + static_cast<int>(rng() % 30);
    reqs[id] = {p, max_tokens};
  }
  SeqId next = 1;
  while (next <= 40 || d.sched.has_unfinished()) {
    for (int k = 0; k < 3 && next <= 40; ++k, ++next) d.Add(next, reqs[next].first, reqs[next].second);
    d.Step();
    ASSERT_LT(d.steps, 20000);
  }
  for (auto& [id, r] : reqs) EXPECT_EQ(d.outputs[id], d.model.Greedy(r.first, r.second)) << "request " << id;
  EXPECT_GT(d.sched.num_preemptions(), 0u);  // the pool is small on purpose
  EXPECT_GT(d.sched.prefix_hit_tokens(), 0u);
  EXPECT_EQ(d.pool.num_used_blocks(), 0);
}

TEST(SchedulerTest, PrefixReuseComputesOnlyTheSuffix) {
  Driver d(64, 16, {8, 512});
  auto a = Prompt(70, 3);
  d.Add(1, a, 2);
  d.RunToCompletion();
  const uint64_t before = d.model.computed_tokens;
  auto b = Prompt(64, 3);  // the same first 64 tokens (4 blocks)
  b.push_back(60);
  b.push_back(61);
  d.Add(2, b, 2);
  d.Step();
  EXPECT_EQ(d.sched.first_cached_tokens(2), 64);  // 4 blocks; the partial tail is computed
  EXPECT_EQ(d.model.computed_tokens - before, 2u);
  d.RunToCompletion();
  EXPECT_EQ(d.outputs[2], d.model.Greedy(b, 2));
  EXPECT_EQ(d.sched.prefix_hit_tokens(), 64u);
}

TEST(SchedulerTest, FullyCachedPromptRecomputesItsLastBlock) {
  Driver d(64, 16, {8, 512});
  auto a = Prompt(48, 4);
  d.Add(1, a, 1);
  d.RunToCompletion();
  const uint64_t before = d.model.computed_tokens;
  d.Add(2, a, 1);
  d.Step();
  EXPECT_EQ(d.sched.Contains(2), false);  // finished after its one token
  EXPECT_EQ(d.model.computed_tokens - before, 16u);
  EXPECT_EQ(d.outputs[2], d.outputs[1]);
}

TEST(SchedulerTest, PrefixCachingOffComputesEverything) {
  Driver d(64, 16, {8, 512}, /*prefix_caching=*/false);
  auto a = Prompt(48, 4);
  d.Add(1, a, 1);
  d.RunToCompletion();
  const uint64_t before = d.model.computed_tokens;
  d.Add(2, a, 1);
  d.RunToCompletion();
  EXPECT_EQ(d.model.computed_tokens - before, 48u);
  EXPECT_EQ(d.sched.prefix_hit_tokens(), 0u);
}

TEST(SchedulerTest, PreemptsNewestAndResumesWithGeneratedTokens) {
  // 6 blocks of 4 tokens; two sequences of 8-token prompts generating 12 tokens each need 10
  // blocks together: the second must be preempted and later recomputed.
  Driver d(6, 4, {4, 64}, /*prefix_caching=*/false);
  d.Add(1, Prompt(8, 1), 12);
  d.Add(2, Prompt(8, 2), 12);
  bool saw_preemption = false;
  while (d.sched.has_unfinished()) {
    auto out = d.Step();
    if (!out.preempted.empty()) {
      saw_preemption = true;
      EXPECT_EQ(out.preempted[0], 2u);  // the most recently admitted
      EXPECT_EQ(d.sched.num_waiting(), 1);
    }
    ASSERT_LT(d.steps, 1000);
  }
  EXPECT_TRUE(saw_preemption);
  EXPECT_EQ(d.sched.num_preemptions(), 1u);
  EXPECT_EQ(d.finished, (std::vector<SeqId>{1, 2}));
  EXPECT_EQ(d.outputs[1], d.model.Greedy(Prompt(8, 1), 12));
  EXPECT_EQ(d.outputs[2], d.model.Greedy(Prompt(8, 2), 12));
  // Recompute: 2's prompt and its generated tokens so far were computed twice.
  EXPECT_GT(d.model.computed_tokens.load(), 2u * (8 + 12 - 1));
}

TEST(SchedulerTest, FinishFreesBlocksOfRunningAndWaiting) {
  Driver d(16, 4, {1, 64});
  d.Add(1, Prompt(20, 1), 100);
  d.Add(2, Prompt(20, 2), 100);
  d.Step();
  EXPECT_EQ(d.sched.num_running(), 1);
  EXPECT_EQ(d.sched.num_waiting(), 1);
  EXPECT_GT(d.pool.num_used_blocks(), 0);
  EXPECT_TRUE(d.sched.Finish(2));
  EXPECT_TRUE(d.sched.Finish(1));
  EXPECT_FALSE(d.sched.Finish(1));
  EXPECT_EQ(d.pool.num_used_blocks(), 0);
  EXPECT_FALSE(d.sched.has_unfinished());
  // The computed full blocks stay cached.
  EXPECT_EQ(d.pool.num_cached_free_blocks(), 5);
}

TEST(SchedulerTest, FcfsHeadBlocksLaterRequests) {
  // 10 blocks of 4. Request 1 holds 6; request 2 needs 6 and must wait; request 3 (1 block)
  // would fit but may not overtake 2.
  Driver d(10, 4, {8, 256}, false);
  d.Add(1, Prompt(23, 1), 2);
  d.Step();
  d.Add(2, Prompt(24, 2), 1);
  d.Add(3, Prompt(2, 3), 1);
  auto out = d.Step();
  ASSERT_EQ(out.batch.size(), 1u);
  EXPECT_EQ(out.batch[0].id, 1u);
  EXPECT_EQ(d.sched.num_waiting(), 2);
  d.RunToCompletion();
  EXPECT_EQ(d.finished, (std::vector<SeqId>{1, 2, 3}));
}

TEST(SchedulerTest, MaxNumSeqsCapsRunning) {
  Driver d(256, 16, {3, 1024});
  for (SeqId id = 1; id <= 10; ++id) d.Add(id, Prompt(5, static_cast<uint32_t>(id)), 4);
  auto out = d.Step();
  EXPECT_EQ(out.batch.size(), 3u);
  EXPECT_EQ(d.sched.num_waiting(), 7);
  d.RunToCompletion();
  EXPECT_EQ(d.finished.size(), 10u);
}

TEST(SchedulerTest, RejectsWhatCanNeverFit) {
  BlockPool pool(4, 4);
  Scheduler sched(pool, {4, 64});
  Status st = sched.Add(1, Prompt(17, 1));
  EXPECT_EQ(st.code(), StatusCode::kResourceExhausted);
  EXPECT_NE(st.message().find("KV blocks"), std::string::npos);
  EXPECT_EQ(sched.Add(2, {}).code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(sched.Add(3, Prompt(16, 1)).ok());
  EXPECT_EQ(sched.Add(3, Prompt(4, 1)).code(), StatusCode::kInvalidArgument);
}

TEST(SchedulerTest, SequenceOutgrowingThePoolFailsInsteadOfLooping) {
  Driver d(3, 4, {4, 64}, false);
  d.Add(1, Prompt(10, 1), 100);  // would need 28 tokens of KV: more than 12
  std::vector<std::pair<SeqId, Status>> failed;
  for (int i = 0; i < 50 && d.sched.has_unfinished(); ++i) {
    auto out = d.Step();
    for (auto& f : out.failed) failed.push_back(f);
  }
  ASSERT_EQ(failed.size(), 1u);
  EXPECT_EQ(failed[0].first, 1u);
  EXPECT_EQ(failed[0].second.code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(d.pool.num_used_blocks(), 0);
}

// Disaggregated serving: prefill on one scheduler+model, detach the blocks, copy them into blocks
// reserved on another, activate there with the first token, decode: the output equals serving
// the request in one place, and both pools end with no block in use.
TEST(SchedulerTest, PrefillThenDecodeElsewhereGivesTheSameOutput) {
  const SchedulerConfig cfg{4, 32, 0};
  Driver prefill(64, 4, cfg), decode(64, 4, cfg);
  auto move_request = [&](SeqId id, const std::vector<uint32_t>& prompt, int max_tokens) -> int {
    prefill.Add(id, prompt, 1000);
    while (prefill.outputs[id].empty()) prefill.Step();
    const uint32_t first = prefill.outputs[id][0];
    std::vector<int32_t> src = prefill.sched.Detach(id);
    EXPECT_EQ(static_cast<int>(src.size()), (static_cast<int>(prompt.size()) + 3) / 4);
    auto plan = decode.sched.ReserveForImport(id, prompt);
    EXPECT_TRUE(plan.ok()) << plan.status().ToString();
    if (!plan.ok()) return -1;
    EXPECT_EQ(plan->block_table.size(), src.size());
    EXPECT_EQ(decode.sched.num_importing(), 1);
    for (size_t b = plan->cached_blocks; b < src.size(); ++b) {
      decode.model.WriteBlock(plan->block_table[b], prefill.model.ReadBlock(src[b]));
    }
    prefill.sched.ReleaseDetached(src);
    decode.sched.ActivateImported(id, first);
    decode.outputs[id].push_back(first);
    decode.Expect(id, max_tokens);
    decode.RunToCompletion();
    EXPECT_EQ(decode.outputs[id], prefill.model.Greedy(prompt, max_tokens)) << "request " << id;
    return plan->cached_blocks;
  };
  const std::vector<uint32_t> a = Prompt(23, 1);
  EXPECT_EQ(move_request(1, a, 9), 0);
  // A second prompt sharing a's first 5 full blocks: the decode side already holds them and
  // copies only the rest.
  std::vector<uint32_t> b(a.begin(), a.begin() + 20);
  for (uint32_t t : Prompt(7, 9)) b.push_back(t);
  EXPECT_EQ(move_request(2, b, 6), 5);
  EXPECT_EQ(prefill.pool.num_used_blocks(), 0);
  EXPECT_EQ(decode.pool.num_used_blocks(), 0);
  EXPECT_EQ(decode.sched.num_importing(), 0);
}

TEST(SchedulerTest, ImportWaitsForBlocksAndFinishFreesAReservation) {
  BlockPool pool(4, 4);
  Scheduler s(pool, SchedulerConfig{4, 32, 0});
  auto big = s.ReserveForImport(1, Prompt(12, 3));  // 3 of 4 blocks
  ASSERT_TRUE(big.ok());
  auto no_room = s.ReserveForImport(2, Prompt(8, 4));
  ASSERT_FALSE(no_room.ok());
  EXPECT_EQ(no_room.status().code(), StatusCode::kResourceExhausted);
  EXPECT_FALSE(s.Contains(2));
  EXPECT_EQ(s.ReserveForImport(1, Prompt(4, 5)).status().code(), StatusCode::kInvalidArgument);  // id in use
  EXPECT_TRUE(s.Finish(1));  // the copy failed: the reservation goes
  EXPECT_EQ(pool.num_used_blocks(), 0);
  EXPECT_EQ(s.num_importing(), 0);
  EXPECT_TRUE(s.ReserveForImport(2, Prompt(8, 4)).ok());
}

}  // namespace
}  // namespace dyn
