#include "router/active_sequences.h"

#include <gtest/gtest.h>

namespace dyn::router {
namespace {

using std::chrono::seconds;
const WorkerKey kA{1, 0}, kB{2, 0};

TEST(ActiveSequences, AccountingSharedBlocksCountOnce) {
  ActiveSequences act(16);
  const auto t0 = RouterClock::time_point{};
  const std::vector<uint64_t> r1 = {10, 11, 12, 13}, r2 = {10, 11, 20};
  ASSERT_TRUE(act.AddRequest("r1", kA, r1, 64, 1, t0).ok());
  EXPECT_EQ(act.ActiveBlocks(kA), 4);
  EXPECT_EQ(act.ActivePrefillTokens(kA), 48);  // 64 - 1 * 16
  EXPECT_EQ(act.NewBlocks(kA, r2), 1);         // 10 and 11 already active
  EXPECT_EQ(act.NewBlocks(kB, r2), 3);
  auto overlap = act.ActiveOverlap(r2);
  EXPECT_EQ(overlap.size(), 1u);
  EXPECT_EQ(overlap[kA], 2);
  ASSERT_TRUE(act.AddRequest("r2", kA, r2, 50, 2, t0).ok());
  EXPECT_EQ(act.ActiveBlocks(kA), 5);          // 10, 11, 12, 13, 20
  EXPECT_EQ(act.ActivePrefillTokens(kA), 48 + 18);
  EXPECT_EQ(act.ActiveBlocks(kB), 0);
  EXPECT_FALSE(act.AddRequest("r2", kB, r2, 50, 0, t0).ok());  // duplicate id

  ASSERT_TRUE(act.MarkPrefillCompleted("r1").ok());
  EXPECT_EQ(act.ActivePrefillTokens(kA), 18);
  EXPECT_EQ(act.ActiveBlocks(kA), 5);  // decode still holds the blocks
  ASSERT_TRUE(act.MarkPrefillCompleted("r1").ok());  // idempotent
  EXPECT_EQ(act.ActivePrefillTokens(kA), 18);

  ASSERT_TRUE(act.Free("r2").ok());
  EXPECT_EQ(act.ActiveBlocks(kA), 4);  // 10 and 11 still held by r1
  EXPECT_EQ(act.ActivePrefillTokens(kA), 0);
  EXPECT_EQ(act.Free("r2").code(), StatusCode::kNotFound);
  ASSERT_TRUE(act.Free("r1").ok());
  EXPECT_EQ(act.ActiveBlocks(kA), 0);
  EXPECT_EQ(act.num_requests(), 0u);
  // Overlap larger than the prompt never gives negative prefill.
  ASSERT_TRUE(act.AddRequest("r3", kB, r1, 20, 4, t0).ok());
  EXPECT_EQ(act.ActivePrefillTokens(kB), 0);
}

TEST(ActiveSequences, ExpiryAfter300Seconds) {
  ActiveSequences act(16);
  const auto t0 = RouterClock::time_point{} + seconds(1000);
  const std::vector<uint64_t> b1 = {1, 2}, b2 = {3};
  ASSERT_TRUE(act.AddRequest("old", kA, b1, 32, 0, t0).ok());
  ASSERT_TRUE(act.AddRequest("new", kA, b2, 16, 0, t0 + seconds(200)).ok());
  EXPECT_EQ(act.Expire(t0 + seconds(299)), 0u);
  EXPECT_EQ(act.ActiveBlocks(kA), 3);
  EXPECT_EQ(act.Expire(t0 + seconds(300)), 1u);
  EXPECT_EQ(act.ActiveBlocks(kA), 1);
  EXPECT_EQ(act.ActivePrefillTokens(kA), 16);
  EXPECT_EQ(act.Free("old").code(), StatusCode::kNotFound);
  // A freed and re-added id is not expired by its first addition's entry.
  ASSERT_TRUE(act.Free("new").ok());
  ASSERT_TRUE(act.AddRequest("new", kA, b2, 16, 0, t0 + seconds(450)).ok());
  EXPECT_EQ(act.Expire(t0 + seconds(600)), 0u);
  EXPECT_EQ(act.num_requests(), 1u);
  EXPECT_EQ(act.Expire(t0 + seconds(750)), 1u);
  EXPECT_EQ(act.num_requests(), 0u);
  EXPECT_EQ(act.ActiveBlocks(kA), 0);
}

TEST(ActiveSequences, RemoveWorker) {
  ActiveSequences act(16);
  const std::vector<uint64_t> b = {1, 2};
  ASSERT_TRUE(act.AddRequest("x", kA, b, 32, 0, {}).ok());
  ASSERT_TRUE(act.AddRequest("y", kB, b, 32, 0, {}).ok());
  act.RemoveWorker(kA);
  EXPECT_EQ(act.ActiveBlocks(kA), 0);
  EXPECT_EQ(act.ActiveBlocks(kB), 2);
  EXPECT_EQ(act.num_requests(), 1u);
  EXPECT_EQ(act.Free("x").code(), StatusCode::kNotFound);
  EXPECT_EQ(act.NewBlocks(kA, b), 2);
  EXPECT_EQ(act.NewBlocks(kB, b), 0);
  EXPECT_EQ(act.ActiveOverlap(b).count(kA), 0u);
}

}  // namespace
}  // namespace dyn::router
