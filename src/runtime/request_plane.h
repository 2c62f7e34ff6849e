// Request plane: calls from a frontend (or router) to a worker's endpoint over TCP. One call is a
// request payload followed by a stream of response payloads and one end status; many calls share
// one connection (multiplexed by a call id), and each side may cancel a call. docs/request_plane.md
// gives the wire format.
//
// The in-process request plane of `dyn run` is the Engine interface itself: no class here.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "base/status.h"
#include "engine/engine.h"

namespace dyn {

// ---- server (in a worker) ----

// One incoming call, handed to an endpoint handler. Thread-safe.
class ServerCall {
 public:
  virtual ~ServerCall() = default;
  // Queues one response payload. Never blocks; returns false when the call is over (cancelled by
  // the client, connection gone) and the handler should stop producing.
  virtual bool Send(std::string payload) = 0;
  // Ends the call (exactly once; later Sends are dropped). OK, or the error the client sees.
  virtual void Finish(const Status& status) = 0;
  // Set when the client cancelled or disconnected; the same context is passed to engines.
  virtual const std::shared_ptr<RequestContext>& context() const = 0;
  // Bytes queued for this call and not yet written to the socket (for handlers that coalesce
  // their output while the client is slow, as the engine adapter does).
  virtual size_t pending_bytes() const = 0;
};

// Runs on a server thread; must not block (start the work and return).
using EndpointHandler = std::function<void(std::string payload, std::shared_ptr<ServerCall> call)>;

struct RequestServerOptions {
  std::string host = "0.0.0.0";
  int port = 0;                             // 0 = an ephemeral port
  int max_calls_per_connection = 4096;      // more get ResourceExhausted
  size_t max_frame_bytes = 64u << 20;       // larger frames close the connection
  size_t max_pending_bytes_per_call = 1u << 20;  // engine adapter coalesces deltas beyond this
  int io_threads = 1;
};

class RequestServer {
 public:
  static Result<std::unique_ptr<RequestServer>> Start(const RequestServerOptions& options);
  virtual ~RequestServer() = default;

  // Registers an endpoint before or while serving. Calls to unknown endpoints end with NotFound.
  virtual void AddEndpoint(const std::string& name, EndpointHandler handler) = 0;
  // Registers `engine` as an endpoint speaking the engine codec (engine_codec.h): each call's
  // payload is a PreprocessedRequest, each response an EngineOutput delta. Deltas that arrive
  // while the call has more than max_pending_bytes_per_call queued are merged into one, so a slow
  // client costs memory proportional to its tokens, not to the number of deltas.
  virtual void AddEngineEndpoint(const std::string& name, EnginePtr engine) = 0;

  virtual int port() const = 0;
  virtual int active_calls() const = 0;
  // Draining: new calls end at once with Unavailable("draining") (clients send them elsewhere);
  // calls already running continue. Returns when none are left or after timeout_ms.
  virtual void Drain(int timeout_ms) = 0;
  // Closes the listener and every connection; running calls' contexts are cancelled. Idempotent.
  virtual void Stop() = 0;
};

// ---- client (in a frontend) ----

struct RequestClientOptions {
  int connect_timeout_ms = 2000;
  int heartbeat_interval_ms = 500;  // pings on connections with calls in flight
  int dead_after_ms = 3000;         // no frame from the server for this long: connection is dead
  size_t max_frame_bytes = 64u << 20;
  int io_threads = 1;
};

// Callbacks of one call; run on a client io thread, in order, never concurrently.
struct CallCallbacks {
  std::function<void(std::string_view payload)> on_data;
  // Exactly once, last. OK: the server finished the call. Unavailable: the connection failed, was
  // declared dead, or the server was draining: the call may be retried elsewhere. Cancelled: the
  // caller cancelled. Other codes: the server's handler failed the call.
  std::function<void(const Status& status)> on_end;
};

class RequestClient {
 public:
  static Result<std::shared_ptr<RequestClient>> Create(const RequestClientOptions& options);
  virtual ~RequestClient() = default;

  // Starts a call to `endpoint` at `address` ("host:port"), reusing the connection to that address
  // or opening one. Never blocks on the network. Cancelling `context` sends a cancel frame and
  // ends the call with Cancelled.
  virtual void Call(const std::string& address, const std::string& endpoint, std::string payload,
                    std::shared_ptr<RequestContext> context, CallCallbacks callbacks) = 0;
  // Ends every call to `address` with Unavailable and closes its connection (the frontend calls it
  // when discovery says the instance is gone).
  virtual void Disconnect(const std::string& address) = 0;
  virtual void Stop() = 0;
};

}  // namespace dyn
