// CreateDiscovery and the helpers every backend shares (see discovery_internal.h).
#include "runtime/discovery.h"

#include <utility>

#include "runtime/discovery_internal.h"

namespace dyn {
namespace discovery_internal {
namespace {

constexpr char kB64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

int B64Value(char c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == '+' || c == '-') return 62;  // '-' and '_': the URL-safe alphabet, accepted on input
  if (c == '/' || c == '_') return 63;
  return -1;
}

int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1;
}

}  // namespace

std::string Base64Encode(std::string_view in) {
  std::string out;
  out.reserve((in.size() + 2) / 3 * 4);
  size_t i = 0;
  for (; i + 3 <= in.size(); i += 3) {
    uint32_t v = (uint8_t(in[i]) << 16) | (uint8_t(in[i + 1]) << 8) | uint8_t(in[i + 2]);
    out += kB64[v >> 18];
    out += kB64[(v >> 12) & 63];
    out += kB64[(v >> 6) & 63];
    out += kB64[v & 63];
  }
  if (i + 1 == in.size()) {
    uint32_t v = uint8_t(in[i]) << 16;
    out += kB64[v >> 18];
    out += kB64[(v >> 12) & 63];
    out += "==";
  } else if (i + 2 == in.size()) {
    uint32_t v = (uint8_t(in[i]) << 16) | (uint8_t(in[i + 1]) << 8);
    out += kB64[v >> 18];
    out += kB64[(v >> 12) & 63];
    out += kB64[(v >> 6) & 63];
    out += '=';
  }
  return out;
}

Result<std::string> Base64Decode(std::string_view in) {
  std::string out;
  out.reserve(in.size() / 4 * 3);
  uint32_t acc = 0;
  int bits = 0;
  for (char c : in) {
    if (c == '=') break;
    int v = B64Value(c);
    if (v < 0) return Status::InvalidArgument("bad base64 character");
    acc = (acc << 6) | uint32_t(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out += char((acc >> bits) & 0xff);
    }
  }
  return out;
}

std::string PrefixEnd(const std::string& prefix) {
  std::string end = prefix;
  while (!end.empty()) {
    if (uint8_t(end.back()) < 0xff) {
      end.back() = char(uint8_t(end.back()) + 1);
      return end;
    }
    end.pop_back();  // 0xff cannot be incremented: carry into the previous byte
  }
  return std::string(1, '\0');
}

std::string EncodeFileName(std::string_view key) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out;
  out.reserve(key.size());
  for (char c : key) {
    bool plain = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '-';
    if (plain) {
      out += c;
    } else {
      out += '%';
      out += kHex[uint8_t(c) >> 4];
      out += kHex[uint8_t(c) & 15];
    }
  }
  return out;
}

Result<std::string> DecodeFileName(std::string_view name) {
  std::string out;
  out.reserve(name.size());
  for (size_t i = 0; i < name.size(); ++i) {
    if (name[i] != '%') {
      out += name[i];
      continue;
    }
    if (i + 2 >= name.size()) return Status::InvalidArgument("truncated escape in file name");
    int hi = HexValue(name[i + 1]), lo = HexValue(name[i + 2]);
    if (hi < 0 || lo < 0) return Status::InvalidArgument("bad escape in file name");
    out += char(hi * 16 + lo);
    i += 2;
  }
  return out;
}

void JoinOrDetach(std::thread& thread) {
  if (!thread.joinable()) return;
  if (thread.get_id() == std::this_thread::get_id()) {
    thread.detach();
  } else {
    thread.join();
  }
}

CallbackRunner::CallbackRunner(WatchCallback callback) : state_(std::make_shared<State>()) {
  state_->callback = std::move(callback);
  thread_ = std::thread(&CallbackRunner::Loop, state_);
}

CallbackRunner::~CallbackRunner() { Stop(); }

void CallbackRunner::Push(WatchUpdate update) {
  {
    std::lock_guard lock(state_->mu);
    if (state_->stop) return;
    state_->queue.push_back(std::move(update));
  }
  state_->cv.notify_one();
}

void CallbackRunner::Stop() {
  {
    std::lock_guard lock(state_->mu);
    state_->stop = true;
    state_->queue.clear();
  }
  state_->cv.notify_one();
  JoinOrDetach(thread_);
}

void CallbackRunner::Loop(std::shared_ptr<State> state) {
  std::unique_lock lock(state->mu);
  while (true) {
    state->cv.wait(lock, [&] { return state->stop || !state->queue.empty(); });
    if (state->stop) return;
    WatchUpdate update = std::move(state->queue.front());
    state->queue.pop_front();
    lock.unlock();
    state->callback(update);
    lock.lock();
  }
}

}  // namespace discovery_internal

Result<std::unique_ptr<Discovery>> CreateDiscovery(const std::string& spec) {
  using namespace discovery_internal;
  if (spec == "mem") return CreateMemDiscovery();
  if (spec.rfind("file:", 0) == 0) {
    std::string dir = spec.substr(5);
    if (dir.empty()) return Status::InvalidArgument("discovery spec 'file:' needs a directory");
    return CreateFileDiscovery(dir);
  }
  std::string urls = spec;
  if (spec.rfind("etcd:", 0) == 0) {
    urls = spec.substr(5);
  } else if (spec.rfind("http://", 0) != 0 && spec.rfind("https://", 0) != 0) {
    return Status::InvalidArgument("unknown discovery spec '" + spec + "' (want mem, file:DIR or etcd:URL)");
  }
  std::vector<std::string> list;
  size_t start = 0;
  while (start <= urls.size()) {
    size_t comma = urls.find(',', start);
    if (comma == std::string::npos) comma = urls.size();
    if (comma > start) list.push_back(urls.substr(start, comma - start));
    start = comma + 1;
  }
  if (list.empty()) return Status::InvalidArgument("discovery spec '" + spec + "' names no etcd URL");
  return CreateEtcdDiscovery(list);
}

}  // namespace dyn
