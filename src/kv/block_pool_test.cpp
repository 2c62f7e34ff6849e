#include "kv/block_pool.h"

#include <gtest/gtest.h>

#include <numeric>

#include "kv/block_hash.h"

namespace dyn {
namespace {

struct RecordingSink : KvEventSink {
  std::vector<KvEvent> events;
  void OnKvEvent(const KvEvent& e) override { events.push_back(e); }
};

// Tokens [base, base + n).
std::vector<uint32_t> Iota(int n, uint32_t base) {
  std::vector<uint32_t> t(n);
  std::iota(t.begin(), t.end(), base);
  return t;
}

// Allocates blocks for `tokens` (full blocks only), registers them, returns the block table.
std::vector<int32_t> StoreSequence(BlockPool& pool, const std::vector<uint32_t>& tokens) {
  const int bs = pool.block_size();
  auto local = ComputeLocalBlockHashes(tokens, bs);
  auto seq = ComputeSequenceBlockHashes(tokens, bs);
  std::vector<int32_t> table;
  EXPECT_TRUE(pool.Allocate(static_cast<int>(seq.size()), table));
  pool.RegisterBlocks(table, seq, local, std::nullopt, std::span(tokens).first(seq.size() * bs));
  return table;
}

TEST(BlockPoolTest, AllocateAndReleaseCounts) {
  BlockPool pool(8, 4);
  EXPECT_EQ(pool.num_free_blocks(), 8);
  std::vector<int32_t> a;
  ASSERT_TRUE(pool.Allocate(5, a));
  EXPECT_EQ(a.size(), 5u);
  EXPECT_EQ(pool.num_used_blocks(), 5);
  std::vector<int32_t> b;
  EXPECT_FALSE(pool.Allocate(4, b));
  EXPECT_TRUE(b.empty());
  EXPECT_EQ(pool.num_free_blocks(), 3);
  pool.Release(a);
  EXPECT_EQ(pool.num_free_blocks(), 8);
  EXPECT_EQ(pool.num_cached_free_blocks(), 0);
}

TEST(BlockPoolTest, RegisteredBlocksStayCachedAndAreReused) {
  BlockPool pool(8, 4);
  auto tokens = Iota(12, 100);
  auto table = StoreSequence(pool, tokens);
  EXPECT_EQ(pool.num_cached_blocks(), 3);
  pool.Release(table);
  EXPECT_EQ(pool.num_free_blocks(), 8);
  EXPECT_EQ(pool.num_cached_free_blocks(), 3);

  // Same first two blocks, different third.
  auto other = Iota(8, 100);
  for (uint32_t t : Iota(4, 900)) other.push_back(t);
  auto hashes = ComputeSequenceBlockHashes(other, 4);
  auto hit = pool.MatchPrefix(hashes, hashes.size());
  ASSERT_EQ(hit.size(), 2u);
  EXPECT_EQ(hit[0], table[0]);
  EXPECT_EQ(hit[1], table[1]);
  EXPECT_EQ(pool.CountUnreferenced(hit), 2);
  pool.Acquire(hit);
  EXPECT_EQ(pool.num_used_blocks(), 2);
  EXPECT_EQ(pool.num_cached_free_blocks(), 1);
  // max_blocks caps the match.
  EXPECT_EQ(pool.MatchPrefix(hashes, 1).size(), 1u);
}

TEST(BlockPoolTest, SharedBlocksAreRefCounted) {
  BlockPool pool(4, 2);
  auto tokens = Iota(4, 1);
  auto table = StoreSequence(pool, tokens);
  auto hit = pool.MatchPrefix(ComputeSequenceBlockHashes(tokens, 2), 2);
  pool.Acquire(hit);
  EXPECT_EQ(pool.RefCount(table[0]), 2);
  pool.Release(table);
  EXPECT_EQ(pool.num_used_blocks(), 2);  // still held by the second user
  pool.Release(hit);
  EXPECT_EQ(pool.num_used_blocks(), 0);
  EXPECT_EQ(pool.num_cached_free_blocks(), 2);
}

TEST(BlockPoolTest, EvictionIsLruAndLeafFirst) {
  BlockPool pool(6, 2);
  auto a = Iota(6, 10), b = Iota(6, 50);
  auto ta = StoreSequence(pool, a);  // 3 blocks
  auto tb = StoreSequence(pool, b);  // 3 blocks
  pool.Release(ta);                  // a released first: older
  pool.Release(tb);
  RecordingSink sink;
  pool.SetEventSink(&sink);
  std::vector<int32_t> got;
  ASSERT_TRUE(pool.Allocate(1, got));
  // The oldest chain's leaf goes first.
  EXPECT_EQ(got[0], ta[2]);
  ASSERT_TRUE(pool.Allocate(1, got));
  EXPECT_EQ(got[1], ta[1]);
  // a's root is still matched; b fully.
  EXPECT_EQ(pool.MatchPrefix(ComputeSequenceBlockHashes(a, 2), 3).size(), 1u);
  EXPECT_EQ(pool.MatchPrefix(ComputeSequenceBlockHashes(b, 2), 3).size(), 3u);
  ASSERT_EQ(sink.events.size(), 2u);
  EXPECT_EQ(sink.events[0].type, KvEvent::Type::kRemoved);
  EXPECT_EQ(sink.events[0].removed, std::vector<uint64_t>{ComputeSequenceBlockHashes(a, 2)[2]});
}

TEST(BlockPoolTest, UnregisteredBlocksAreReusedBeforeCachedOnes) {
  BlockPool pool(4, 2);
  auto tokens = Iota(4, 7);
  auto cached = StoreSequence(pool, tokens);  // 2 registered
  std::vector<int32_t> scratch;
  ASSERT_TRUE(pool.Allocate(2, scratch));    // 2 unregistered
  pool.Release(cached);
  pool.Release(scratch);
  std::vector<int32_t> got;
  ASSERT_TRUE(pool.Allocate(2, got));
  EXPECT_FALSE(pool.IsRegistered(got[0]));
  EXPECT_FALSE(pool.IsRegistered(got[1]));
  EXPECT_EQ(pool.num_cached_free_blocks(), 2);
}

TEST(BlockPoolTest, StoredEventsCarryParentAndTokens) {
  BlockPool pool(8, 2);
  RecordingSink sink;
  pool.SetEventSink(&sink);
  auto tokens = Iota(6, 1);
  auto local = ComputeLocalBlockHashes(tokens, 2);
  auto seq = ComputeSequenceBlockHashes(tokens, 2);
  std::vector<int32_t> table;
  ASSERT_TRUE(pool.Allocate(3, table));
  pool.RegisterBlocks(std::span(table).first(1), std::span(seq).first(1), std::span(local).first(1), std::nullopt,
                      std::span(tokens).first(2));
  pool.RegisterBlocks(std::span(table).subspan(1), std::span(seq).subspan(1), std::span(local).subspan(1), seq[0],
                      std::span(tokens).subspan(2));
  ASSERT_EQ(sink.events.size(), 2u);
  EXPECT_EQ(sink.events[0].event_id, 1u);
  EXPECT_EQ(sink.events[1].event_id, 2u);
  EXPECT_FALSE(sink.events[0].parent_hash.has_value());
  ASSERT_EQ(sink.events[1].blocks.size(), 2u);
  EXPECT_EQ(sink.events[1].parent_hash, seq[0]);
  EXPECT_EQ(sink.events[1].blocks[0].block_hash, seq[1]);
  EXPECT_EQ(sink.events[1].blocks[0].tokens_hash, local[1]);
  EXPECT_EQ(sink.events[1].blocks[1].token_ids, (std::vector<uint32_t>{5, 6}));
  pool.ClearCache();
  EXPECT_EQ(sink.events.back().type, KvEvent::Type::kCleared);
  EXPECT_EQ(sink.events.back().event_id, 3u);
  EXPECT_EQ(pool.last_event_id(), 3u);
  EXPECT_EQ(pool.num_cached_blocks(), 0);
  EXPECT_TRUE(pool.MatchPrefix(seq, 3).empty());
}

TEST(BlockPoolTest, DuplicateHashStaysUnregisteredAndSplitsTheEvent) {
  BlockPool pool(8, 2);
  RecordingSink sink;
  pool.SetEventSink(&sink);
  auto tokens = Iota(6, 1);
  auto first = StoreSequence(pool, tokens);
  // A second request computed the same blocks concurrently.
  auto local = ComputeLocalBlockHashes(tokens, 2);
  auto seq = ComputeSequenceBlockHashes(tokens, 2);
  std::vector<int32_t> dup;
  ASSERT_TRUE(pool.Allocate(3, dup));
  pool.RegisterBlocks(dup, seq, local, std::nullopt, tokens);
  EXPECT_EQ(sink.events.size(), 1u);  // nothing new stored
  EXPECT_FALSE(pool.IsRegistered(dup[0]));
  EXPECT_EQ(pool.MatchPrefix(seq, 3), first);
  pool.Release(dup);
  EXPECT_EQ(pool.num_cached_free_blocks(), 0);
}

TEST(BlockPoolTest, NoPrefixCachingRegistersNothing) {
  BlockPool pool(4, 2, /*enable_prefix_caching=*/false);
  auto tokens = Iota(4, 1);
  auto table = StoreSequence(pool, tokens);
  EXPECT_EQ(pool.num_cached_blocks(), 0);
  pool.Release(table);
  EXPECT_TRUE(pool.MatchPrefix(ComputeSequenceBlockHashes(tokens, 2), 2).empty());
}

}  // namespace
}  // namespace dyn
