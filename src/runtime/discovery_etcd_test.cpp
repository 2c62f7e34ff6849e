// Discovery "etcd:" backend against a real etcd started by the test on loopback ports, including
// an etcd crash and restart with all its data lost.
#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <filesystem>
#include <functional>
#include <map>
#include <mutex>
#include <thread>

#include "runtime/discovery.h"

namespace dyn {
namespace {

using namespace std::chrono_literals;
using View = std::map<std::string, std::string>;

// Collects a watch's updates and keeps the view they describe.
class Recorder {
 public:
  WatchCallback Callback() {
    return [this](const WatchUpdate& u) {
      std::lock_guard lock(mu_);
      EXPECT_TRUE(!updates_.empty() || u.reset) << "the first update of a watch must be a reset";
      updates_.push_back(u);
      if (u.reset) view_.clear();
      for (const WatchEvent& e : u.events) {
        if (e.type == WatchEvent::Type::kPut) {
          view_[e.kv.key] = e.kv.value;
        } else {
          view_.erase(e.kv.key);
        }
      }
      cv_.notify_all();
    };
  }
  bool WaitFor(const std::function<bool(const View&)>& pred, std::chrono::milliseconds timeout = 5000ms) {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, timeout, [&] { return !updates_.empty() && pred(view_); });
  }
  // Waits for a reset (after the first `skip` updates) that satisfies `pred` on its own.
  bool WaitForReset(size_t skip, const std::function<bool(const WatchUpdate&)>& pred, std::chrono::milliseconds timeout) {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, timeout, [&] {
      for (size_t i = skip; i < updates_.size(); ++i) {
        if (updates_[i].reset && pred(updates_[i])) return true;
      }
      return false;
    });
  }
  std::vector<WatchUpdate> Updates() {
    std::lock_guard lock(mu_);
    return updates_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<WatchUpdate> updates_;
  View view_;
};

int FreePort() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  socklen_t len = sizeof addr;
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  close(fd);
  return ntohs(addr.sin_port);
}

bool HaveEtcd() { return std::filesystem::exists("/usr/bin/etcd") || system("command -v etcd >/dev/null 2>&1") == 0; }

// One etcd member on loopback, with its data under a temp dir.
class EtcdServer {
 public:
  EtcdServer() {
    std::string pattern = (std::filesystem::temp_directory_path() / "dyn_etcd_XXXXXX").string();
    EXPECT_NE(mkdtemp(pattern.data()), nullptr);
    root_ = pattern;
    client_port_ = FreePort();
    peer_port_ = FreePort();
  }
  ~EtcdServer() {
    Kill();
    std::filesystem::remove_all(root_);
  }
  std::string url() const { return "http://127.0.0.1:" + std::to_string(client_port_); }

  // Starts etcd on the same ports with a data dir never used before; waits until it serves.
  bool Start() {
    std::string data = root_ + "/data" + std::to_string(starts_++);
    std::string peer = "http://127.0.0.1:" + std::to_string(peer_port_);
    std::vector<std::string> args = {"etcd", "--name", "default", "--data-dir", data, "--listen-client-urls", url(),
                                     "--advertise-client-urls", url(), "--listen-peer-urls", peer,
                                     "--initial-advertise-peer-urls", peer, "--initial-cluster", "default=" + peer,
                                     "--heartbeat-interval", "20", "--election-timeout", "200"};
    std::string log = root_ + "/etcd.log";
    // Built before fork: the child of a threaded process may only make async-signal-safe calls.
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    pid_ = fork();
    if (pid_ == 0) {
      int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
      dup2(fd, 1);
      dup2(fd, 2);
      execvp("etcd", argv.data());
      _exit(127);
    }
    auto probe = CreateDiscovery("etcd:" + url());
    for (int i = 0; i < 100; ++i) {
      if ((*probe)->GetPrefix("/").ok()) return true;
      std::this_thread::sleep_for(50ms);
    }
    return false;
  }
  void Kill() {
    if (pid_ <= 0) return;
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }

 private:
  std::string root_;
  int client_port_ = 0, peer_port_ = 0, starts_ = 0;
  pid_t pid_ = -1;
};

class EtcdDiscoveryTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!HaveEtcd()) GTEST_SKIP() << "etcd is not installed (apt-get install etcd-server)";
    etcd_ = std::make_unique<EtcdServer>();
    ASSERT_TRUE(etcd_->Start()) << "etcd did not start";
  }
  std::unique_ptr<Discovery> New() {
    auto d = CreateDiscovery("etcd:" + etcd_->url());
    EXPECT_TRUE(d.ok()) << d.status().ToString();
    return std::move(*d);
  }
  std::unique_ptr<EtcdServer> etcd_;
};

std::vector<std::string> Keys(const std::vector<KeyValue>& kvs) {
  std::vector<std::string> out;
  for (const KeyValue& kv : kvs) out.push_back(kv.key);
  return out;
}

bool Lists(const WatchUpdate& u, const std::string& key) {
  for (const WatchEvent& e : u.events) {
    if (e.kv.key == key) return true;
  }
  return false;
}

TEST_F(EtcdDiscoveryTest, PutGetDeleteAndPrefixIsolation) {
  auto d = New();
  EXPECT_EQ(d->Describe(), "etcd:" + etcd_->url());
  ASSERT_TRUE(d->Put("/a/x", "1").ok());
  ASSERT_TRUE(d->Put("/a/y", std::string("bin\0\xff", 5)).ok());
  ASSERT_TRUE(d->Put("/ab/z", "3").ok());
  auto a = d->GetPrefix("/a/");
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  ASSERT_EQ(Keys(*a), (std::vector<std::string>{"/a/x", "/a/y"}));
  EXPECT_EQ((*a)[1].value, std::string("bin\0\xff", 5));
  EXPECT_EQ(d->GetPrefix("/a")->size(), 3u);
  ASSERT_TRUE(d->Delete("/a/x").ok());
  EXPECT_EQ(Keys(*d->GetPrefix("/a/")), (std::vector<std::string>{"/a/y"}));
  EXPECT_EQ(d->Put("/a/q", "v", 12345).code(), StatusCode::kNotFound);
}

TEST_F(EtcdDiscoveryTest, WatchResetIncrementalAndRevoke) {
  auto d = New();
  auto lease = d->GrantLease(10);
  ASSERT_TRUE(lease.ok()) << lease.status().ToString();
  ASSERT_TRUE(d->Put("/w/1", "one", *lease).ok());
  ASSERT_TRUE(d->Put("/w/2", "two").ok());
  EXPECT_EQ((*d->GetPrefix("/w/1"))[0].lease, *lease);
  Recorder rec;
  auto watch = d->WatchPrefix("/w/", rec.Callback());
  ASSERT_TRUE(watch.ok());
  ASSERT_TRUE(rec.WaitFor([](const View& v) { return v.size() == 2; }));
  EXPECT_TRUE(rec.Updates()[0].reset);
  EXPECT_EQ(rec.Updates()[0].events.size(), 2u);
  ASSERT_TRUE(d->Put("/w/3", "three", *lease).ok());
  ASSERT_TRUE(d->Put("/x/unwatched", "no").ok());
  ASSERT_TRUE(rec.WaitFor([](const View& v) { return v.count("/w/3") == 1; }));
  ASSERT_TRUE(d->RevokeLease(*lease).ok());
  ASSERT_TRUE(rec.WaitFor([](const View& v) { return v == View{{"/w/2", "two"}}; }));
  auto updates = rec.Updates();
  for (size_t i = 1; i < updates.size(); ++i) {
    EXPECT_FALSE(updates[i].reset);
    for (const WatchEvent& e : updates[i].events) EXPECT_EQ(e.kv.key.rfind("/w/", 0), 0u) << e.kv.key;
  }
  EXPECT_EQ(updates.back().events.back().type, WatchEvent::Type::kDelete);
  watch->reset();
  size_t before = rec.Updates().size();
  ASSERT_TRUE(d->Put("/w/4", "four").ok());
  std::this_thread::sleep_for(200ms);
  EXPECT_EQ(rec.Updates().size(), before);
}

TEST_F(EtcdDiscoveryTest, LeaseKeptAliveThenExpiresWhenClientDies) {
  auto owner = New();
  auto observer = New();
  auto lease = owner->GrantLease(1);
  ASSERT_TRUE(lease.ok());
  ASSERT_TRUE(owner->Put("/e/1", "alive", *lease).ok());
  Recorder rec;
  auto watch = observer->WatchPrefix("/e/", rec.Callback());
  ASSERT_TRUE(rec.WaitFor([](const View& v) { return v.size() == 1; }));
  std::this_thread::sleep_for(2000ms);
  EXPECT_EQ(observer->GetPrefix("/e/")->size(), 1u) << "keep-alive must hold the key past its TTL";
  owner.reset();  // no revoke: like a crash
  ASSERT_TRUE(rec.WaitFor([](const View& v) { return v.empty(); }, 5000ms));
  EXPECT_TRUE(observer->GetPrefix("/e/")->empty());
  EXPECT_EQ(rec.Updates().back().events.back().type, WatchEvent::Type::kDelete);
}

TEST_F(EtcdDiscoveryTest, EtcdRestartWithLostDataReRegistersAndResyncs) {
  auto a = New();
  auto lease = a->GrantLease(2);
  ASSERT_TRUE(lease.ok());
  ASSERT_TRUE(a->Put("/r/a", "from a", *lease).ok());
  ASSERT_TRUE(a->Put("/r/plain", "no lease").ok());  // not re-put: only leased keys are
  Recorder rec;
  auto watch = a->WatchPrefix("/r/", rec.Callback());
  ASSERT_TRUE(rec.WaitFor([](const View& v) { return v.size() == 2; }));

  etcd_->Kill();
  std::this_thread::sleep_for(500ms);
  size_t seen = rec.Updates().size();
  ASSERT_TRUE(etcd_->Start());  // fresh data dir: every key and lease is gone

  // The client grants its lease again and puts its key; the watch re-syncs with a reset that
  // already lists it.
  EXPECT_TRUE(rec.WaitForReset(seen, [](const WatchUpdate& u) { return Lists(u, "/r/a"); }, 5000ms));
  EXPECT_TRUE(rec.WaitFor([](const View& v) { return v == View{{"/r/a", "from a"}}; }));
  auto b = New();
  auto got = b->GetPrefix("/r/");
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(Keys(*got), (std::vector<std::string>{"/r/a"}));

  // A second client's key put after the restart reaches the first client's watch.
  ASSERT_TRUE(b->Put("/r/b", "from b").ok());
  EXPECT_TRUE(rec.WaitFor([](const View& v) { return v.count("/r/b") == 1; }));

  // The caller's lease id still works, and still owns the re-put key.
  ASSERT_TRUE(a->Put("/r/c", "late", *lease).ok());
  EXPECT_TRUE(rec.WaitFor([](const View& v) { return v.count("/r/c") == 1; }));
  ASSERT_TRUE(a->RevokeLease(*lease).ok());
  EXPECT_TRUE(rec.WaitFor([](const View& v) { return v == View{{"/r/b", "from b"}}; }));
}

TEST_F(EtcdDiscoveryTest, WatchSurvivesOutageAndDropsLostKeys) {
  auto d = New();
  ASSERT_TRUE(d->Put("/o/1", "one").ok());
  Recorder rec;
  auto watch = d->WatchPrefix("/o/", rec.Callback());
  ASSERT_TRUE(rec.WaitFor([](const View& v) { return v.size() == 1; }));
  etcd_->Kill();
  EXPECT_EQ(d->Put("/o/2", "down").code(), StatusCode::kUnavailable);
  EXPECT_FALSE(d->GetPrefix("/o/").ok());
  ASSERT_TRUE(etcd_->Start());
  // Fresh data: "/o/1" is gone, and the reset says so.
  EXPECT_TRUE(rec.WaitFor([](const View& v) { return v.empty(); }));
  ASSERT_TRUE(d->Put("/o/3", "up").ok());
  EXPECT_TRUE(rec.WaitFor([](const View& v) { return v == View{{"/o/3", "up"}}; }));
}

}  // namespace
}  // namespace dyn
