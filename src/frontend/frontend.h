// The OpenAI-compatible HTTP frontend.
//
// Serves POST /v1/chat/completions, POST /v1/completions, GET /v1/models, POST /tokenize,
// POST /detokenize, GET /health, GET /live and GET /metrics (Prometheus text) for the models in
// a ModelRegistry. For each generation request it validates the body, applies the chat template,
// tokenizes, calls the model's Engine, detokenizes incrementally, applies stop strings and answers
// with one JSON body or a Server-Sent Events stream. A client that disconnects cancels its engine
// requests. docs/openai_api.md lists the accepted fields and the error cases.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "base/status.h"
#include "engine/engine.h"

namespace dyn {

class Tokenizer;
class ChatTemplate;

struct ServedModel {
  std::string name;  // what clients pass as "model"
  std::shared_ptr<const Tokenizer> tokenizer;
  std::shared_ptr<const ChatTemplate> chat_template;  // null: chat requests get a 400
  EnginePtr engine;
  uint32_t context_length = 0;  // prompt + generated tokens
  std::vector<uint32_t> eos_token_ids;
  int64_t created_unix = 0;
};

// The models being served, by name. Thread-safe; models may come and go while requests run
// (a request keeps the model it started with alive).
class ModelRegistry {
 public:
  // InvalidArgument when the name is empty, tokenizer or engine is null, or the name is taken.
  Status Add(ServedModel model);
  // Returns whether a model of that name was there.
  bool Remove(std::string_view name);
  std::shared_ptr<const ServedModel> Find(std::string_view name) const;
  // Sorted by name.
  std::vector<std::shared_ptr<const ServedModel>> List() const;

 private:
  mutable std::mutex mu_;
  std::unordered_map<std::string, std::shared_ptr<const ServedModel>> models_;
};

struct HttpFrontendOptions {
  std::string host = "0.0.0.0";
  int port = 8000;  // 0 = an ephemeral port (see HttpFrontend::port())
  int io_threads = 1;
  size_t max_body_bytes = 8u << 20;  // larger bodies get 413
};

class HttpFrontend {
 public:
  // Binds, listens and starts the io threads; returns once the port accepts connections.
  static Result<std::unique_ptr<HttpFrontend>> Start(const HttpFrontendOptions& options,
                                                     std::shared_ptr<ModelRegistry> registry);
  ~HttpFrontend();  // Stop()s

  // The bound port (the chosen one when options.port was 0).
  int port() const;
  // Closes the listener and all connections, cancels their engine requests and joins the io
  // threads. Idempotent. The engines are not shut down (they belong to the registry's owner).
  void Stop();

  class Impl;

 private:
  explicit HttpFrontend(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace dyn
