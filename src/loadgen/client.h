// The load-generating HTTP/1.1 client: one io_context thread drives every stream (C++20
// coroutines on Boost.Asio/Beast), over a keep-alive connection pool that persists across runs.
//
// Each request is serialized before the run starts, so sending costs one write. Streaming
// responses are read with async_read_some and the steady-clock time is taken as soon as a read
// completes, before the bytes are parsed (SSE, then the chunk's JSON): a timestamp is when the
// bytes arrived, not when the client got round to them. Errors are recorded per request by kind,
// never thrown.
#pragma once

#include <memory>
#include <span>
#include <string>
#include <vector>

#include "base/status.h"
#include "loadgen/stats.h"
#include "loadgen/workload.h"

namespace dyn::loadgen {

enum class Endpoint { kCompletions, kChat };

struct ClientOptions {
  std::string url = "http://127.0.0.1:8000";  // http://host:port; a path prefix is kept (".../v1" is not needed)
  std::string model;
  Endpoint endpoint = Endpoint::kCompletions;
  bool stream = true;
  bool ignore_eos = true;  // so that output lengths are what the workload says
  double timeout_s = 600;  // per request, connect to last byte
  std::string api_key;     // sent as "Authorization: Bearer" when set
  // A JSON object whose fields are added to every request body (sampling parameters such as
  // temperature or top_p); the client's own fields (model, prompt, max_tokens, stream, ...) win.
  std::string extra_body;
};

struct RunOptions {
  // Closed loop (open_loop false): `concurrency` requests in flight, each slot sending the next
  // spec when its previous request ends. Open loop: each spec is sent at its arrival_ms;
  // concurrency > 0 caps the requests in flight (later ones wait), 0 means no cap.
  int concurrency = 1;
  bool open_loop = false;
  // The first `warmup` specs are sent first (closed loop at `concurrency`, or max(1, concurrency)
  // when open loop) and recorded with warmup = true; the measured phase starts when they end.
  size_t warmup = 0;
  double duration_s = 0;  // > 0: stop sending new measured requests after this long
  bool progress = false;  // a progress bar on stderr
};

// The JSON body sent for `spec`: completions send prompt_ids as a token-id array when there are
// any (exact prefixes), else prompt_text; chat sends prompt_text as one user message. Always
// max_tokens, ignore_eos, and when streaming stream_options.include_usage.
std::string RequestBody(const ClientOptions& options, const RequestSpec& spec);

class LoadClient {
 public:
  static Result<std::unique_ptr<LoadClient>> Create(const ClientOptions& options);
  ~LoadClient();

  // Sends the specs and returns one record per spec sent, in spec order (requests skipped by
  // duration_s are left out). Errors are in the records; the Result fails only on bad input.
  Result<std::vector<RequestRecord>> Run(std::span<const RequestSpec> specs, const RunOptions& run);

  struct Impl;

 private:
  explicit LoadClient(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace dyn::loadgen
