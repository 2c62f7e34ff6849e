#include "loadgen/client.h"

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <deque>
#include <optional>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/json.hpp>

#include "base/log.h"
#include "loadgen/sse.h"

namespace dyn::loadgen {
namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace json = boost::json;
using tcp = asio::ip::tcp;
using Clock = std::chrono::steady_clock;
constexpr auto kNoThrow = asio::as_tuple(asio::use_awaitable);

namespace {
// The fields of ClientOptions::extra_body (none when it is empty); nullopt when it is not a JSON
// object.
std::optional<json::object> ExtraFields(const std::string& extra_body) {
  if (extra_body.empty()) return json::object{};
  boost::system::error_code ec;
  json::value v = json::parse(extra_body, ec);
  if (ec || !v.is_object()) return std::nullopt;
  return std::move(v.as_object());
}
}  // namespace

std::string RequestBody(const ClientOptions& o, const RequestSpec& spec) {
  json::object body;
  body["model"] = o.model;
  if (o.endpoint == Endpoint::kChat) {
    json::array messages;
    messages.push_back(json::object{{"role", "user"}, {"content", spec.prompt_text}});
    body["messages"] = std::move(messages);
  } else if (!spec.prompt_ids.empty()) {
    json::array ids;
    ids.reserve(spec.prompt_ids.size());
    for (uint32_t id : spec.prompt_ids) ids.push_back(id);
    body["prompt"] = std::move(ids);
  } else {
    body["prompt"] = spec.prompt_text;
  }
  body["max_tokens"] = spec.max_tokens;
  if (o.ignore_eos) {
    body["ignore_eos"] = true;
    body["min_tokens"] = spec.max_tokens;  // servers without ignore_eos still honour min_tokens
  }
  body["stream"] = o.stream;
  if (o.stream) body["stream_options"] = json::object{{"include_usage", true}};
  for (const auto& kv : ExtraFields(o.extra_body).value_or(json::object{})) {  // validated by LoadClient::Create
    if (!body.contains(kv.key())) body[kv.key()] = kv.value();
  }
  return json::serialize(body);
}

namespace {

struct ParsedUrl {
  std::string host, port, prefix;
};

Result<ParsedUrl> ParseUrl(const std::string& url) {
  constexpr std::string_view kScheme = "http://";
  if (url.rfind(kScheme, 0) != 0) return Status::InvalidArgument("--url: only http:// URLs are supported: " + url);
  std::string rest = url.substr(kScheme.size());
  ParsedUrl u;
  const size_t slash = rest.find('/');
  if (slash != std::string::npos) {
    u.prefix = rest.substr(slash);
    rest.resize(slash);
  }
  while (!u.prefix.empty() && u.prefix.back() == '/') u.prefix.pop_back();
  if (u.prefix.size() >= 3 && u.prefix.compare(u.prefix.size() - 3, 3, "/v1") == 0) u.prefix.resize(u.prefix.size() - 3);
  const size_t colon = rest.rfind(':');
  if (colon != std::string::npos && rest.find(']', colon) == std::string::npos) {
    u.host = rest.substr(0, colon);
    u.port = rest.substr(colon + 1);
  } else {
    u.host = rest;
    u.port = "80";
  }
  if (u.host.size() > 2 && u.host.front() == '[') u.host = u.host.substr(1, u.host.size() - 2);
  if (u.host.empty()) return Status::InvalidArgument("--url: no host in " + url);
  return u;
}

struct Connection {
  explicit Connection(asio::io_context& ioc) : stream(ioc) {}
  beast::tcp_stream stream;
  beast::flat_buffer buffer;
};

}  // namespace

struct LoadClient::Impl {
  ClientOptions options;
  ParsedUrl url;
  asio::io_context ioc;
  tcp::resolver::results_type endpoints;
  std::deque<std::unique_ptr<Connection>> idle;

  // Per run.
  std::span<const RequestSpec> specs;
  std::vector<std::string> wire;  // serialized HTTP requests, one per spec
  std::vector<RequestRecord> records;
  std::vector<bool> sent;
  Clock::time_point run_start;
  size_t finished = 0, total_to_send = 0;
  int in_flight = 0;
  int sources = 0;          // closed-loop workers or the open-loop dispatcher still sending
  bool phase_over = false;  // no source left and nothing in flight
  bool show_progress = false;
  std::optional<asio::steady_timer> slot_freed;  // open loop with a cap: wakes the dispatcher
  std::optional<asio::steady_timer> progress_timer;

  void MaybeEndPhase() {
    if (sources == 0 && in_flight == 0) {
      phase_over = true;
      if (progress_timer) progress_timer->cancel();
    }
  }  // open loop with a cap: wakes the dispatcher

  double Ms(Clock::time_point t) const { return std::chrono::duration<double, std::milli>(t - run_start).count(); }

  std::string Wire(const RequestSpec& spec) const {
    const std::string body = RequestBody(options, spec);
    std::string target = url.prefix + (options.endpoint == Endpoint::kChat ? "/v1/chat/completions" : "/v1/completions");
    std::string w = "POST " + target + " HTTP/1.1\r\nHost: " + url.host + ":" + url.port +
                    "\r\nUser-Agent: dyn-bench\r\nContent-Type: application/json\r\nAccept: " +
                    (options.stream ? "text/event-stream" : "application/json") + "\r\n";
    if (!options.api_key.empty()) w += "Authorization: Bearer " + options.api_key + "\r\n";
    w += "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body;
    return w;
  }

  static void Fail(RequestRecord* r, std::string kind, std::string message) {
    if (!r->error_kind.empty()) return;
    r->error_kind = std::move(kind);
    r->error = std::move(message);
  }

  // One attempt on one connection. Returns false when a reused connection turned out to be closed
  // by the server before any response byte (the caller retries once on a fresh connection).
  asio::awaitable<bool> Attempt(std::unique_ptr<Connection>& conn, bool reused, size_t i, Clock::time_point deadline) {
    RequestRecord& r = records[i];
    conn->stream.expires_at(deadline);
    const Clock::time_point start = Clock::now();
    r.start_ms = Ms(start);
    auto [wec, wn] = co_await asio::async_write(conn->stream, asio::buffer(wire[i]), kNoThrow);
    if (wec) {
      if (reused && wec != beast::error::timeout) co_return false;
      Fail(&r, wec == beast::error::timeout ? "timeout" : "write", wec.message());
      co_return true;
    }
    http::response_parser<http::buffer_body> parser;
    parser.body_limit(boost::none);
    auto [hec, hn] = co_await http::async_read_header(conn->stream, conn->buffer, parser, kNoThrow);
    if (hec) {
      if (reused && hn == 0 && (hec == http::error::end_of_stream || hec == asio::error::connection_reset ||
                                hec == asio::error::eof))
        co_return false;
      Fail(&r, hec == beast::error::timeout ? "timeout" : "read", hec.message());
      co_return true;
    }
    r.http_status = static_cast<int>(parser.get().result_int());
    const bool streaming = options.stream && r.http_status == 200;
    SseParser sse;
    std::vector<std::string> events;
    std::string body;
    bool saw_done = false;
    char buf[16384];
    while (!parser.is_done()) {
      parser.get().body().data = buf;
      parser.get().body().size = sizeof buf;
      auto [ec, n] = co_await http::async_read_some(conn->stream, conn->buffer, parser, kNoThrow);
      const Clock::time_point now = Clock::now();
      if (ec == http::error::need_buffer) ec = {};
      const size_t got = sizeof buf - parser.get().body().size;
      if (!streaming) {
        body.append(buf, got);
      } else if (got > 0) {
        events.clear();
        sse.Feed(std::string_view(buf, got), &events);
        for (const std::string& e : events) {
          const OpenAiChunk c = ParseOpenAiChunk(e);
          if (c.done) saw_done = true;
          if (c.malformed) Fail(&r, "malformed", "not a JSON chunk: " + e.substr(0, 200));
          if (c.error) Fail(&r, "stream_error", *c.error);
          if (c.text_choices > 0) {
            const double t = std::chrono::duration<double, std::milli>(now - start).count();
            if (r.ttft_ms < 0) r.ttft_ms = t;
            r.chunk_ms.push_back(t);
          }
          if (c.completion_tokens) {
            r.output_tokens = *c.completion_tokens;
            r.usage_reported = true;
          }
          if (c.prompt_tokens) r.input_tokens = *c.prompt_tokens;
          if (c.cached_tokens) r.cached_tokens = *c.cached_tokens;
        }
      }
      if (ec) {
        Fail(&r, ec == beast::error::timeout ? "timeout" : "read", ec.message());
        co_return true;
      }
    }
    r.e2e_ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
    if (r.http_status != 200) {
      const OpenAiChunk c = ParseOpenAiResponse(body);
      Fail(&r, r.http_status >= 500 ? "http_5xx" : "http_4xx",
           std::to_string(r.http_status) + ": " + (c.error ? *c.error : body.substr(0, 200)));
    } else if (streaming) {
      if (!saw_done) Fail(&r, "incomplete", "the stream ended without data: [DONE]");
      if (!r.usage_reported) r.output_tokens = static_cast<int>(r.chunk_ms.size());
    } else {
      const OpenAiChunk c = ParseOpenAiResponse(body);
      if (c.malformed) Fail(&r, "malformed", "not a JSON response: " + body.substr(0, 200));
      if (c.error) Fail(&r, "stream_error", *c.error);
      r.ttft_ms = r.e2e_ms;
      r.chunk_ms.push_back(r.e2e_ms);
      r.usage_reported = c.completion_tokens.has_value();
      r.output_tokens = c.completion_tokens.value_or(0);
      if (c.prompt_tokens) r.input_tokens = *c.prompt_tokens;
      if (c.cached_tokens) r.cached_tokens = *c.cached_tokens;
    }
    if (parser.keep_alive() && r.ok()) {
      idle.push_back(std::move(conn));
    }
    co_return true;
  }

  asio::awaitable<void> DoRequest(size_t i) {
    RequestRecord& r = records[i];
    const Clock::time_point deadline =
        Clock::now() + std::chrono::microseconds(static_cast<int64_t>(options.timeout_s * 1e6));
    for (int attempt = 0; attempt < 2; ++attempt) {
      std::unique_ptr<Connection> conn;
      bool reused = false;
      if (attempt == 0 && !idle.empty()) {
        conn = std::move(idle.front());
        idle.pop_front();
        reused = true;
      } else {
        conn = std::make_unique<Connection>(ioc);
        conn->stream.expires_at(deadline);
        r.start_ms = Ms(Clock::now());
        auto [ec, ep] = co_await conn->stream.async_connect(endpoints, kNoThrow);
        if (ec) {
          Fail(&r, ec == beast::error::timeout ? "timeout" : "connect", ec.message());
          break;
        }
        conn->stream.socket().set_option(tcp::no_delay(true));
      }
      if (co_await Attempt(conn, reused, i, deadline)) break;
    }
    ++finished;
    --in_flight;
    if (slot_freed) slot_freed->cancel_one();
    MaybeEndPhase();
  }

  asio::awaitable<void> ClosedLoopWorker(size_t* next, size_t end, Clock::time_point stop_at) {
    while (*next < end && Clock::now() < stop_at) {
      const size_t i = (*next)++;
      sent[i] = true;
      ++in_flight;
      co_await DoRequest(i);
    }
    --sources;
    MaybeEndPhase();
  }

  asio::awaitable<void> OpenLoopDispatcher(size_t begin, size_t end, int cap, Clock::time_point stop_at) {
    asio::steady_timer timer(ioc);
    const Clock::time_point phase_start = Clock::now();
    for (size_t i = begin; i < end; ++i) {
      const auto at = phase_start + std::chrono::microseconds(static_cast<int64_t>(specs[i].arrival_ms * 1000));
      if (at >= stop_at) break;
      timer.expires_at(at);
      co_await timer.async_wait(kNoThrow);
      while (cap > 0 && in_flight >= cap) {
        slot_freed->expires_at(Clock::time_point::max());
        co_await slot_freed->async_wait(kNoThrow);
      }
      sent[i] = true;
      ++in_flight;
      asio::co_spawn(ioc, DoRequest(i), asio::detached);
    }
    --sources;
    MaybeEndPhase();
  }

  void PrintProgress() {
      const double frac = total_to_send ? static_cast<double>(finished) / static_cast<double>(total_to_send) : 1.0;
      const int width = 40, filled = static_cast<int>(frac * width);
      size_t errors = 0;
      for (size_t k = 0; k < records.size(); ++k)
        if (sent[k] && !records[k].error_kind.empty()) ++errors;
      std::fprintf(stderr, "\r[%s%s] %zu/%zu  in flight %d  errors %zu  %.1fs ", std::string(filled, '#').c_str(),
                   std::string(width - filled, '.').c_str(), finished, total_to_send, in_flight, errors,
                   std::chrono::duration<double>(Clock::now() - run_start).count());
  }

  asio::awaitable<void> Progress() {
    while (!phase_over) {
      PrintProgress();
      progress_timer->expires_after(std::chrono::milliseconds(200));
      co_await progress_timer->async_wait(kNoThrow);
    }
  }

  // Runs the phase [begin, end) to completion.
  void Phase(size_t begin, size_t end, const RunOptions& run, bool open_loop, Clock::time_point stop_at) {
    if (begin == end) return;
    size_t next = begin;
    phase_over = false;
    if (open_loop) {
      slot_freed.emplace(ioc);
      sources = 1;
      asio::co_spawn(ioc, OpenLoopDispatcher(begin, end, run.concurrency, stop_at), asio::detached);
    } else {
      const size_t workers = std::min<size_t>(std::max(1, run.concurrency), end - begin);
      sources = static_cast<int>(workers);
      for (size_t w = 0; w < workers; ++w) asio::co_spawn(ioc, ClosedLoopWorker(&next, end, stop_at), asio::detached);
    }
    if (show_progress) {
      progress_timer.emplace(ioc);
      asio::co_spawn(ioc, Progress(), asio::detached);
    }
    ioc.restart();
    ioc.run();
    slot_freed.reset();
    progress_timer.reset();
  }
};

LoadClient::LoadClient(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
LoadClient::~LoadClient() = default;

Result<std::unique_ptr<LoadClient>> LoadClient::Create(const ClientOptions& options) {
  if (!ExtraFields(options.extra_body)) {
    return Status::InvalidArgument("--extra-body must be a JSON object, e.g. '{\"temperature\": 0.8, \"top_p\": 0.9}': " + options.extra_body);
  }
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  DYN_ASSIGN_OR_RETURN(impl->url, ParseUrl(options.url));
  boost::system::error_code ec;
  tcp::resolver resolver(impl->ioc);
  impl->endpoints = resolver.resolve(impl->url.host, impl->url.port, ec);
  if (ec) return Status::Unavailable("cannot resolve " + impl->url.host + ":" + impl->url.port + ": " + ec.message());
  return std::unique_ptr<LoadClient>(new LoadClient(std::move(impl)));
}

Result<std::vector<RequestRecord>> LoadClient::Run(std::span<const RequestSpec> specs, const RunOptions& run) {
  Impl& m = *impl_;
  if (run.warmup > specs.size()) return Status::InvalidArgument("more warm-up requests than requests");
  if (!run.open_loop && run.concurrency < 1) return Status::InvalidArgument("concurrency must be >= 1");
  m.specs = specs;
  m.wire.clear();
  m.wire.reserve(specs.size());
  for (const RequestSpec& s : specs) m.wire.push_back(m.Wire(s));
  m.records.assign(specs.size(), RequestRecord{});
  m.sent.assign(specs.size(), false);
  for (size_t i = 0; i < specs.size(); ++i) {
    m.records[i].index = i;
    m.records[i].warmup = i < run.warmup;
    m.records[i].max_tokens = specs[i].max_tokens;
    m.records[i].input_tokens = specs[i].input_tokens;
  }
  m.finished = 0;
  m.in_flight = 0;
  m.total_to_send = specs.size();
  m.run_start = Clock::now();

  m.show_progress = run.progress && isatty(STDERR_FILENO);
  RunOptions warm = run;
  warm.concurrency = std::max(1, run.concurrency);
  m.Phase(0, run.warmup, warm, /*open_loop=*/false, Clock::time_point::max());
  const Clock::time_point stop_at =
      run.duration_s > 0 ? Clock::now() + std::chrono::microseconds(static_cast<int64_t>(run.duration_s * 1e6))
                         : Clock::time_point::max();
  m.Phase(run.warmup, specs.size(), run, run.open_loop, stop_at);
  if (m.show_progress) {
    m.PrintProgress();
    std::fprintf(stderr, "\n");
  }
  std::vector<RequestRecord> out;
  out.reserve(specs.size());
  for (size_t i = 0; i < specs.size(); ++i)
    if (m.sent[i]) out.push_back(std::move(m.records[i]));
  return out;
}

}  // namespace dyn::loadgen
