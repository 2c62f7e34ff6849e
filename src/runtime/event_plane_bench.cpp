// Event plane throughput and latency: publish -> subscriber callback, one publisher and one
// subscriber in this process.
//
//   event_plane_bench [nats://127.0.0.1:4222] [--messages 100000] [--size 200] [--rate 10000]
//
// Two runs per backend ("mem", and NATS when a URL is given):
//   burst  publishes --messages as fast as possible; reports publish rate, delivered rate, drops
//          and latency (mostly queueing behind the burst);
//   paced  publishes at --rate messages/s for 2 s; its latency is the per-message cost.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "base/flags.h"
#include "runtime/event_plane.h"

namespace dyn {
namespace {

using Clock = std::chrono::steady_clock;

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
}

struct RunResult {
  int64_t sent = 0;
  int64_t received = 0;
  double publish_per_s = 0;
  double delivered_per_s = 0;
  double p50_us = 0, p99_us = 0, max_us = 0;
};

// Payload: 8-byte sequence number, 8-byte send time in ns, padding to `size`.
RunResult Run(EventPlane& plane, const std::string& subject, int64_t messages, int64_t size, double rate) {
  std::vector<int64_t> latency_ns(messages, -1);
  std::atomic<int64_t> received{0};
  std::atomic<int64_t> last_receive_ns{0};
  auto sub = plane.Subscribe(subject, [&](std::string_view, std::string_view payload) {
    if (payload.size() < 16) return;
    int64_t seq, sent_ns;
    std::memcpy(&seq, payload.data(), 8);
    std::memcpy(&sent_ns, payload.data() + 8, 8);
    int64_t now = NowNs();
    if (seq >= 0 && seq < static_cast<int64_t>(latency_ns.size())) latency_ns[seq] = now - sent_ns;
    last_receive_ns.store(now, std::memory_order_relaxed);
    received.fetch_add(1, std::memory_order_release);
  });
  RunResult r;
  if (!sub.ok()) {
    std::fprintf(stderr, "subscribe: %s\n", sub.status().ToString().c_str());
    return r;
  }
  (void)plane.Flush(2000);  // the subscription is in place (NATS: the server has it)

  std::string payload(std::max<int64_t>(size, 16), 'x');
  int64_t start_ns = NowNs();
  for (int64_t i = 0; i < messages; ++i) {
    if (rate > 0) {
      int64_t due = start_ns + static_cast<int64_t>(static_cast<double>(i) * 1e9 / rate);
      while (NowNs() < due) std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
    int64_t now = NowNs();
    std::memcpy(payload.data(), &i, 8);
    std::memcpy(payload.data() + 8, &now, 8);
    if (plane.Publish(subject, payload).ok()) ++r.sent;
  }
  int64_t published_ns = NowNs();
  (void)plane.Flush(10000);
  // Wait until everything arrived or nothing more has arrived for a second (drops).
  int64_t seen = -1;
  auto quiet_since = Clock::now();
  while (received.load() < r.sent && Clock::now() - quiet_since < std::chrono::seconds(1)) {
    int64_t now_received = received.load();
    if (now_received != seen) {
      seen = now_received;
      quiet_since = Clock::now();
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  sub->reset();

  r.received = received.load(std::memory_order_acquire);
  r.publish_per_s = static_cast<double>(messages) / (static_cast<double>(published_ns - start_ns) / 1e9);
  int64_t end_ns = last_receive_ns.load();
  if (end_ns > start_ns) r.delivered_per_s = static_cast<double>(r.received) / (static_cast<double>(end_ns - start_ns) / 1e9);
  std::vector<int64_t> got;
  got.reserve(messages);
  for (int64_t v : latency_ns) {
    if (v >= 0) got.push_back(v);
  }
  std::sort(got.begin(), got.end());
  if (!got.empty()) {
    r.p50_us = static_cast<double>(got[got.size() / 2]) / 1e3;
    r.p99_us = static_cast<double>(got[std::min(got.size() - 1, got.size() * 99 / 100)]) / 1e3;
    r.max_us = static_cast<double>(got.back()) / 1e3;
  }
  return r;
}

void Print(const std::string& backend, const char* mode, int64_t size, const RunResult& r) {
  std::printf("%-28s %-6s %5lld B  sent %7lld  recv %7lld  drop %6lld  pub %9.0f/s  recv %9.0f/s  p50 %8.1f us  p99 %8.1f us  max %8.1f us\n",
              backend.c_str(), mode, static_cast<long long>(size), static_cast<long long>(r.sent),
              static_cast<long long>(r.received), static_cast<long long>(r.sent - r.received), r.publish_per_s,
              r.delivered_per_s, r.p50_us, r.p99_us, r.max_us);
  std::fflush(stdout);
}

int Main(int argc, char** argv) {
  int64_t messages = 100000;
  int64_t size = 200;
  double rate = 10000;
  FlagSet flags("event_plane_bench", "event plane publish -> receive throughput and latency");
  flags.Int("messages", &messages, "messages in the burst run");
  flags.Int("size", &size, "payload bytes (at least 16)");
  flags.Double("rate", &rate, "messages/s of the paced run (2 s)");
  Status st = flags.Parse(argc, argv);
  if (!st.ok() || flags.help_requested()) {
    std::fprintf(stderr, "%s%s\n", st.ok() ? "" : (st.ToString() + "\n").c_str(), flags.Usage().c_str());
    return st.ok() ? 0 : 2;
  }
  std::vector<std::string> specs = {"mem"};
  for (const auto& p : flags.positional()) specs.push_back(p);
  for (const auto& spec : specs) {
    auto plane = CreateEventPlane(spec);
    if (!plane.ok()) {
      std::fprintf(stderr, "%s: %s\n", spec.c_str(), plane.status().ToString().c_str());
      return 1;
    }
    Print(spec, "burst", size, Run(**plane, "bench.burst", messages, size, 0));
    Print(spec, "paced", size, Run(**plane, "bench.paced", static_cast<int64_t>(rate * 2), size, rate));
  }
  return 0;
}

}  // namespace
}  // namespace dyn

int main(int argc, char** argv) { return dyn::Main(argc, argv); }
