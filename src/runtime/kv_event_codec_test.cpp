#include "runtime/kv_event_codec.h"

#include <gtest/gtest.h>

#include "kv/block_hash.h"

namespace dyn {
namespace {

TEST(KvEventCodec, StoredRoundTrip) {
  KvEvent e;
  e.type = KvEvent::Type::kStored;
  e.event_id = 42;
  e.parent_hash = 0xFFFFFFFFFFFFFFF0ull;  // needs all 64 bits
  e.blocks.push_back({123, 0, {1, 2, 3, 4}});
  e.blocks.push_back({456, 0, {5, 6, 7, 8}});
  auto d = DecodeKvEvent(EncodeKvEvent(0x8000000000000001ull, e));
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  EXPECT_EQ(d->worker.worker_id, 0x8000000000000001ull);
  EXPECT_EQ(d->event_id, 42u);
  const auto& s = std::get<router::StoredData>(d->data);
  ASSERT_TRUE(s.parent_hash.has_value());
  EXPECT_EQ(*s.parent_hash, 0xFFFFFFFFFFFFFFF0ull);
  ASSERT_EQ(s.blocks.size(), 2u);
  EXPECT_EQ(s.blocks[1].block_hash, 456u);
  // The router's own local hash of the tokens (FACTS' published value) travels instead of the ids.
  EXPECT_TRUE(s.blocks[1].token_ids.empty());
  EXPECT_EQ(s.blocks[0].tokens_hash, 14643705804678351452ull);
  // With the ids, the decoder recomputes the hash from them.
  auto with_ids = DecodeKvEvent(EncodeRouterEvent(ToRouterEvent(1, e), /*with_token_ids=*/true));
  ASSERT_TRUE(with_ids.ok());
  EXPECT_EQ(std::get<router::StoredData>(with_ids->data).blocks[1].token_ids, (std::vector<uint32_t>{5, 6, 7, 8}));
  EXPECT_EQ(std::get<router::StoredData>(with_ids->data).blocks[0].tokens_hash, 14643705804678351452ull);
}

TEST(KvEventCodec, RemovedAndCleared) {
  KvEvent r;
  r.type = KvEvent::Type::kRemoved;
  r.event_id = 3;
  r.removed = {7, 9};
  auto d = DecodeKvEvent(EncodeKvEvent(5, r));
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(std::get<router::RemovedData>(d->data).block_hashes, (std::vector<uint64_t>{7, 9}));
  KvEvent c;
  c.type = KvEvent::Type::kCleared;
  c.event_id = 4;
  auto dc = DecodeKvEvent(EncodeKvEvent(5, c));
  ASSERT_TRUE(dc.ok());
  EXPECT_TRUE(std::holds_alternative<router::ClearedData>(dc->data));
}

TEST(KvEventCodec, MalformedIsInvalidArgument) {
  for (const char* bad : {"", "[]", "{}", R"({"worker_id":"1","event_id":1})",
                          R"({"worker_id":"x","event_id":1,"type":"cleared"})",
                          R"({"worker_id":"1","event_id":1,"type":"stored"})",
                          R"({"worker_id":"1","event_id":1,"type":"stored","blocks":[{"block_hash":"1","token_ids":[-1]}]})",
                          R"({"worker_id":"1","event_id":1,"type":"removed","block_hashes":[{}]})",
                          R"({"worker_id":"1","event_id":1,"type":"exploded"})"}) {
    auto d = DecodeKvEvent(bad);
    EXPECT_FALSE(d.ok()) << bad;
    if (!d.ok()) {
      EXPECT_EQ(d.status().code(), StatusCode::kInvalidArgument) << bad;
    }
  }
}

TEST(KvEventCodec, DumpRoundTripIsUnsequenced) {
  KvDump dump;
  dump.worker_id = 0xABCDEF0123456789ull;
  dump.last_event_id = 17;
  for (uint64_t i = 0; i < 3; ++i) {
    router::RouterEvent e;
    e.worker = {dump.worker_id, 0};
    e.event_id = 5;  // a dump's events are state, not stream: decoded as unsequenced
    router::StoredData d;
    if (i > 0) d.parent_hash = 100 + i - 1;
    d.blocks.push_back({100 + i, 1000 + i, {}});
    e.data = std::move(d);
    dump.events.push_back(std::move(e));
  }
  auto d = DecodeKvDump(EncodeKvDump(dump));
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  EXPECT_EQ(d->worker_id, dump.worker_id);
  EXPECT_EQ(d->last_event_id, 17u);
  ASSERT_EQ(d->events.size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(d->events[i].event_id, 0u);
    const auto& s = std::get<router::StoredData>(d->events[i].data);
    EXPECT_EQ(s.blocks[0].block_hash, 100 + i);
    EXPECT_EQ(s.blocks[0].tokens_hash, 1000 + i);  // no token ids: the sent hash is kept
    EXPECT_EQ(s.parent_hash.has_value(), i > 0);
  }
  // A dump whose events name another worker is refused.
  dump.events[1].worker.worker_id = 1;
  EXPECT_FALSE(DecodeKvDump(EncodeKvDump(dump)).ok());
  EXPECT_FALSE(DecodeKvDump("{}").ok());
  EXPECT_FALSE(DecodeKvDump("nonsense").ok());
}

}  // namespace
}  // namespace dyn
