// One chat or completion request in flight: its engine streams (prompts x n), incremental
// detokenization, stop strings, and the JSON or SSE response. Lives on its connection's strand;
// engine deltas are posted there through a PostGate, never handled on the engine thread.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <boost/asio/any_io_executor.hpp>
#include <boost/json/array.hpp>
#include <boost/json/object.hpp>

#include "frontend/metrics.h"
#include "frontend/openai_request.h"
#include "frontend/stop_matcher.h"
#include "llm/tokenizer/tokenizer.h"

namespace dyn {

// Engine sinks post to io executors only while the gate is open; HttpFrontend::Stop closes it
// before the io_context goes away, so a late delta from an engine thread is dropped, not posted
// to a dead executor.
struct PostGate {
  std::mutex mu;
  bool open = true;
};

class GenerationCall : public std::enable_shared_from_this<GenerationCall> {
 public:
  struct Hooks {
    std::function<void(std::string)> write;  // bytes for the socket, in order
    std::function<void(int status)> done;    // the response is complete (all bytes given to write)
  };
  GenerationCall(GenerationRequest request, std::string request_id, bool keep_alive, boost::asio::any_io_executor strand,
                 std::shared_ptr<PostGate> gate, FrontendMetrics& metrics, Hooks hooks,
                 std::chrono::steady_clock::time_point received);
  ~GenerationCall();  // cancels engine requests still running

  // Submits the engine requests. Call on the strand, once, after the call is owned by a shared_ptr.
  void Start();
  // The client went away: cancels the engine requests; no more hooks are called.
  void Cancel();

 private:
  struct Choice;
  void OnOutput(size_t choice, EngineOutput&& out);
  // Consumes one delta; returns the text released for the client.
  std::string Consume(Choice& c, EngineOutput& out);
  void FinishChoice(Choice& c, std::string reason);
  void FailWithEngineError(const std::string& error);
  void MaybeComplete();
  boost::json::object BaseObject(const char* object) const;
  boost::json::object Usage() const;
  boost::json::value LogprobsJson(const Choice& c, size_t from) const;
  void SendChunk(const boost::json::object& chunk);
  // Streaming: the response head and the first (role / echo) chunks, sent when the first delta
  // arrives so that the head can name the worker and an early failure can still get its status.
  void SendStreamHead();
  std::string WorkerHeader() const;    // "x-dyn-worker-id: N\r\n" or ""
  boost::json::value Nvext(const Choice& c) const;  // {"worker_id": {...}} or null when not routed
  std::string FinalBody() const;

  GenerationRequest req_;
  std::string request_id_;
  std::string response_id_;
  int64_t created_;
  bool keep_alive_;
  boost::asio::any_io_executor strand_;
  std::shared_ptr<PostGate> gate_;
  FrontendMetrics& metrics_;
  Hooks hooks_;
  std::chrono::steady_clock::time_point received_;
  std::vector<std::unique_ptr<Choice>> choices_;
  size_t finished_ = 0;
  bool completed_ = false;
  bool head_sent_ = false;
};

}  // namespace dyn
