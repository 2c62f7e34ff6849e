#include "router/vllm_kv_events.h"

#include <gtest/gtest.h>

#include "kv/block_hash.h"
#include "router/radix_indexer.h"

namespace dyn::router {
namespace {

std::vector<uint8_t> FromHex(const std::string& hex) {
  std::vector<uint8_t> out;
  for (size_t i = 0; i + 1 < hex.size(); i += 2) out.push_back(static_cast<uint8_t>(std::stoi(hex.substr(i, 2), nullptr, 16)));
  return out;
}

// Python: msgpack.packb([1733000000.5, [["BlockStored", [11, -2], -5, [1..8], 4, None, "GPU", None],
//   ["BlockRemoved", [bytes(range(9))], "CPU"], ["SomethingNew", 1], ["AllBlocksCleared"]], 3],
//   use_bin_type=True)
const char kBatchHex[] =
    "93cb41d9d2ded02000009498ab426c6f636b53746f726564920bfefb98010203040506070804c0a3475055c093ac426c6f636b"
    "52656d6f76656491c409000102030405060708a343505592ac536f6d657468696e674e65770191b0416c6c426c6f636b73436c"
    "656172656403";

TEST(VllmKvEvents, DecodesABatchFromPythonMsgpack) {
  const auto bytes = FromHex(kBatchHex);
  auto batch = DecodeVllmKvEvents(bytes, 77);
  ASSERT_TRUE(batch.ok()) << batch.status().ToString();
  EXPECT_DOUBLE_EQ(batch->timestamp, 1733000000.5);
  ASSERT_TRUE(batch->dp_rank.has_value());
  EXPECT_EQ(*batch->dp_rank, 3u);
  EXPECT_EQ(batch->skipped, 1u);  // the unknown tag
  ASSERT_EQ(batch->events.size(), 3u);

  const RouterEvent& stored = batch->events[0];
  EXPECT_EQ(stored.worker.worker_id, 77u);
  EXPECT_EQ(stored.worker.dp_rank, 3u);
  EXPECT_EQ(stored.tier, StorageTier::kDevice);
  const auto& sd = std::get<StoredData>(stored.data);
  ASSERT_TRUE(sd.parent_hash.has_value());
  EXPECT_EQ(*sd.parent_hash, static_cast<uint64_t>(int64_t{-5}));  // signed ints keep their bits
  ASSERT_EQ(sd.blocks.size(), 2u);
  EXPECT_EQ(sd.blocks[0].block_hash, 11u);
  EXPECT_EQ(sd.blocks[1].block_hash, static_cast<uint64_t>(int64_t{-2}));
  EXPECT_EQ(sd.blocks[1].token_ids, (std::vector<uint32_t>{5, 6, 7, 8}));
  const uint32_t first[] = {1, 2, 3, 4};
  EXPECT_EQ(sd.blocks[0].tokens_hash, HashBlockTokens(first));

  const RouterEvent& removed = batch->events[1];
  EXPECT_EQ(removed.tier, StorageTier::kHost);
  // Bytes hashes: the last 8 bytes, big-endian.
  EXPECT_EQ(std::get<RemovedData>(removed.data).block_hashes, (std::vector<uint64_t>{0x0102030405060708ull}));
  EXPECT_TRUE(std::holds_alternative<ClearedData>(batch->events[2].data));
}

TEST(VllmKvEvents, StoredEventsFeedTheIndexer) {
  auto batch = DecodeVllmKvEvents(FromHex(kBatchHex), 77);
  ASSERT_TRUE(batch.ok());
  RadixIndexer indexer;
  RouterEvent root = batch->events[0];
  std::get<StoredData>(root.data).parent_hash.reset();  // make it a root chain
  ASSERT_EQ(indexer.ApplyEvent(root).code, ApplyCode::kApplied);
  const std::vector<uint32_t> prompt = {1, 2, 3, 4, 5, 6, 7, 8, 9};
  auto matches = indexer.FindMatches(ComputeSequenceBlockHashes(prompt, 4));
  ASSERT_EQ(matches.size(), 1u);
  EXPECT_EQ(matches[0].depth, 2u);
}

TEST(VllmKvEvents, MalformedPayloadsAreErrors) {
  const auto good = FromHex(kBatchHex);
  // Every truncation fails cleanly (no crash, no partial batch).
  for (size_t n = 0; n < good.size(); ++n) {
    EXPECT_FALSE(DecodeVllmKvEvents(std::span(good.data(), n), 1).ok()) << n;
  }
  // Token count that does not match blocks * block_size.
  // msgpack: [0, [["BlockStored", [1], nil, [1,2,3], 4]], nil]
  const auto bad = FromHex("93009195ab426c6f636b53746f7265649101c093010203" "04c0");
  EXPECT_FALSE(DecodeVllmKvEvents(bad, 1).ok());
  EXPECT_FALSE(DecodeVllmKvEvents(FromHex("c1"), 1).ok());
  EXPECT_FALSE(DecodeVllmSequence(FromHex("0001")).ok());
  auto seq = DecodeVllmSequence(FromHex("0000000000000102"));
  ASSERT_TRUE(seq.ok());
  EXPECT_EQ(*seq, 258u);
}

}  // namespace
}  // namespace dyn::router
