#include "router/radix_indexer.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <map>

namespace dyn::router {
namespace {

// Local hash of a distinct 16-token block named by `id`.
uint64_t Local(uint32_t id) {
  std::vector<uint32_t> t(16);
  for (uint32_t i = 0; i < 16; ++i) t[i] = id * 16 + i;
  return HashBlockTokens(t);
}

std::vector<uint64_t> Seq(const std::vector<uint32_t>& ids) {
  std::vector<uint64_t> out;
  for (uint32_t id : ids) out.push_back(out.empty() ? Local(id) : ChainBlockHash(out.back(), Local(id)));
  return out;
}

// Stored event for a chain of blocks; engine ids are arbitrary (id + 7000 + 100 * worker) so the
// test proves they are only used as ids.
RouterEvent Stored(WorkerKey w, uint64_t event_id, std::optional<uint32_t> parent, const std::vector<uint32_t>& ids) {
  auto engine = [&](uint32_t id) { return uint64_t{id} + 7000 + 100 * w.worker_id + 1000 * w.dp_rank; };
  StoredData sd;
  if (parent) sd.parent_hash = engine(*parent);
  for (uint32_t id : ids) sd.blocks.push_back(StoredBlock{engine(id), Local(id), {}});
  return RouterEvent{w, event_id, StorageTier::kDevice, sd};
}

RouterEvent Removed(WorkerKey w, uint64_t event_id, const std::vector<uint32_t>& ids) {
  RemovedData rd;
  for (uint32_t id : ids) rd.block_hashes.push_back(uint64_t{id} + 7000 + 100 * w.worker_id + 1000 * w.dp_rank);
  return RouterEvent{w, event_id, StorageTier::kDevice, rd};
}

std::map<WorkerKey, uint32_t> Depths(const RadixIndexer& idx, const std::vector<uint32_t>& ids) {
  std::map<WorkerKey, uint32_t> out;
  for (const WorkerMatch& m : idx.FindMatches(Seq(ids))) out[m.worker] = m.depth;
  return out;
}

const WorkerKey kA{1, 0}, kB{2, 0};

TEST(RadixIndexer, PartialMatchAndTreeSize) {
  RadixIndexer idx;
  ASSERT_EQ(idx.ApplyEvent(Stored(kA, 1, std::nullopt, {1, 2, 3})).code, ApplyCode::kApplied);
  ASSERT_EQ(idx.ApplyEvent(Stored(kB, 1, std::nullopt, {1, 4})).code, ApplyCode::kApplied);
  auto d = Depths(idx, {1, 2, 5});
  EXPECT_EQ(d[kA], 2u);
  EXPECT_EQ(d[kB], 1u);
  d = Depths(idx, {1, 2, 3, 9});
  EXPECT_EQ(d[kA], 3u);
  EXPECT_EQ(Depths(idx, {9, 1}).size(), 0u);  // prefix match only: block 1 at depth 2 does not count
  EXPECT_EQ(idx.TreeSize(kA), 3u);
  EXPECT_EQ(idx.TreeSize(kB), 2u);
  EXPECT_EQ(idx.total_blocks(), 5u);
  EXPECT_EQ(idx.num_nodes(), 4u);  // 1 shared
  for (const WorkerMatch& m : idx.FindMatches(Seq({1}))) EXPECT_EQ(m.tree_size, idx.TreeSize(m.worker));
  // Local-hash entry point agrees.
  std::vector<uint64_t> locals = {Local(1), Local(2), Local(5)};
  for (const WorkerMatch& m : idx.FindMatchesLocal(locals)) EXPECT_EQ(m.depth, m.worker == kA ? 2u : 1u);
}

TEST(RadixIndexer, ChildStoredWithParentExtendsChain) {
  RadixIndexer idx;
  idx.ApplyEvent(Stored(kA, 1, std::nullopt, {1, 2}));
  ASSERT_EQ(idx.ApplyEvent(Stored(kA, 2, 2u, {3, 4})).code, ApplyCode::kApplied);
  EXPECT_EQ(Depths(idx, {1, 2, 3, 4, 5})[kA], 4u);
  // The same blocks under another parent are another prefix.
  ASSERT_EQ(idx.ApplyEvent(Stored(kA, 3, 1u, {3})).code, ApplyCode::kApplied);  // engine id 3 reused
  EXPECT_EQ(Depths(idx, {1, 3})[kA], 2u);
  EXPECT_EQ(Depths(idx, {1, 2, 3})[kA], 2u);  // the old [1,2,3] block was replaced
}

TEST(RadixIndexer, RemoveInMiddleStopsMatchWithoutCascade) {
  RadixIndexer idx;
  idx.ApplyEvent(Stored(kA, 1, std::nullopt, {1, 2, 3, 4}));
  idx.ApplyEvent(Stored(kB, 1, std::nullopt, {1, 2, 3, 4}));
  ASSERT_EQ(idx.ApplyEvent(Removed(kA, 2, {2})).code, ApplyCode::kApplied);
  auto d = Depths(idx, {1, 2, 3, 4});
  EXPECT_EQ(d[kA], 1u);
  EXPECT_EQ(d[kB], 4u);
  EXPECT_EQ(idx.TreeSize(kA), 3u);  // 3 and 4 stay: no cascade
  // A store under the removed parent is dropped; under a kept block it applies.
  EXPECT_EQ(idx.ApplyEvent(Stored(kA, 3, 2u, {5})).code, ApplyCode::kDroppedUnknownParent);
  EXPECT_EQ(idx.ApplyEvent(Stored(kA, 4, 4u, {5})).code, ApplyCode::kApplied);
  EXPECT_EQ(idx.TreeSize(kA), 4u);
  // Removing an unknown block is harmless.
  EXPECT_EQ(idx.ApplyEvent(Removed(kA, 5, {77})).code, ApplyCode::kApplied);
  EXPECT_EQ(idx.TreeSize(kA), 4u);
}

TEST(RadixIndexer, UnknownParentDroppedAndCounted) {
  RadixIndexer idx;
  auto r = idx.ApplyEvent(Stored(kA, 1, 42u, {1, 2}));
  EXPECT_EQ(r.code, ApplyCode::kDroppedUnknownParent);
  EXPECT_NE(r.message.find("unknown parent"), std::string::npos);
  EXPECT_EQ(idx.stats().dropped_unknown_parent, 1u);
  EXPECT_EQ(idx.TreeSize(kA), 0u);
  EXPECT_EQ(idx.num_nodes(), 0u);
  // Parent known for another worker only: still unknown for this one.
  idx.ApplyEvent(Stored(kB, 1, std::nullopt, {1}));
  EXPECT_EQ(idx.ApplyEvent(Stored(kA, 2, 1u, {2})).code, ApplyCode::kDroppedUnknownParent);
  EXPECT_EQ(idx.stats().dropped_unknown_parent, 2u);
  EXPECT_EQ(idx.LastEventId(kA), 2u);  // the sequence still moved
}

TEST(RadixIndexer, ClearedAndRemoveWorker) {
  RadixIndexer idx;
  idx.ApplyEvent(Stored(kA, 1, std::nullopt, {1, 2, 3}));
  idx.ApplyEvent(Stored(kB, 1, std::nullopt, {1, 2}));
  EXPECT_EQ(idx.ApplyEvent(RouterEvent{kA, 2, StorageTier::kDevice, ClearedData{}}).code, ApplyCode::kApplied);
  EXPECT_EQ(idx.TreeSize(kA), 0u);
  auto d = Depths(idx, {1, 2, 3});
  EXPECT_EQ(d.count(kA), 0u);
  EXPECT_EQ(d[kB], 2u);
  EXPECT_EQ(idx.num_nodes(), 2u);  // block 3 held by nobody now
  EXPECT_EQ(idx.LastEventId(kA), 2u);  // Cleared keeps the sequence
  idx.RemoveWorker(kB);
  EXPECT_TRUE(idx.FindMatches(Seq({1})).empty());
  EXPECT_EQ(idx.num_nodes(), 0u);
  EXPECT_EQ(idx.total_blocks(), 0u);
  EXPECT_EQ(idx.Workers(), std::vector<WorkerKey>{kA});
  // A removed worker that comes back starts a new sequence (expects 1) and reuses no stale state.
  EXPECT_EQ(idx.ApplyEvent(Stored(kB, 1, std::nullopt, {5})).code, ApplyCode::kApplied);
  EXPECT_EQ(Depths(idx, {5})[kB], 1u);
  EXPECT_EQ(idx.TreeSize(kB), 1u);
}

TEST(RadixIndexer, EventIdGapAndDuplicate) {
  RadixIndexer idx;
  EXPECT_EQ(idx.ApplyEvent(Stored(kA, 1, std::nullopt, {1})).code, ApplyCode::kApplied);
  auto r = idx.ApplyEvent(Stored(kA, 4, 1u, {2}));
  EXPECT_EQ(r.code, ApplyCode::kGap);
  EXPECT_TRUE(r.needs_resync());
  EXPECT_EQ(r.message, "gap: expected 2 got 4");
  EXPECT_EQ(idx.stats().gaps, 1u);
  EXPECT_EQ(Depths(idx, {1, 2})[kA], 2u);  // still applied
  r = idx.ApplyEvent(Stored(kA, 3, std::nullopt, {9}));
  EXPECT_EQ(r.code, ApplyCode::kDuplicate);
  EXPECT_TRUE(Depths(idx, {9}).empty());
  EXPECT_EQ(idx.ApplyEvent(Stored(kA, 5, 2u, {3})).code, ApplyCode::kApplied);
  // Sequences are per worker: B's first event is 1.
  EXPECT_EQ(idx.ApplyEvent(Stored(kB, 2, std::nullopt, {1})).message, "gap: expected 1 got 2");
  // Unsequenced events do not touch the sequence.
  EXPECT_EQ(idx.ApplyEvent(Stored(kA, 0, 3u, {4})).code, ApplyCode::kApplied);
  EXPECT_EQ(idx.LastEventId(kA), 5u);
  idx.SetLastEventId(kA, 10);
  EXPECT_EQ(idx.ApplyEvent(Removed(kA, 11, {4})).code, ApplyCode::kApplied);
}

TEST(RadixIndexer, DumpAndRestoreGivesIdenticalMatches) {
  RadixIndexer idx;
  idx.ApplyEvent(Stored(kA, 1, std::nullopt, {1, 2, 3}));
  idx.ApplyEvent(Stored(kA, 2, 1u, {4, 5}));
  idx.ApplyEvent(Stored(kA, 3, 5u, {6}));
  idx.ApplyEvent(Stored(kA, 4, std::nullopt, {10, 11}));
  idx.ApplyEvent(Stored(kB, 1, std::nullopt, {1, 2}));
  const std::vector<std::vector<uint32_t>> queries = {{1, 2, 3, 7}, {1, 4, 5, 6}, {10, 11}, {1, 4}, {2}};
  std::vector<std::map<WorkerKey, uint32_t>> before;
  for (const auto& q : queries) before.push_back(Depths(idx, q));
  const size_t size_a = idx.TreeSize(kA);
  auto dump = idx.Dump(kA);
  ASSERT_EQ(dump.size(), size_a);
  idx.ApplyEvent(RouterEvent{kA, 5, StorageTier::kDevice, ClearedData{}});
  EXPECT_EQ(Depths(idx, {1, 2, 3}).count(kA), 0u);
  for (const auto& ev : dump) ASSERT_EQ(idx.ApplyEvent(ev).code, ApplyCode::kApplied);  // parents first
  EXPECT_EQ(idx.TreeSize(kA), size_a);
  for (size_t i = 0; i < queries.size(); ++i) EXPECT_EQ(Depths(idx, queries[i]), before[i]) << i;
  // Into a fresh indexer too.
  RadixIndexer other;
  for (const auto& ev : dump) other.ApplyEvent(ev);
  EXPECT_EQ(other.TreeSize(kA), size_a);
  EXPECT_EQ(Depths(other, {1, 4, 5, 6})[kA], 4u);
}

TEST(RadixIndexer, DumpLeavesOutOrphans) {
  RadixIndexer idx;
  idx.ApplyEvent(Stored(kA, 1, std::nullopt, {1, 2, 3}));
  idx.ApplyEvent(Removed(kA, 2, {2}));
  auto dump = idx.Dump(kA);
  ASSERT_EQ(dump.size(), 1u);  // block 3 cannot be matched any more; block 1 can
  RadixIndexer other;
  for (const auto& ev : dump) other.ApplyEvent(ev);
  EXPECT_EQ(Depths(other, {1, 2, 3}), Depths(idx, {1, 2, 3}));
}

TEST(RadixIndexer, DataParallelRanksAreSeparateCandidates) {
  RadixIndexer idx;
  const WorkerKey r0{5, 0}, r1{5, 1};
  idx.ApplyEvent(Stored(r0, 1, std::nullopt, {1, 2, 3}));
  idx.ApplyEvent(Stored(r1, 1, std::nullopt, {1}));  // own event sequence per rank
  auto d = Depths(idx, {1, 2, 3});
  EXPECT_EQ(d[r0], 3u);
  EXPECT_EQ(d[r1], 1u);
  idx.ApplyEvent(RouterEvent{r1, 2, StorageTier::kDevice, ClearedData{}});
  EXPECT_EQ(Depths(idx, {1})[r0], 1u);
  EXPECT_EQ(idx.TreeSize(r0), 3u);
}

TEST(RadixIndexer, OtherTiersIgnoredButSequenced) {
  RadixIndexer idx;
  RouterEvent ev = Stored(kA, 1, std::nullopt, {1});
  ev.tier = StorageTier::kHost;
  EXPECT_EQ(idx.ApplyEvent(ev).code, ApplyCode::kIgnoredTier);
  EXPECT_TRUE(Depths(idx, {1}).empty());
  EXPECT_EQ(idx.ApplyEvent(Stored(kA, 2, std::nullopt, {1})).code, ApplyCode::kApplied);
  RouterEvent rm = Removed(kA, 3, {1});
  rm.tier = StorageTier::kDisk;  // offload tier eviction does not remove the GPU copy
  idx.ApplyEvent(rm);
  EXPECT_EQ(Depths(idx, {1})[kA], 1u);
}

TEST(RadixIndexer, TokenIdsFillTokensHash) {
  StoredData sd;
  sd.blocks.push_back(StoredBlock{99, 0, std::vector<uint32_t>{1, 2, 3, 4}});
  FillTokensHashes(sd);
  EXPECT_EQ(sd.blocks[0].tokens_hash, 14643705804678351452ull);  // FACTS.md published value
  RadixIndexer idx;
  idx.ApplyEvent(RouterEvent{kA, 1, StorageTier::kDevice, sd});
  StoredData child;
  child.parent_hash = 99;
  child.blocks.push_back(StoredBlock{100, 0, std::vector<uint32_t>{5, 6, 7, 8}});
  FillTokensHashes(child);
  idx.ApplyEvent(RouterEvent{kA, 2, StorageTier::kDevice, child});
  const uint64_t seq[] = {14643705804678351452ull, 4945711292740353085ull};  // published
  auto m = idx.FindMatches(seq);
  ASSERT_EQ(m.size(), 1u);
  EXPECT_EQ(m[0].depth, 2u);
}

}  // namespace
}  // namespace dyn::router
