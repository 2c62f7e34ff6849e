// Discovery "mem" and "file:" backends: keys, prefixes, leases, watches, and (file) processes
// that crash or stall while holding a lease.
#include <gtest/gtest.h>
#include <signal.h>
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
#include "runtime/discovery_internal.h"

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
  bool WaitFor(const std::function<bool(const View&)>& pred, std::chrono::milliseconds timeout = 4000ms) {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, timeout, [&] { return !updates_.empty() && pred(view_); });
  }
  std::vector<WatchUpdate> Updates() {
    std::lock_guard lock(mu_);
    return updates_;
  }
  View Current() {
    std::lock_guard lock(mu_);
    return view_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<WatchUpdate> updates_;
  View view_;
};

std::string MakeTempDir() {
  std::string pattern = (std::filesystem::temp_directory_path() / "dyn_disc_XXXXXX").string();
  char* dir = mkdtemp(pattern.data());
  EXPECT_NE(dir, nullptr);
  return pattern;
}

std::vector<std::string> Keys(const std::vector<KeyValue>& kvs) {
  std::vector<std::string> out;
  for (const KeyValue& kv : kvs) out.push_back(kv.key);
  return out;
}

class DiscoveryTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (GetParam() == "file") {
      dir_ = MakeTempDir();
      spec_ = "file:" + dir_;
    } else {
      spec_ = "mem";
    }
    // The mem store is process-wide: each test works under its own prefix.
    prefix_ = std::string("/t/") + ::testing::UnitTest::GetInstance()->current_test_info()->name() + "/";
  }
  void TearDown() override {
    if (!dir_.empty()) std::filesystem::remove_all(dir_);
  }
  std::unique_ptr<Discovery> New() {
    auto d = CreateDiscovery(spec_);
    EXPECT_TRUE(d.ok()) << d.status().ToString();
    return d.ok() ? std::move(*d) : nullptr;
  }
  std::string K(const std::string& s) const { return prefix_ + s; }

  std::string dir_, spec_, prefix_;
};

TEST_P(DiscoveryTest, PutGetDeleteAndPrefixIsolation) {
  auto d = New();
  ASSERT_TRUE(d->Put(K("a/x"), "1").ok());
  ASSERT_TRUE(d->Put(K("a/y"), "2").ok());
  ASSERT_TRUE(d->Put(K("ab/z"), "3").ok());
  ASSERT_TRUE(d->Put(K("a/x"), "1b").ok());  // replace
  auto a = d->GetPrefix(K("a/"));
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  ASSERT_EQ(Keys(*a), (std::vector<std::string>{K("a/x"), K("a/y")}));
  EXPECT_EQ((*a)[0].value, "1b");
  EXPECT_EQ((*a)[0].lease, 0);
  EXPECT_EQ(d->GetPrefix(K("a"))->size(), 3u);
  ASSERT_TRUE(d->Delete(K("a/x")).ok());
  ASSERT_TRUE(d->Delete(K("never")).ok());  // deleting a missing key is not an error
  EXPECT_EQ(Keys(*d->GetPrefix(K("a/"))), (std::vector<std::string>{K("a/y")}));
  EXPECT_FALSE(d->Put("", "v").ok());
  EXPECT_EQ(d->Describe(), spec_);
}

TEST_P(DiscoveryTest, OddKeysRoundTrip) {
  auto d = New();
  std::vector<std::string> keys = {K("a b/%41/./../x"), K(std::string("bin\0\xff\x01", 6)), K("utf8/\xc3\xa9")};
  for (const std::string& k : keys) ASSERT_TRUE(d->Put(k, "v:" + k).ok()) << k;
  auto got = d->GetPrefix(prefix_);
  ASSERT_TRUE(got.ok());
  ASSERT_EQ(got->size(), keys.size());
  for (const KeyValue& kv : *got) EXPECT_EQ(kv.value, "v:" + kv.key);
}

TEST_P(DiscoveryTest, PutUnderUnknownLeaseFails) {
  auto d = New();
  EXPECT_EQ(d->Put(K("x"), "v", 123456789).code(), StatusCode::kNotFound);
  EXPECT_TRUE(d->GetPrefix(K(""))->empty());
  EXPECT_FALSE(d->GrantLease(0).ok());
}

TEST_P(DiscoveryTest, WatchResetThenIncremental) {
  auto d = New();
  ASSERT_TRUE(d->Put(K("w/1"), "one").ok());
  ASSERT_TRUE(d->Put(K("other"), "no").ok());
  Recorder rec;
  auto watch = d->WatchPrefix(K("w/"), rec.Callback());
  ASSERT_TRUE(watch.ok());
  ASSERT_TRUE(rec.WaitFor([&](const View& v) { return v.size() == 1; }));
  auto first = rec.Updates().front();
  EXPECT_TRUE(first.reset);
  ASSERT_EQ(first.events.size(), 1u);
  EXPECT_EQ(first.events[0].kv.key, K("w/1"));
  EXPECT_EQ(first.events[0].kv.value, "one");

  ASSERT_TRUE(d->Put(K("w/2"), "two").ok());
  ASSERT_TRUE(d->Put(K("x/not-watched"), "no").ok());
  ASSERT_TRUE(rec.WaitFor([&](const View& v) { return v.count(K("w/2")) == 1; }));
  ASSERT_TRUE(d->Delete(K("w/1")).ok());
  ASSERT_TRUE(rec.WaitFor([&](const View& v) { return v == View{{K("w/2"), "two"}}; }));
  auto updates = rec.Updates();
  bool saw_delete = false;
  for (size_t i = 1; i < updates.size(); ++i) {
    EXPECT_FALSE(updates[i].reset);
    for (const WatchEvent& e : updates[i].events) {
      EXPECT_EQ(e.kv.key.rfind(K("w/"), 0), 0u) << e.kv.key;
      if (e.type == WatchEvent::Type::kDelete && e.kv.key == K("w/1")) saw_delete = true;
    }
  }
  EXPECT_TRUE(saw_delete);

  // After the handle is gone no callback runs.
  watch->reset();
  size_t before = rec.Updates().size();
  ASSERT_TRUE(d->Put(K("w/3"), "three").ok());
  std::this_thread::sleep_for(300ms);
  EXPECT_EQ(rec.Updates().size(), before);
}

TEST_P(DiscoveryTest, RevokeDeletesLeasedKeys) {
  auto d = New();
  auto lease = d->GrantLease(10);
  ASSERT_TRUE(lease.ok()) << lease.status().ToString();
  ASSERT_TRUE(d->Put(K("l/1"), "a", *lease).ok());
  ASSERT_TRUE(d->Put(K("l/2"), "b", *lease).ok());
  ASSERT_TRUE(d->Put(K("l/3"), "c").ok());
  EXPECT_EQ((*d->GetPrefix(K("l/1")))[0].lease, *lease);
  Recorder rec;
  auto watch = d->WatchPrefix(K("l/"), rec.Callback());
  ASSERT_TRUE(rec.WaitFor([&](const View& v) { return v.size() == 3; }));
  ASSERT_TRUE(d->RevokeLease(*lease).ok());
  EXPECT_EQ(Keys(*d->GetPrefix(K("l/"))), (std::vector<std::string>{K("l/3")}));
  ASSERT_TRUE(rec.WaitFor([&](const View& v) { return v == View{{K("l/3"), "c"}}; }));
  EXPECT_FALSE(d->Put(K("l/4"), "d", *lease).ok());
}

TEST_P(DiscoveryTest, LeaseKeptAliveThenExpiresWhenClientDies) {
  auto owner = New();
  auto observer = New();
  auto lease = owner->GrantLease(1);
  ASSERT_TRUE(lease.ok());
  ASSERT_TRUE(owner->Put(K("e/1"), "alive", *lease).ok());
  Recorder rec;
  auto watch = observer->WatchPrefix(K("e/"), rec.Callback());
  ASSERT_TRUE(rec.WaitFor([&](const View& v) { return v.size() == 1; }));
  std::this_thread::sleep_for(1800ms);  // well past the TTL: keep-alive must be working
  EXPECT_EQ(observer->GetPrefix(K("e/"))->size(), 1u);
  EXPECT_EQ(rec.Current().size(), 1u);

  auto dead_at = std::chrono::steady_clock::now();
  owner.reset();  // no revoke: like a crash
  ASSERT_TRUE(rec.WaitFor([&](const View& v) { return v.empty(); }, 4000ms));
  EXPECT_GE(std::chrono::steady_clock::now() - dead_at, 700ms) << "the lease must live out its TTL";
  EXPECT_TRUE(observer->GetPrefix(K("e/"))->empty());
  auto updates = rec.Updates();
  const WatchEvent& last = updates.back().events.back();
  EXPECT_EQ(last.type, WatchEvent::Type::kDelete);
  EXPECT_EQ(last.kv.key, K("e/1"));
}

TEST_P(DiscoveryTest, TwoClientsSeeEachOther) {
  auto a = New();
  auto b = New();
  Recorder rec_a, rec_b;
  auto wa = a->WatchPrefix(K("s/"), rec_a.Callback());
  auto wb = b->WatchPrefix(K("s/"), rec_b.Callback());
  ASSERT_TRUE(a->Put(K("s/a"), "from a").ok());
  ASSERT_TRUE(b->Put(K("s/b"), "from b").ok());
  View both{{K("s/a"), "from a"}, {K("s/b"), "from b"}};
  EXPECT_TRUE(rec_a.WaitFor([&](const View& v) { return v == both; }));
  EXPECT_TRUE(rec_b.WaitFor([&](const View& v) { return v == both; }));
  ASSERT_TRUE(b->Delete(K("s/a")).ok());
  EXPECT_TRUE(rec_a.WaitFor([&](const View& v) { return v.size() == 1 && v.count(K("s/b")); }));
  EXPECT_EQ(Keys(*a->GetPrefix(K("s/"))), (std::vector<std::string>{K("s/b")}));
}

TEST_P(DiscoveryTest, WatchDestroyedFromItsOwnCallback) {
  auto d = New();
  // Shared with the callback by value: its thread may finish after this test returns.
  struct Shared {
    std::mutex mu;
    std::condition_variable cv;
    std::unique_ptr<WatchHandle> handle;
    bool assigned = false;
    int calls = 0;
  };
  auto shared = std::make_shared<Shared>();
  auto watch = d->WatchPrefix(K("d/"), [shared](const WatchUpdate&) {
    std::unique_lock lock(shared->mu);
    shared->cv.wait(lock, [&] { return shared->assigned; });
    ++shared->calls;
    shared->handle.reset();  // must neither deadlock nor call back again
    shared->cv.notify_all();
  });
  ASSERT_TRUE(watch.ok());
  {
    std::lock_guard lock(shared->mu);
    shared->handle = std::move(*watch);
    shared->assigned = true;
  }
  shared->cv.notify_all();
  std::unique_lock lock(shared->mu);
  ASSERT_TRUE(shared->cv.wait_for(lock, 2s, [&] { return shared->calls == 1 && !shared->handle; }));
  lock.unlock();
  ASSERT_TRUE(d->Put(K("d/x"), "after").ok());
  std::this_thread::sleep_for(300ms);
  lock.lock();
  EXPECT_EQ(shared->calls, 1);
}

INSTANTIATE_TEST_SUITE_P(Backends, DiscoveryTest, ::testing::Values("mem", "file"));

// A child process (this binary, re-executed: forking a threaded test process is unsafe) grants a
// 1 s lease, puts `key` under it, reports on a pipe and waits to be stopped or killed. The child
// runs from a static initializer, before gtest's main, when its environment variable is set.
constexpr char kChildEnv[] = "DYN_DISCOVERY_TEST_CHILD";  // "<pipe fd> <spec> <key>"

[[maybe_unused]] const bool kChildRan = [] {
  const char* arg = getenv(kChildEnv);
  if (arg == nullptr) return false;
  std::string s = arg;
  size_t a = s.find(' '), b = s.find(' ', a + 1);
  int fd = std::atoi(s.substr(0, a).c_str());
  auto d = CreateDiscovery(s.substr(a + 1, b - a - 1));
  if (!d.ok()) _exit(2);
  auto lease = (*d)->GrantLease(1);
  if (!lease.ok() || !(*d)->Put(s.substr(b + 1), "child", *lease).ok()) _exit(3);
  char ok = 1;
  if (write(fd, &ok, 1) != 1) _exit(4);
  while (true) pause();
}();

pid_t StartChild(const std::string& spec, const std::string& key) {
  int fds[2];
  EXPECT_EQ(pipe(fds), 0);
  std::string env = std::string(kChildEnv) + "=" + std::to_string(fds[1]) + " " + spec + " " + key;
  char* const argv[] = {const_cast<char*>("discovery_test_child"), nullptr};
  char* const envp[] = {env.data(), nullptr};
  pid_t pid = fork();
  if (pid == 0) {
    close(fds[0]);
    execve("/proc/self/exe", argv, envp);
    _exit(127);
  }
  close(fds[1]);
  char ok = 0;
  EXPECT_EQ(read(fds[0], &ok, 1), 1) << "the child did not register";
  close(fds[0]);
  return pid;
}

TEST(FileDiscoveryTest, KilledProcessLosesKeysAfterTtl) {
  std::string dir = MakeTempDir();
  auto d = CreateDiscovery("file:" + dir);
  ASSERT_TRUE(d.ok());
  pid_t child = StartChild("file:" + dir, "/w/child");
  Recorder rec;
  auto watch = (*d)->WatchPrefix("/w/", rec.Callback());
  ASSERT_TRUE(rec.WaitFor([](const View& v) { return v.count("/w/child") == 1; }));
  std::this_thread::sleep_for(1500ms);  // the child's keep-alive holds the key past its TTL
  EXPECT_EQ(rec.Current().size(), 1u);
  kill(child, SIGKILL);
  waitpid(child, nullptr, 0);
  EXPECT_TRUE(rec.WaitFor([](const View& v) { return v.empty(); }, 4000ms));
  EXPECT_TRUE((*d)->GetPrefix("/w/")->empty());
  // Whoever noticed removed the dead key's file and the lease file.
  EXPECT_TRUE(std::filesystem::is_empty(dir + "/keys"));
  EXPECT_TRUE(std::filesystem::is_empty(dir + "/leases"));
  std::filesystem::remove_all(dir);
}

TEST(FileDiscoveryTest, StoppedProcessRegistersAgainWhenResumed) {
  std::string dir = MakeTempDir();
  auto d = CreateDiscovery("file:" + dir);
  ASSERT_TRUE(d.ok());
  pid_t child = StartChild("file:" + dir, "/w/child");
  Recorder rec;
  auto watch = (*d)->WatchPrefix("/w/", rec.Callback());
  ASSERT_TRUE(rec.WaitFor([](const View& v) { return v.count("/w/child") == 1; }));
  kill(child, SIGSTOP);
  EXPECT_TRUE(rec.WaitFor([](const View& v) { return v.empty(); }, 4000ms));
  kill(child, SIGCONT);
  EXPECT_TRUE(rec.WaitFor([](const View& v) { return v.count("/w/child") == 1; }, 3000ms));
  kill(child, SIGKILL);
  waitpid(child, nullptr, 0);
  std::filesystem::remove_all(dir);
}

TEST(DiscoverySpecTest, Specs) {
  EXPECT_FALSE(CreateDiscovery("bogus").ok());
  EXPECT_FALSE(CreateDiscovery("file:").ok());
  EXPECT_FALSE(CreateDiscovery("etcd:").ok());
  EXPECT_FALSE(CreateDiscovery("etcd:http://nohostport").ok());
  EXPECT_EQ(CreateDiscovery("etcd:https://127.0.0.1:1").status().code(), StatusCode::kUnsupported);
  auto e = CreateDiscovery("http://127.0.0.1:1,http://127.0.0.1:2");
  ASSERT_TRUE(e.ok());
  EXPECT_EQ((*e)->Describe(), "etcd:http://127.0.0.1:1,http://127.0.0.1:2");
  EXPECT_EQ((*e)->GetPrefix("/").status().code(), StatusCode::kUnavailable);  // nothing listens
}

TEST(DiscoveryHelpersTest, EncodingsRoundTrip) {
  using namespace discovery_internal;
  EXPECT_EQ(Base64Encode("foo"), "Zm9v");
  EXPECT_EQ(Base64Encode("fo"), "Zm8=");
  EXPECT_EQ(Base64Encode("f"), "Zg==");
  EXPECT_EQ(Base64Encode(""), "");
  for (std::string s : {std::string(""), std::string("a"), std::string("ab"), std::string("\0\xff\x10zz", 5)}) {
    EXPECT_EQ(*Base64Decode(Base64Encode(s)), s);
    EXPECT_EQ(*DecodeFileName(EncodeFileName(s)), s);
  }
  EXPECT_FALSE(Base64Decode("a*b").ok());
  EXPECT_EQ(EncodeFileName("/a.b c"), "%2Fa%2Eb%20c");
  EXPECT_FALSE(DecodeFileName("%4").ok());
  EXPECT_EQ(PrefixEnd("/a/"), "/a0");
  EXPECT_EQ(PrefixEnd("a\xff"), "b");
  EXPECT_EQ(PrefixEnd(""), std::string(1, '\0'));
}

}  // namespace
}  // namespace dyn
