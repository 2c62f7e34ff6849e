// The "mem" event plane and the subject rules shared by both backends.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "runtime/event_plane.h"
#include "runtime/event_plane_internal.h"

namespace dyn {
namespace {

using event_plane_internal::SubjectMatches;
using event_plane_internal::ValidateSubject;

// Collects what a subscription receives; waits for a count with a deadline.
struct Inbox {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<std::pair<std::string, std::string>> got;

  EventCallback Callback() {
    return [this](std::string_view subject, std::string_view payload) {
      std::lock_guard<std::mutex> lock(mu);
      got.emplace_back(std::string(subject), std::string(payload));
      cv.notify_all();
    };
  }
  bool WaitFor(size_t n, int timeout_ms = 5000) {
    std::unique_lock<std::mutex> lock(mu);
    return cv.wait_for(lock, std::chrono::milliseconds(timeout_ms), [&] { return got.size() >= n; });
  }
  size_t Size() {
    std::lock_guard<std::mutex> lock(mu);
    return got.size();
  }
};

TEST(SubjectTest, MatchingTable) {
  struct Case {
    const char* pattern;
    const char* subject;
    bool match;
  };
  const Case cases[] = {
      {"a", "a", true},
      {"a", "b", false},
      {"a", "a.b", false},
      {"a.b", "a", false},
      {"a.b.c", "a.b.c", true},
      {"a.b.c", "a.b.d", false},
      {"*", "a", true},
      {"*", "a.b", false},
      {"a.*", "a.b", true},
      {"a.*", "a", false},
      {"a.*", "a.b.c", false},
      {"*.b", "a.b", true},
      {"*.b", "a.c", false},
      {"a.*.c", "a.x.c", true},
      {"a.*.c", "a.x.d", false},
      {"*.*", "a.b", true},
      {"*.*", "a.b.c", false},
      {">", "a", true},
      {">", "a.b.c", true},
      {"a.>", "a", false},
      {"a.>", "a.b", true},
      {"a.>", "a.b.c.d", true},
      {"a.>", "b.c", false},
      {"a.*.>", "a.b", false},
      {"a.*.>", "a.b.c", true},
      {"*.>", "a.b", true},
      {"dyn.kv_events.*.*", "dyn.kv_events.ns.backend", true},
      {"dyn.kv_events.>", "dyn.kv_events.ns.backend", true},
      {"dyn.kv_events.>", "dyn.kv_eventsX.ns", false},
      {"ab", "a", false},
      {"a", "ab", false},
  };
  for (const Case& c : cases) {
    EXPECT_EQ(SubjectMatches(c.pattern, c.subject), c.match) << c.pattern << " vs " << c.subject;
  }
}

TEST(SubjectTest, Validation) {
  EXPECT_TRUE(ValidateSubject("a.b.c", false).ok());
  EXPECT_TRUE(ValidateSubject("a.*.>", true).ok());
  EXPECT_TRUE(ValidateSubject(">", true).ok());
  EXPECT_FALSE(ValidateSubject("", true).ok());
  EXPECT_FALSE(ValidateSubject("a..b", true).ok());
  EXPECT_FALSE(ValidateSubject(".a", true).ok());
  EXPECT_FALSE(ValidateSubject("a.", true).ok());
  EXPECT_FALSE(ValidateSubject("a b", true).ok());
  EXPECT_FALSE(ValidateSubject("a.>.b", true).ok());
  EXPECT_FALSE(ValidateSubject("a.*", false).ok());
  EXPECT_FALSE(ValidateSubject("a.>", false).ok());
}

TEST(MemEventPlaneTest, RejectsBadInput) {
  auto plane = CreateEventPlane("mem");
  ASSERT_TRUE(plane.ok());
  EXPECT_EQ((*plane)->Publish("a.*", "x").code(), StatusCode::kInvalidArgument);
  EXPECT_EQ((*plane)->Publish("a", std::string(event_plane_internal::kMaxPayloadBytes + 1, 'x')).code(),
            StatusCode::kTooLarge);
  EXPECT_FALSE((*plane)->Subscribe("a..b", [](std::string_view, std::string_view) {}).ok());
  EXPECT_FALSE((*plane)->Subscribe("a", nullptr).ok());
  EXPECT_FALSE(CreateEventPlane("bogus").ok());
  EXPECT_EQ((*plane)->Describe(), "mem");
}

TEST(MemEventPlaneTest, ClientsShareOneBusAndWildcardsRoute) {
  auto pub = CreateEventPlane("mem");
  auto sub = CreateEventPlane("mem");
  ASSERT_TRUE(pub.ok() && sub.ok());
  Inbox exact, star, tail;
  auto s1 = (*sub)->Subscribe("t1.kv.ns.b", exact.Callback());
  auto s2 = (*sub)->Subscribe("t1.kv.*.b", star.Callback());
  auto s3 = (*sub)->Subscribe("t1.>", tail.Callback());
  ASSERT_TRUE(s1.ok() && s2.ok() && s3.ok());
  ASSERT_TRUE((*pub)->Publish("t1.kv.ns.b", "one").ok());
  ASSERT_TRUE((*pub)->Publish("t1.kv.other.b", "two").ok());
  ASSERT_TRUE((*pub)->Publish("t1.load", "three").ok());
  ASSERT_TRUE((*pub)->Publish("t2.kv.ns.b", "nobody").ok());
  ASSERT_TRUE((*pub)->Flush(5000).ok());
  // After Flush every message is delivered, so the counts are exact.
  ASSERT_EQ(exact.Size(), 1u);
  EXPECT_EQ(exact.got[0], std::make_pair(std::string("t1.kv.ns.b"), std::string("one")));
  ASSERT_EQ(star.Size(), 2u);
  EXPECT_EQ(star.got[1].second, "two");
  ASSERT_EQ(tail.Size(), 3u);
  EXPECT_EQ(tail.got[2], std::make_pair(std::string("t1.load"), std::string("three")));
}

TEST(MemEventPlaneTest, PreservesOrderPerPublisher) {
  auto plane = CreateEventPlane("mem");
  ASSERT_TRUE(plane.ok());
  Inbox inbox;
  auto sub = (*plane)->Subscribe("order.>", inbox.Callback());
  ASSERT_TRUE(sub.ok());
  constexpr int kN = 5000;
  for (int i = 0; i < kN; ++i) ASSERT_TRUE((*plane)->Publish("order.x", std::to_string(i)).ok());
  ASSERT_TRUE(inbox.WaitFor(kN));
  for (int i = 0; i < kN; ++i) ASSERT_EQ(inbox.got[i].second, std::to_string(i));
}

TEST(MemEventPlaneTest, CallbacksOfOneSubscriptionNeverOverlap) {
  auto plane = CreateEventPlane("mem");
  ASSERT_TRUE(plane.ok());
  std::atomic<int> running{0};
  std::atomic<int> overlaps{0};
  std::atomic<int> count{0};
  auto sub = (*plane)->Subscribe("serial", [&](std::string_view, std::string_view) {
    if (running.fetch_add(1) != 0) overlaps.fetch_add(1);
    std::this_thread::yield();
    running.fetch_sub(1);
    count.fetch_add(1);
  });
  ASSERT_TRUE(sub.ok());
  std::vector<std::thread> publishers;
  for (int t = 0; t < 4; ++t) {
    publishers.emplace_back([&] {
      for (int i = 0; i < 500; ++i) (void)(*plane)->Publish("serial", "x");
    });
  }
  for (auto& t : publishers) t.join();
  ASSERT_TRUE((*plane)->Flush(5000).ok());
  EXPECT_EQ(count.load(), 2000);
  EXPECT_EQ(overlaps.load(), 0);
}

TEST(MemEventPlaneTest, UnsubscribeStopsDelivery) {
  auto plane = CreateEventPlane("mem");
  ASSERT_TRUE(plane.ok());
  Inbox kept, dropped;
  auto keep = (*plane)->Subscribe("unsub.a", kept.Callback());
  auto gone = (*plane)->Subscribe("unsub.a", dropped.Callback());
  ASSERT_TRUE(keep.ok() && gone.ok());
  ASSERT_TRUE((*plane)->Publish("unsub.a", "1").ok());
  ASSERT_TRUE((*plane)->Flush(5000).ok());
  EXPECT_EQ(dropped.Size(), 1u);
  gone->reset();
  ASSERT_TRUE((*plane)->Publish("unsub.a", "2").ok());
  ASSERT_TRUE((*plane)->Flush(5000).ok());
  EXPECT_EQ(kept.Size(), 2u);
  EXPECT_EQ(dropped.Size(), 1u);
}

TEST(MemEventPlaneTest, DestructorWaitsForRunningCallback) {
  auto plane = CreateEventPlane("mem");
  ASSERT_TRUE(plane.ok());
  std::atomic<bool> in_callback{false};
  std::atomic<bool> finished{false};
  auto sub = (*plane)->Subscribe("slow", [&](std::string_view, std::string_view) {
    in_callback = true;
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    finished = true;
  });
  ASSERT_TRUE(sub.ok());
  ASSERT_TRUE((*plane)->Publish("slow", "x").ok());
  while (!in_callback) std::this_thread::yield();
  sub->reset();
  EXPECT_TRUE(finished.load());
}

TEST(MemEventPlaneTest, CallbackMayDestroyItsOwnSubscriptionAndFlush) {
  auto plane = CreateEventPlane("mem");
  ASSERT_TRUE(plane.ok());
  std::unique_ptr<Subscription> self;
  std::mutex mu;
  std::atomic<int> calls{0};
  Status flush_status = Status::Internal("not run");
  auto sub = (*plane)->Subscribe("self", [&](std::string_view, std::string_view) {
    calls.fetch_add(1);
    Status flushed = (*plane)->Flush(1000);  // must not wait for this very callback
    std::lock_guard<std::mutex> lock(mu);
    flush_status = flushed;
    self.reset();
  });
  ASSERT_TRUE(sub.ok());
  {
    std::lock_guard<std::mutex> lock(mu);
    self = std::move(*sub);
  }
  ASSERT_TRUE((*plane)->Publish("self", "1").ok());
  ASSERT_TRUE((*plane)->Publish("self", "2").ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  EXPECT_EQ(calls.load(), 1);
  std::lock_guard<std::mutex> lock(mu);
  EXPECT_TRUE(flush_status.ok()) << flush_status.ToString();
  EXPECT_EQ(self, nullptr);
}

TEST(MemEventPlaneTest, FullQueueDropsOldestAndCounts) {
  event_plane_internal::MemQueueLimits limits;
  limits.max_messages = 10;
  auto plane = event_plane_internal::CreateMemEventPlane(limits);
  std::mutex gate;
  std::unique_lock<std::mutex> hold(gate);  // blocks the subscriber inside its first callback
  Inbox inbox;
  std::atomic<bool> first_started{false};
  auto cb = inbox.Callback();
  auto sub = plane->Subscribe("drop", [&](std::string_view s, std::string_view p) {
    first_started = true;
    std::lock_guard<std::mutex> lock(gate);
    cb(s, p);
  });
  ASSERT_TRUE(sub.ok());
  uint64_t dropped_before = event_plane_internal::MemDroppedMessages();
  ASSERT_TRUE(plane->Publish("drop", "0").ok());
  while (!first_started) std::this_thread::yield();
  for (int i = 1; i <= 100; ++i) ASSERT_TRUE(plane->Publish("drop", std::to_string(i)).ok());
  // Message 0 is in the callback; 1..100 met a 10-message queue, so 1..90 were dropped.
  EXPECT_EQ(event_plane_internal::MemDroppedMessages() - dropped_before, 90u);
  EXPECT_EQ(plane->Flush(100).code(), StatusCode::kDeadlineExceeded);
  hold.unlock();
  ASSERT_TRUE(plane->Flush(5000).ok());
  ASSERT_EQ(inbox.Size(), 11u);
  EXPECT_EQ(inbox.got[0].second, "0");
  EXPECT_EQ(inbox.got[1].second, "91");
  EXPECT_EQ(inbox.got[10].second, "100");
}

TEST(MemEventPlaneTest, ByteLimitBoundsQueue) {
  event_plane_internal::MemQueueLimits limits;
  limits.max_bytes = 1000;
  auto plane = event_plane_internal::CreateMemEventPlane(limits);
  std::mutex gate;
  std::unique_lock<std::mutex> hold(gate);
  std::atomic<bool> started{false};
  std::atomic<int> received{0};
  auto sub = plane->Subscribe("bytes", [&](std::string_view, std::string_view) {
    started = true;
    std::lock_guard<std::mutex> lock(gate);
    received.fetch_add(1);
  });
  ASSERT_TRUE(sub.ok());
  ASSERT_TRUE(plane->Publish("bytes", "first").ok());
  while (!started) std::this_thread::yield();
  for (int i = 0; i < 50; ++i) ASSERT_TRUE(plane->Publish("bytes", std::string(100, 'x')).ok());
  hold.unlock();
  ASSERT_TRUE(plane->Flush(5000).ok());
  EXPECT_EQ(received.load(), 11);  // the one in flight plus 1000 bytes' worth of 100-byte messages
}

TEST(MemEventPlaneTest, FlushWithNoSubscribersReturns) {
  auto plane = CreateEventPlane("mem");
  ASSERT_TRUE(plane.ok());
  ASSERT_TRUE((*plane)->Publish("nobody.listens", "x").ok());
  EXPECT_TRUE((*plane)->Flush(0).ok());
}

}  // namespace
}  // namespace dyn
