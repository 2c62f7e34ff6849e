// The NATS event plane against a real nats-server started on a free loopback port, including a
// kill -9 and restart of the server, and a client created while the server is down.
#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "runtime/event_plane.h"

namespace dyn {
namespace {

using Clock = std::chrono::steady_clock;

std::string FindNatsServer() {
  if (const char* env = std::getenv("NATS_SERVER_BIN")) return env;
  std::vector<std::string> dirs = {"/usr/sbin", "/usr/bin", "/usr/local/bin", "/usr/local/sbin"};
  if (const char* path = std::getenv("PATH")) {
    std::string p = path;
    size_t start = 0;
    while (start <= p.size()) {
      size_t colon = p.find(':', start);
      if (colon == std::string::npos) colon = p.size();
      dirs.push_back(p.substr(start, colon - start));
      start = colon + 1;
    }
  }
  for (const auto& d : dirs) {
    std::string candidate = d + "/nats-server";
    if (access(candidate.c_str(), X_OK) == 0) return candidate;
  }
  return "";
}

int FreePort() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    close(fd);
    return -1;
  }
  close(fd);
  return ntohs(addr.sin_port);
}

bool PortAccepts(int port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  bool ok = connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  close(fd);
  return ok;
}

// One nats-server process on 127.0.0.1:port.
class NatsServer {
 public:
  NatsServer(std::string bin, int port) : bin_(std::move(bin)), port_(port) {}
  ~NatsServer() { Kill(); }

  bool Start() {
    pid_ = fork();
    if (pid_ == 0) {
      int devnull = open("/dev/null", O_WRONLY);
      dup2(devnull, 1);
      dup2(devnull, 2);
      std::string port = std::to_string(port_);
      execl(bin_.c_str(), bin_.c_str(), "-a", "127.0.0.1", "-p", port.c_str(), static_cast<char*>(nullptr));
      _exit(127);
    }
    if (pid_ < 0) return false;
    auto deadline = Clock::now() + std::chrono::seconds(5);
    while (Clock::now() < deadline) {
      if (PortAccepts(port_)) return true;
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return false;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return false;
  }

  void Kill() {
    if (pid_ <= 0) return;
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }

  std::string Url() const { return "nats://127.0.0.1:" + std::to_string(port_); }
  int port() const { return port_; }

 private:
  std::string bin_;
  int port_;
  pid_t pid_ = -1;
};

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
  bool Has(const std::string& payload) {
    std::lock_guard<std::mutex> lock(mu);
    for (const auto& [s, p] : got) {
      if (p == payload) return true;
    }
    return false;
  }
  size_t Size() {
    std::lock_guard<std::mutex> lock(mu);
    return got.size();
  }
};

// Publishes a fresh payload every 50 ms until `inbox` has received one of them; at-most-once
// delivery means messages sent before the subscriber's interest reached the server are lost.
// Returns the time until the first one arrived, or -1 ms.
std::chrono::milliseconds PublishUntilReceived(EventPlane& pub, const std::string& subject, Inbox& inbox,
                                               const std::string& tag, int timeout_ms) {
  auto start = Clock::now();
  for (int i = 0; Clock::now() - start < std::chrono::milliseconds(timeout_ms); ++i) {
    std::string payload = tag + "-" + std::to_string(i);
    (void)pub.Publish(subject, payload);
    std::unique_lock<std::mutex> lock(inbox.mu);
    if (inbox.cv.wait_for(lock, std::chrono::milliseconds(50), [&] {
          for (const auto& [s, p] : inbox.got) {
            if (p.rfind(tag + "-", 0) == 0) return true;
          }
          return false;
        })) {
      return std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start);
    }
  }
  return std::chrono::milliseconds(-1);
}

class NatsEventPlaneTest : public ::testing::Test {
 protected:
  void SetUp() override {
    bin_ = FindNatsServer();
    if (bin_.empty()) GTEST_SKIP() << "nats-server is not installed";
    int port = FreePort();
    ASSERT_GT(port, 0);
    server_ = std::make_unique<NatsServer>(bin_, port);
  }

  std::string bin_;
  std::unique_ptr<NatsServer> server_;
};

TEST_F(NatsEventPlaneTest, RoundTripAndWildcards) {
  ASSERT_TRUE(server_->Start());
  auto a = CreateEventPlane(server_->Url());
  auto b = CreateEventPlane(server_->Url());
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  EXPECT_NE((*a)->Describe().find("connected"), std::string::npos) << (*a)->Describe();
  Inbox exact, star, tail;
  auto s1 = (*b)->Subscribe("dyn.kv.ns.w1", exact.Callback());
  auto s2 = (*b)->Subscribe("dyn.kv.*.w1", star.Callback());
  auto s3 = (*b)->Subscribe("dyn.>", tail.Callback());
  ASSERT_TRUE(s1.ok() && s2.ok() && s3.ok());
  ASSERT_TRUE((*b)->Flush(2000).ok());  // the server has the interest before anything is published
  ASSERT_TRUE((*a)->Publish("dyn.kv.ns.w1", "one").ok());
  ASSERT_TRUE((*a)->Publish("dyn.kv.other.w1", "two").ok());
  ASSERT_TRUE((*a)->Publish("dyn.load.w1", std::string("bin\0ary", 7)).ok());
  ASSERT_TRUE((*a)->Publish("other.kv.ns.w1", "nobody").ok());
  ASSERT_TRUE((*a)->Flush(2000).ok());
  ASSERT_TRUE(tail.WaitFor(3));
  ASSERT_TRUE(star.WaitFor(2));
  ASSERT_TRUE(exact.WaitFor(1));
  std::this_thread::sleep_for(std::chrono::milliseconds(100));  // would-be extra deliveries
  EXPECT_EQ(exact.Size(), 1u);
  EXPECT_EQ(star.Size(), 2u);
  ASSERT_EQ(tail.Size(), 3u);
  EXPECT_EQ(exact.got[0], std::make_pair(std::string("dyn.kv.ns.w1"), std::string("one")));
  EXPECT_EQ(star.got[1].first, "dyn.kv.other.w1");
  EXPECT_EQ(tail.got[2].second, std::string("bin\0ary", 7));
}

TEST_F(NatsEventPlaneTest, OrderUnsubscribeAndLimits) {
  ASSERT_TRUE(server_->Start());
  auto plane = CreateEventPlane(server_->Url());
  ASSERT_TRUE(plane.ok());
  Inbox inbox;
  auto sub = (*plane)->Subscribe("order", inbox.Callback());
  ASSERT_TRUE(sub.ok());
  ASSERT_TRUE((*plane)->Flush(2000).ok());
  for (int i = 0; i < 2000; ++i) ASSERT_TRUE((*plane)->Publish("order", std::to_string(i)).ok());
  ASSERT_TRUE(inbox.WaitFor(2000));
  for (int i = 0; i < 2000; ++i) ASSERT_EQ(inbox.got[i].second, std::to_string(i));

  sub->reset();
  ASSERT_TRUE((*plane)->Publish("order", "late").ok());
  ASSERT_TRUE((*plane)->Flush(2000).ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_EQ(inbox.Size(), 2000u);

  EXPECT_EQ((*plane)->Publish("order", std::string(2 << 20, 'x')).code(), StatusCode::kTooLarge);
  EXPECT_EQ((*plane)->Publish("a.*", "x").code(), StatusCode::kInvalidArgument);
}

TEST_F(NatsEventPlaneTest, DestructorWaitsForRunningCallback) {
  ASSERT_TRUE(server_->Start());
  auto plane = CreateEventPlane(server_->Url());
  ASSERT_TRUE(plane.ok());
  std::atomic<bool> in_callback{false};
  std::atomic<bool> finished{false};
  auto sub = (*plane)->Subscribe("slow", [&](std::string_view, std::string_view) {
    in_callback = true;
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    finished = true;
  });
  ASSERT_TRUE(sub.ok());
  ASSERT_TRUE((*plane)->Flush(2000).ok());
  ASSERT_TRUE((*plane)->Publish("slow", "x").ok());
  ASSERT_TRUE((*plane)->Publish("slow", "y").ok());
  auto deadline = Clock::now() + std::chrono::seconds(5);
  while (!in_callback && Clock::now() < deadline) std::this_thread::yield();
  ASSERT_TRUE(in_callback.load());
  sub->reset();
  EXPECT_TRUE(finished.load());
  // The plane may go before a subscription: the subscription keeps the connection.
  Inbox inbox;
  auto orphan = (*plane)->Subscribe("orphan", inbox.Callback());
  ASSERT_TRUE(orphan.ok());
  plane->reset();
  orphan->reset();
}

TEST_F(NatsEventPlaneTest, BothClientsSurviveServerKillAndRestart) {
  ASSERT_TRUE(server_->Start());
  auto a = CreateEventPlane(server_->Url());
  auto b = CreateEventPlane(server_->Url());
  ASSERT_TRUE(a.ok() && b.ok());
  Inbox at_a, at_b;
  auto sa = (*a)->Subscribe("restart.to_a", at_a.Callback());
  auto sb = (*b)->Subscribe("restart.>", at_b.Callback());
  ASSERT_TRUE(sa.ok() && sb.ok());
  ASSERT_TRUE((*a)->Flush(2000).ok());
  ASSERT_TRUE((*b)->Flush(2000).ok());
  ASSERT_TRUE((*a)->Publish("restart.to_b", "before").ok());
  ASSERT_TRUE(at_b.WaitFor(1));

  server_->Kill();
  // While the server is gone publishing still succeeds (reconnect buffer) and Flush reports it.
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  EXPECT_TRUE((*a)->Publish("restart.to_b", "during").ok());
  EXPECT_FALSE((*a)->Flush(200).ok());
  EXPECT_NE((*a)->Describe().find("reconnecting"), std::string::npos) << (*a)->Describe();

  auto restart = Clock::now();
  ASSERT_TRUE(server_->Start());
  auto to_b = PublishUntilReceived(**a, "restart.to_b", at_b, "after", 5000);
  auto to_a = PublishUntilReceived(**b, "restart.to_a", at_a, "back", 5000);
  EXPECT_GE(to_b.count(), 0) << "subscriber b never got messages after the restart";
  EXPECT_GE(to_a.count(), 0) << "subscriber a never got messages after the restart";
  auto total = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - restart);
  EXPECT_LT(total.count(), 5000);
  EXPECT_NE((*a)->Describe().find("(connected)"), std::string::npos) << (*a)->Describe();
  EXPECT_TRUE((*a)->Flush(2000).ok());
  std::printf("messages flow again %lld ms after the restart\n", static_cast<long long>(total.count()));
}

TEST_F(NatsEventPlaneTest, PublishesWhileDisconnectedAreBufferedUpToALimit) {
  ASSERT_TRUE(server_->Start());
  auto plane = CreateEventPlane(server_->Url());
  ASSERT_TRUE(plane.ok());
  server_->Kill();
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  const std::string chunk(100 << 10, 'x');
  int accepted = 0;
  Status last;
  for (int i = 0; i < 1000; ++i) {
    last = (*plane)->Publish("buffered.big", chunk);
    if (!last.ok()) break;
    ++accepted;
  }
  // 8 MiB of reconnect buffer holds about 80 of these; then Publish says so instead of growing.
  EXPECT_EQ(last.code(), StatusCode::kResourceExhausted) << last.ToString();
  EXPECT_GT(accepted, 40);
  EXPECT_LT(accepted, 200);
}

TEST_F(NatsEventPlaneTest, ClientCreatedWhileServerDownConnectsLater) {
  auto start = Clock::now();
  auto early = CreateEventPlane(server_->Url());  // nothing listens on the port yet
  ASSERT_TRUE(early.ok()) << early.status().ToString();
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(2));  // creation does not block
  EXPECT_NE((*early)->Describe().find("reconnecting"), std::string::npos) << (*early)->Describe();
  Inbox inbox;
  auto sub = (*early)->Subscribe("late.start", inbox.Callback());
  ASSERT_TRUE(sub.ok()) << sub.status().ToString();
  EXPECT_TRUE((*early)->Publish("late.start", "buffered").ok());

  ASSERT_TRUE(server_->Start());
  auto other = CreateEventPlane(server_->Url());
  ASSERT_TRUE(other.ok());
  // The subscription made before the connection existed is sent once it connects.
  auto took = PublishUntilReceived(**other, "late.start", inbox, "hello", 5000);
  EXPECT_GE(took.count(), 0) << "the early client never received";
  // So is what it published while down: it reaches its own subscription.
  EXPECT_TRUE(inbox.Has("buffered"));
}

}  // namespace
}  // namespace dyn
