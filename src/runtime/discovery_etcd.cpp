// "etcd:URL" discovery: etcd v3 through its JSON gateway, one short HTTP/1.1 connection per call
// (loopback control traffic is rare and small) and one long-lived streaming connection per watch.
//
// Leases: callers hold local ids that stay stable; each maps to the server's current lease id.
// The keep-alive thread renews every lease about 3 times per TTL. When etcd answers that a lease
// does not exist (it restarted with lost data, or we were cut off past the TTL), the lease is
// granted again and every key put under it is put again. Watches range first (a reset), then
// stream changes from the next revision; when the stream breaks they re-range (a new reset).
#include <atomic>
#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/json.hpp>
#include <chrono>
#include <condition_variable>
#include <map>
#include <mutex>
#include <thread>

#include "base/log.h"
#include "runtime/discovery_internal.h"

namespace dyn::discovery_internal {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace json = boost::json;
using tcp = asio::ip::tcp;
using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

constexpr auto kRequestTimeout = 2s;
constexpr auto kRetryInterval = 300ms;
constexpr auto kTick = 100ms;
constexpr int kMaxSyncFailures = 10;

struct Endpoint {
  std::string url;
  std::string host;
  std::string port;
};

struct HttpReply {
  std::string error;  // transport failure; empty when a response arrived
  int status = 0;
  std::string body;
};

asio::awaitable<void> PostCoro(Endpoint ep, std::string target, std::string body, HttpReply* out) {
  auto executor = co_await asio::this_coro::executor;
  beast::error_code ec;
  tcp::resolver resolver(executor);
  beast::tcp_stream stream(executor);
  auto fail = [&](const char* what) { out->error = std::string(what) + ": " + ec.message(); };
  auto results = co_await resolver.async_resolve(ep.host, ep.port, asio::redirect_error(asio::use_awaitable, ec));
  if (ec) co_return fail("resolve");
  stream.expires_after(kRequestTimeout);
  co_await stream.async_connect(results, asio::redirect_error(asio::use_awaitable, ec));
  if (ec) co_return fail("connect");
  http::request<http::string_body> req{http::verb::post, target, 11};
  req.set(http::field::host, ep.host);
  req.set(http::field::content_type, "application/json");
  req.body() = std::move(body);
  req.prepare_payload();
  co_await http::async_write(stream, req, asio::redirect_error(asio::use_awaitable, ec));
  if (ec) co_return fail("write");
  beast::flat_buffer buffer;
  http::response<http::string_body> res;
  co_await http::async_read(stream, buffer, res, asio::redirect_error(asio::use_awaitable, ec));
  if (ec) co_return fail("read");
  out->status = res.result_int();
  out->body = std::move(res.body());
  stream.socket().shutdown(tcp::socket::shutdown_both, ec);
}

HttpReply HttpPost(const Endpoint& ep, const std::string& target, std::string body) {
  HttpReply reply;
  try {
    asio::io_context ioc;
    asio::co_spawn(ioc, PostCoro(ep, target, std::move(body), &reply), asio::detached);
    ioc.run();
  } catch (const std::exception& e) {
    reply.error = e.what();
  }
  return reply;
}

// int64s come as JSON strings from the gateway; absent means 0 (proto3 default).
int64_t GetInt(const json::object& o, std::string_view key) {
  const json::value* v = o.if_contains(key);
  if (v == nullptr) return 0;
  if (v->is_string()) return std::strtoll(v->as_string().c_str(), nullptr, 10);
  if (v->is_int64()) return v->as_int64();
  if (v->is_uint64()) return int64_t(v->as_uint64());
  return 0;
}

std::string GetBytes(const json::object& o, std::string_view key) {
  const json::value* v = o.if_contains(key);
  if (v == nullptr || !v->is_string()) return {};
  auto decoded = Base64Decode(v->as_string());
  return decoded.ok() ? *decoded : std::string();
}

// Parses "http://host:port[/...]".
Result<Endpoint> ParseUrl(const std::string& url) {
  std::string rest = url;
  if (rest.rfind("https://", 0) == 0) return Status::Unsupported("etcd over TLS is not supported: " + url);
  if (rest.rfind("http://", 0) == 0) rest = rest.substr(7);
  rest = rest.substr(0, rest.find('/'));
  size_t colon = rest.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == rest.size()) {
    return Status::InvalidArgument("etcd URL needs host:port: " + url);
  }
  std::string host = rest.substr(0, colon);
  if (host.size() > 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  return Endpoint{url, host, rest.substr(colon + 1)};
}

class EtcdCore {
 public:
  struct Lease {
    int ttl = 0;
    int64_t server_id = 0;
    std::map<std::string, std::string> keys;  // put again when the lease is granted again
    Clock::time_point next_keepalive;
    bool reput = false;  // granted again, keys not all put yet
  };

  explicit EtcdCore(std::vector<Endpoint> endpoints) : endpoints_(std::move(endpoints)) {}

  const Endpoint& CurrentEndpoint() const { return endpoints_[current_ % endpoints_.size()]; }

  // One gateway call, trying each endpoint from the last good one. Returns the response object
  // (for streamed RPCs, the first message's "result").
  Result<json::object> Call(const std::string& path, const json::object& body) {
    std::string text = json::serialize(body);
    std::string last_error;
    for (size_t i = 0; i < endpoints_.size(); ++i) {
      size_t index = (current_ + i) % endpoints_.size();
      HttpReply reply = HttpPost(endpoints_[index], path, text);
      if (!reply.error.empty()) {
        last_error = endpoints_[index].url + ": " + reply.error;
        continue;
      }
      current_ = index;
      boost::system::error_code ec;
      json::value v = json::parse(reply.body, ec);
      if (ec || !v.is_object()) return Status::Unavailable("etcd " + path + ": bad response: " + reply.body.substr(0, 200));
      json::object& o = v.as_object();
      if (json::value* err = o.if_contains("error")) {
        // Unary errors are {"error","code","message"}; streamed ones {"error":{...}}.
        json::object& eo = err->is_object() ? err->as_object() : o;
        int64_t code = GetInt(eo, "code");
        std::string message = eo.contains("message") && eo["message"].is_string() ? std::string(eo["message"].as_string()) : json::serialize(*err);
        return Status(code == 5 ? StatusCode::kNotFound : StatusCode::kUnavailable, "etcd " + path + ": " + message);
      }
      if (reply.status != 200) return Status::Unavailable("etcd " + path + ": HTTP " + std::to_string(reply.status));
      if (json::value* result = o.if_contains("result"); result != nullptr && result->is_object()) {
        return std::move(result->as_object());
      }
      return std::move(o);
    }
    return Status::Unavailable("etcd unreachable: " + last_error);
  }

  Result<std::pair<int64_t, int64_t>> GrantRaw(int ttl) {  // (server id, granted TTL)
    DYN_ASSIGN_OR_RETURN(json::object r, Call("/v3/lease/grant", {{"TTL", ttl}}));
    int64_t id = GetInt(r, "ID");
    if (id == 0) return Status::Unavailable("etcd lease grant returned no id");
    return std::make_pair(id, GetInt(r, "TTL"));
  }

  Status PutRaw(const std::string& key, const std::string& value, int64_t server_lease) {
    json::object body{{"key", Base64Encode(key)}, {"value", Base64Encode(value)}};
    if (server_lease != 0) body["lease"] = std::to_string(server_lease);
    return Call("/v3/kv/put", body).status();
  }

  static Clock::duration KeepAliveInterval(int ttl) { return std::max<Clock::duration>(std::chrono::milliseconds(ttl * 1000 / 3), 200ms); }

  // Renews the due leases (every lease if `all`). A lease etcd no longer knows is granted again
  // and its keys put again. Returns the first failure (the caller retries later).
  Status SyncLeases(bool all) {
    std::lock_guard sync_lock(sync_mu_);
    struct Due {
      int64_t local, server;
      int ttl;
      bool reput;
    };
    std::vector<Due> due;
    {
      std::lock_guard lock(mu);
      if (closed) return Status::Ok();
      auto now = Clock::now();
      for (auto& [id, l] : leases) {
        if (all || l.reput || l.next_keepalive <= now) due.push_back({id, l.server_id, l.ttl, l.reput});
      }
    }
    for (const Due& t : due) {
      int64_t server = t.server;
      bool reput = t.reput;
      if (!reput) {
        DYN_ASSIGN_OR_RETURN(json::object r, Call("/v3/lease/keepalive", {{"ID", std::to_string(server)}}));
        if (GetInt(r, "TTL") <= 0) {  // etcd answers TTL 0 for a lease it does not know
          DYN_ASSIGN_OR_RETURN(auto granted, GrantRaw(t.ttl));
          server = granted.first;
          reput = true;
          std::lock_guard lock(mu);
          auto it = leases.find(t.local);
          if (it == leases.end()) continue;  // revoked meanwhile
          it->second.server_id = server;
          it->second.reput = true;
          DYN_LOG(INFO) << "discovery etcd: lease " << t.local << " was lost; granted again as " << server;
        }
      }
      if (reput) {
        std::map<std::string, std::string> keys;
        {
          std::lock_guard lock(mu);
          auto it = leases.find(t.local);
          if (it == leases.end()) continue;
          keys = it->second.keys;
        }
        for (auto& [k, v] : keys) DYN_RETURN_IF_ERROR(PutRaw(k, v, server));
      }
      std::lock_guard lock(mu);
      auto it = leases.find(t.local);
      if (it == leases.end()) continue;
      if (it->second.server_id == server) it->second.reput = false;
      it->second.next_keepalive = Clock::now() + KeepAliveInterval(t.ttl);
    }
    return Status::Ok();
  }

  // The caller's id for a server lease id (ids of other clients' leases pass through).
  int64_t ToLocal(int64_t server) {
    if (server == 0) return 0;
    std::lock_guard lock(mu);
    for (auto& [id, l] : leases) {
      if (l.server_id == server) return id;
    }
    return server;
  }

  std::mutex mu;  // guards leases and closed
  std::map<int64_t, Lease> leases;
  bool closed = false;

 private:
  std::vector<Endpoint> endpoints_;
  std::atomic<size_t> current_{0};
  std::mutex sync_mu_;  // one lease sync at a time
};

std::vector<WatchEvent> ParseEvents(EtcdCore& core, const json::array& events) {
  std::vector<WatchEvent> out;
  for (const json::value& ev : events) {
    const json::object& e = ev.as_object();
    WatchEvent w;
    const json::value* type = e.if_contains("type");
    w.type = type != nullptr && type->is_string() && type->as_string() == "DELETE" ? WatchEvent::Type::kDelete : WatchEvent::Type::kPut;
    const json::object& kv = e.at("kv").as_object();
    w.kv.key = GetBytes(kv, "key");
    if (w.type == WatchEvent::Type::kPut) {
      w.kv.value = GetBytes(kv, "value");
      w.kv.lease = core.ToLocal(GetInt(kv, "lease"));
    }
    out.push_back(std::move(w));
  }
  return out;
}

struct EtcdWatchState {
  std::shared_ptr<EtcdCore> core;
  std::string prefix;
  WatchCallback callback;
  std::atomic<bool> stop{false};
  std::mutex mu;
  std::condition_variable cv;

  void Sleep(Clock::duration d) {
    std::unique_lock lock(mu);
    cv.wait_for(lock, d, [&] { return stop.load(); });
  }

  json::object RangeBody() const { return {{"key", Base64Encode(prefix)}, {"range_end", Base64Encode(PrefixEnd(prefix))}}; }

  // Delivers one streamed message; false ends the stream (error, cancel, or stop).
  bool Handle(const json::value& v) {
    try {
      const json::object& o = v.as_object();
      if (o.contains("error")) return false;
      const json::object& r = o.at("result").as_object();
      if (const json::value* c = r.if_contains("canceled"); c != nullptr && c->is_bool() && c->as_bool()) return false;
      const json::value* events = r.if_contains("events");
      if (events == nullptr) return !stop;
      WatchUpdate update;
      update.events = ParseEvents(*core, events->as_array());
      if (stop) return false;
      if (!update.events.empty()) callback(update);
      return !stop;
    } catch (const std::exception& e) {
      DYN_LOG(WARN) << "discovery etcd: bad watch message: " << e.what();
      return false;
    }
  }

  // The watch stream from `revision` until it breaks or the watch stops.
  static asio::awaitable<void> StreamCoro(std::shared_ptr<EtcdWatchState> s, Endpoint ep, int64_t revision) {
    auto executor = co_await asio::this_coro::executor;
    beast::error_code ec;
    tcp::resolver resolver(executor);
    beast::tcp_stream stream(executor);
    auto results = co_await resolver.async_resolve(ep.host, ep.port, asio::redirect_error(asio::use_awaitable, ec));
    if (ec) co_return;
    stream.expires_after(kRequestTimeout);
    co_await stream.async_connect(results, asio::redirect_error(asio::use_awaitable, ec));
    if (ec) co_return;
    json::object create = s->RangeBody();
    create["start_revision"] = std::to_string(revision);
    http::request<http::string_body> req{http::verb::post, "/v3/watch", 11};
    req.set(http::field::host, ep.host);
    req.set(http::field::content_type, "application/json");
    req.body() = json::serialize(json::object{{"create_request", create}});
    req.prepare_payload();
    co_await http::async_write(stream, req, asio::redirect_error(asio::use_awaitable, ec));
    if (ec) co_return;
    beast::flat_buffer buffer;
    http::response_parser<http::buffer_body> parser;
    parser.body_limit(boost::none);  // the stream is endless
    co_await http::async_read_header(stream, buffer, parser, asio::redirect_error(asio::use_awaitable, ec));
    if (ec || parser.get().result_int() != 200) co_return;
    stream.expires_never();  // a quiet prefix sends nothing for a long time
    json::stream_parser jp;
    char chunk[16384];
    while (!parser.is_done() && !s->stop) {
      parser.get().body().data = chunk;
      parser.get().body().size = sizeof chunk;
      co_await http::async_read_some(stream, buffer, parser, asio::redirect_error(asio::use_awaitable, ec));
      if (ec == http::error::need_buffer) ec = {};
      if (ec) co_return;
      const char* p = chunk;
      size_t n = sizeof chunk - parser.get().body().size;
      while (n > 0) {
        size_t used = jp.write_some(p, n, ec);
        if (ec) co_return;
        p += used;
        n -= used;
        if (jp.done()) {
          json::value v = jp.release();
          jp.reset();
          if (!s->Handle(v)) co_return;
        }
      }
    }
  }

  static void Loop(std::shared_ptr<EtcdWatchState> s) {
    bool resync = false;
    int sync_failures = 0;
    while (!s->stop) {
      // After a break, first make sure our own leased keys are back, so the reset lists them.
      // A lease sync that keeps failing while ranges work must not stall the watch forever.
      if (resync && sync_failures < kMaxSyncFailures && !s->core->SyncLeases(true).ok()) {
        ++sync_failures;
        s->Sleep(kRetryInterval);
        continue;
      }
      resync = true;
      sync_failures = 0;
      if (s->stop) break;
      auto range = s->core->Call("/v3/kv/range", s->RangeBody());
      if (!range.ok()) {
        s->Sleep(kRetryInterval);
        continue;
      }
      WatchUpdate reset;
      reset.reset = true;
      try {
        if (const json::value* kvs = range->if_contains("kvs")) {
          for (const json::value& kv : kvs->as_array()) {
            const json::object& o = kv.as_object();
            reset.events.push_back({WatchEvent::Type::kPut, KeyValue{GetBytes(o, "key"), GetBytes(o, "value"), s->core->ToLocal(GetInt(o, "lease"))}});
          }
        }
      } catch (const std::exception& e) {
        DYN_LOG(WARN) << "discovery etcd: bad range response: " << e.what();
        s->Sleep(kRetryInterval);
        continue;
      }
      int64_t revision = GetInt(range->at("header").as_object(), "revision");
      if (s->stop) break;
      s->callback(reset);
      RunStream(s, revision + 1);
      s->Sleep(kRetryInterval);
    }
  }

  static void RunStream(const std::shared_ptr<EtcdWatchState>& s, int64_t revision) {
    try {
      asio::io_context ioc;
      bool done = false;
      asio::co_spawn(ioc, StreamCoro(s, s->core->CurrentEndpoint(), revision), [&](std::exception_ptr) { done = true; });
      // Short slices so a stopped watch leaves within one tick; destroying ioc ends the stream.
      while (!done && !s->stop) ioc.run_for(kTick);
    } catch (const std::exception& e) {
      DYN_LOG(WARN) << "discovery etcd: watch stream: " << e.what();
    }
  }
};

class EtcdDiscovery : public Discovery {
 public:
  EtcdDiscovery(std::shared_ptr<EtcdCore> core, std::string describe) : core_(std::move(core)), describe_(std::move(describe)) {
    keepalive_ = std::thread([this] { KeepAliveLoop(); });
  }

  // Stops keep-alive without revoking: the leases run out as a crashed process's would.
  ~EtcdDiscovery() override {
    {
      std::lock_guard lock(core_->mu);
      core_->closed = true;
    }
    {
      std::lock_guard lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    keepalive_.join();
  }

  Result<int64_t> GrantLease(int ttl_seconds) override {
    if (ttl_seconds <= 0) return Status::InvalidArgument("lease TTL must be positive");
    DYN_ASSIGN_OR_RETURN(auto granted, core_->GrantRaw(ttl_seconds));
    std::lock_guard lock(core_->mu);
    int64_t local = granted.first;
    while (core_->leases.count(local)) ++local;  // a new server id equal to an older local id
    EtcdCore::Lease& lease = core_->leases[local];
    lease.ttl = ttl_seconds;
    lease.server_id = granted.first;
    lease.next_keepalive = Clock::now() + EtcdCore::KeepAliveInterval(ttl_seconds);
    return local;
  }

  Status RevokeLease(int64_t lease) override {
    int64_t server = lease;
    {
      std::lock_guard lock(core_->mu);
      auto it = core_->leases.find(lease);
      if (it != core_->leases.end()) {
        server = it->second.server_id;
        core_->leases.erase(it);
      }
    }
    Status s = core_->Call("/v3/lease/revoke", {{"ID", std::to_string(server)}}).status();
    return s.code() == StatusCode::kNotFound ? Status::Ok() : s;
  }

  Status Put(const std::string& key, const std::string& value, int64_t lease) override {
    if (key.empty()) return Status::InvalidArgument("empty discovery key");
    for (int attempt = 0;; ++attempt) {
      int64_t server = lease;
      bool own = false;
      {
        std::lock_guard lock(core_->mu);
        for (auto& [id, l] : core_->leases) l.keys.erase(key);
        auto it = core_->leases.find(lease);
        if (it != core_->leases.end()) {
          own = true;
          server = it->second.server_id;
          it->second.keys[key] = value;
        }
      }
      Status s = core_->PutRaw(key, value, server);
      // Our lease vanished on the server (restart) before keep-alive noticed: renew and retry.
      if (s.code() == StatusCode::kNotFound && own && attempt == 0) {
        DYN_RETURN_IF_ERROR(core_->SyncLeases(true));
        continue;
      }
      return s;
    }
  }

  Status Delete(const std::string& key) override {
    {
      std::lock_guard lock(core_->mu);
      for (auto& [id, l] : core_->leases) l.keys.erase(key);
    }
    return core_->Call("/v3/kv/deleterange", {{"key", Base64Encode(key)}}).status();
  }

  Result<std::vector<KeyValue>> GetPrefix(const std::string& prefix) override {
    DYN_ASSIGN_OR_RETURN(json::object r, core_->Call("/v3/kv/range", {{"key", Base64Encode(prefix)}, {"range_end", Base64Encode(PrefixEnd(prefix))}}));
    std::vector<KeyValue> out;
    try {
      if (const json::value* kvs = r.if_contains("kvs")) {
        for (const json::value& kv : kvs->as_array()) {
          const json::object& o = kv.as_object();
          out.push_back(KeyValue{GetBytes(o, "key"), GetBytes(o, "value"), core_->ToLocal(GetInt(o, "lease"))});
        }
      }
    } catch (const std::exception& e) {
      return Status::Unavailable(std::string("etcd range: bad response: ") + e.what());
    }
    return out;
  }

  Result<std::unique_ptr<WatchHandle>> WatchPrefix(const std::string& prefix, WatchCallback callback) override {
    if (!callback) return Status::InvalidArgument("null watch callback");
    auto state = std::make_shared<EtcdWatchState>();
    state->core = core_;
    state->prefix = prefix;
    state->callback = std::move(callback);
    return std::unique_ptr<WatchHandle>(new LoopWatchHandle<EtcdWatchState>(std::move(state)));
  }

  std::string Describe() const override { return describe_; }

 private:
  void KeepAliveLoop() {
    bool failing = false;
    std::unique_lock lock(mu_);
    while (!stop_) {
      lock.unlock();
      Status s = core_->SyncLeases(false);
      lock.lock();
      if (!s.ok() && !failing) {
        DYN_LOG(WARN) << "discovery " << describe_ << ": keep-alive failing: " << s.ToString();
      } else if (s.ok() && failing) {
        DYN_LOG(INFO) << "discovery " << describe_ << ": keep-alive recovered";
      }
      failing = !s.ok();
      cv_.wait_for(lock, failing ? Clock::duration(kRetryInterval) : Clock::duration(kTick), [&] { return stop_; });
    }
  }

  std::shared_ptr<EtcdCore> core_;
  std::string describe_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread keepalive_;
};

}  // namespace

Result<std::unique_ptr<Discovery>> CreateEtcdDiscovery(const std::vector<std::string>& urls) {
  std::vector<Endpoint> endpoints;
  std::string describe = "etcd:";
  for (const std::string& url : urls) {
    DYN_ASSIGN_OR_RETURN(Endpoint ep, ParseUrl(url));
    if (!endpoints.empty()) describe += ",";
    describe += url;
    endpoints.push_back(std::move(ep));
  }
  auto core = std::make_shared<EtcdCore>(std::move(endpoints));
  return std::unique_ptr<Discovery>(new EtcdDiscovery(std::move(core), describe));
}

}  // namespace dyn::discovery_internal
