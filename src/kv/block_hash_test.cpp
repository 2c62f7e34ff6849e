#include "kv/block_hash.h"

#include <gtest/gtest.h>
#include <xxhash.h>

#include <cstring>

namespace dyn {
namespace {

TEST(BlockHashTest, PublishedXxh3Value) {
  const char* s = "test data";
  EXPECT_EQ(XXH3_64bits_withSeed(s, std::strlen(s), 1337), 13226331709069118873ull);
}

TEST(BlockHashTest, PublishedLocalAndSequenceHashes) {
  std::vector<uint32_t> a = {1, 2, 3, 4}, b = {5, 6, 7, 8};
  EXPECT_EQ(HashBlockTokens(a), 14643705804678351452ull);
  EXPECT_EQ(HashBlockTokens(b), 16777012769546811212ull);
  std::vector<uint32_t> both = {1, 2, 3, 4, 5, 6, 7, 8};
  auto seq = ComputeSequenceBlockHashes(both, 4);
  ASSERT_EQ(seq.size(), 2u);
  EXPECT_EQ(seq[0], 14643705804678351452ull);
  EXPECT_EQ(seq[1], 4945711292740353085ull);
  EXPECT_EQ(ChainBlockHash(seq[0], HashBlockTokens(b)), 4945711292740353085ull);
}

TEST(BlockHashTest, OnlyFullBlocksAreHashed) {
  std::vector<uint32_t> t = {1, 2, 3, 4, 5, 6, 7};
  EXPECT_EQ(ComputeLocalBlockHashes(t, 4).size(), 1u);
  EXPECT_TRUE(ComputeSequenceBlockHashes(t, 8).empty());
}

TEST(BlockHashTest, IncrementalExtensionMatchesBatch) {
  std::vector<uint32_t> t;
  std::vector<uint64_t> local, seq;
  for (uint32_t i = 0; i < 100; ++i) {
    t.push_back(i * 7 + 3);
    ExtendBlockHashes(t, 16, kBlockHashSeed, local, seq);
  }
  EXPECT_EQ(seq, ComputeSequenceBlockHashes(t, 16));
  EXPECT_EQ(local, ComputeLocalBlockHashes(t, 16));
  EXPECT_EQ(seq.size(), 6u);
}

TEST(BlockHashTest, SameBlockDifferentPrefixDiffers) {
  std::vector<uint32_t> x = {9, 9, 1, 2}, y = {8, 8, 1, 2};
  auto hx = ComputeSequenceBlockHashes(x, 2), hy = ComputeSequenceBlockHashes(y, 2);
  EXPECT_EQ(ComputeLocalBlockHashes(x, 2)[1], ComputeLocalBlockHashes(y, 2)[1]);
  EXPECT_NE(hx[1], hy[1]);
}

TEST(BlockHashTest, LoraSeed) {
  EXPECT_EQ(BlockHashSeedForLora(""), kBlockHashSeed);
  const uint64_t seed = BlockHashSeedForLora("my-adapter");
  EXPECT_EQ(seed, kBlockHashSeed + XXH3_64bits("my-adapter", 10));
  std::vector<uint32_t> a = {1, 2, 3, 4};
  EXPECT_NE(HashBlockTokens(a, seed), HashBlockTokens(a));
}

}  // namespace
}  // namespace dyn
