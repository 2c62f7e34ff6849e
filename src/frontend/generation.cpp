#include "frontend/generation.h"

#include <ctime>
#include <random>

#include <boost/asio/post.hpp>
#include <boost/json/serialize.hpp>

#include "frontend/http_format.h"

namespace dyn {
namespace json = boost::json;
using Clock = std::chrono::steady_clock;

namespace {

std::string RandomHex(size_t chars) {
  thread_local std::mt19937_64 rng(std::random_device{}() ^ static_cast<uint64_t>(Clock::now().time_since_epoch().count()));
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  while (out.size() < chars) {
    uint64_t r = rng();
    for (int i = 0; i < 16 && out.size() < chars; ++i, r >>= 4) out += kHex[r & 15];
  }
  return out;
}

const char* ReasonName(FinishReason r) {
  switch (r) {
    case FinishReason::kStop: return "stop";
    case FinishReason::kLength: return "length";
    case FinishReason::kCancelled: return "abort";
    case FinishReason::kError: return "error";
  }
  return "error";
}

json::array BytesOf(std::string_view s) {
  json::array out;
  for (unsigned char c : s) out.push_back(static_cast<int64_t>(c));
  return out;
}

}  // namespace

struct GenerationCall::Choice {
  Choice(const Tokenizer& tok, bool skip_special, std::span<const uint32_t> prompt, std::vector<std::string> stops,
         bool include_stop)
      : decoder(tok, skip_special, prompt), stop(std::move(stops), include_stop) {}
  size_t index = 0;
  size_t prompt_index = 0;
  std::shared_ptr<RequestContext> context;
  IncrementalDecoder decoder;
  StopMatcher stop;
  std::string text;            // released text (kept only for non-streaming responses)
  size_t decoded_bytes = 0;    // text decoded so far, for completions' text_offset
  std::vector<TokenLogprob> logprobs;
  std::vector<size_t> text_offsets;
  uint32_t prompt_tokens = 0;
  uint32_t cached_tokens = 0;
  uint64_t tokens = 0;
  bool finished = false;
  std::string finish_reason;
  bool saw_token = false;
  Clock::time_point last_token;
  uint64_t first_worker = 0;  // the worker of its first delta (prefill)
  uint64_t last_worker = 0;   // of its latest delta (decode; differs after a migration)
  bool nvext_sent = false;
};

GenerationCall::GenerationCall(GenerationRequest request, std::string request_id, bool keep_alive,
                               boost::asio::any_io_executor strand, std::shared_ptr<PostGate> gate,
                               FrontendMetrics& metrics, Hooks hooks, Clock::time_point received)
    : req_(std::move(request)),
      request_id_(std::move(request_id)),
      created_(static_cast<int64_t>(std::time(nullptr))),
      keep_alive_(keep_alive),
      strand_(std::move(strand)),
      gate_(std::move(gate)),
      metrics_(metrics),
      hooks_(std::move(hooks)),
      received_(received) {
  response_id_ = (req_.kind == ApiKind::kChat ? "chatcmpl-" : "cmpl-") + RandomHex(24);
}

GenerationCall::~GenerationCall() {
  for (auto& c : choices_) {
    if (c->context && !c->finished) c->context->Cancel();
  }
}

void GenerationCall::Start() {
  const ServedModel& model = *req_.model;
  const size_t n = static_cast<size_t>(req_.n);
  std::vector<PreprocessedRequest> engine_requests;
  for (size_t p = 0; p < req_.prompts.size(); ++p) {
    for (size_t j = 0; j < n; ++j) {
      auto c = std::make_unique<Choice>(*model.tokenizer, req_.skip_special_tokens, req_.prompts[p], req_.stop,
                                        req_.include_stop_str_in_output);
      c->index = choices_.size();
      c->prompt_index = p;
      PreprocessedRequest er;
      er.request_id = response_id_ + "-" + std::to_string(c->index);
      er.token_ids = req_.prompts[p];
      er.sampling = req_.sampling;
      if (er.sampling.seed) *er.sampling.seed += j;
      er.stop = req_.stop_conditions;
      er.stop.max_tokens = req_.max_tokens[p];
      er.eos_token_ids = model.eos_token_ids;
      c->context = std::make_shared<RequestContext>(er.request_id);
      if (req_.echo) c->decoded_bytes = req_.echo_texts[p].size();
      choices_.push_back(std::move(c));
      engine_requests.push_back(std::move(er));
    }
  }
  std::weak_ptr<GenerationCall> weak = weak_from_this();
  for (size_t i = 0; i < engine_requests.size(); ++i) {
    auto sink = [gate = gate_, weak, i](EngineOutput&& out) {
      std::lock_guard lock(gate->mu);
      if (!gate->open) return;
      auto self = weak.lock();
      if (!self) return;
      auto executor = self->strand_;
      boost::asio::post(executor, [self = std::move(self), i, out = std::move(out)]() mutable {
        self->OnOutput(i, std::move(out));
      });
    };
    model.engine->Generate(std::move(engine_requests[i]), choices_[i]->context, std::move(sink));
  }
}

void GenerationCall::SendStreamHead() {
  head_sent_ = true;
  hooks_.write(FormatSseHead(request_id_, keep_alive_, WorkerHeader()));
  for (auto& c : choices_) {
    json::object choice;
    choice["index"] = c->index;
    if (req_.kind == ApiKind::kChat) {
      choice["delta"] = json::object{{"role", "assistant"}, {"content", ""}};
    } else if (req_.echo) {
      choice["text"] = req_.echo_texts[c->prompt_index];
    } else {
      continue;
    }
    choice["logprobs"] = nullptr;
    choice["finish_reason"] = nullptr;
    json::object chunk = BaseObject(req_.kind == ApiKind::kChat ? "chat.completion.chunk" : "text_completion");
    chunk["choices"] = json::array{std::move(choice)};
    SendChunk(chunk);
  }
}

std::string GenerationCall::WorkerHeader() const {
  for (const auto& c : choices_)
    if (c->first_worker != 0) return "x-dyn-worker-id: " + std::to_string(c->first_worker) + "\r\n";
  return "";
}

json::value GenerationCall::Nvext(const Choice& c) const {
  if (c.first_worker == 0) return nullptr;
  // Dynamo's shape: the worker that computed the prompt and the one that produced the tokens
  // (equal unless the stream migrated; disaggregated serving will set them apart).
  return json::object{{"worker_id", json::object{{"prefill_worker_id", c.first_worker},
                                                 {"decode_worker_id", c.last_worker}}}};
}

void GenerationCall::Cancel() {
  completed_ = true;
  hooks_ = {};
  for (auto& c : choices_) c->context->Cancel();
}

void GenerationCall::OnOutput(size_t index, EngineOutput&& out) {
  if (completed_) return;
  Choice& c = *choices_[index];
  if (c.finished) return;
  if (out.worker_id != 0) {
    if (c.first_worker == 0) c.first_worker = out.worker_id;
    c.last_worker = out.worker_id;
  }
  if (out.finish_reason == FinishReason::kError) {
    FailWithEngineError(out.error.empty() ? "engine error" : out.error);
    return;
  }
  if (req_.stream && !head_sent_) SendStreamHead();
  const size_t logprobs_before = c.logprobs.size();
  std::string released = Consume(c, out);
  if (req_.stream && (!released.empty() || c.finished || c.logprobs.size() > logprobs_before)) {
    json::object choice;
    choice["index"] = c.index;
    if (req_.kind == ApiKind::kChat) {
      json::object delta;
      if (!released.empty() || !c.finished) delta["content"] = released;
      choice["delta"] = std::move(delta);
    } else {
      choice["text"] = released;
    }
    choice["logprobs"] = req_.logprobs ? LogprobsJson(c, logprobs_before) : json::value(nullptr);
    if (c.finished) choice["finish_reason"] = c.finish_reason; else choice["finish_reason"] = nullptr;
    json::object chunk = BaseObject(req_.kind == ApiKind::kChat ? "chat.completion.chunk" : "text_completion");
    chunk["choices"] = json::array{std::move(choice)};
    if (!c.nvext_sent && c.first_worker != 0) {
      c.nvext_sent = true;
      chunk["nvext"] = Nvext(c);
    }
    SendChunk(chunk);
  }
  if (c.finished) {
    ++finished_;
    metrics_.AddTokens(c.prompt_tokens, c.cached_tokens, c.tokens);
    MaybeComplete();
  }
}

std::string GenerationCall::Consume(Choice& c, EngineOutput& out) {
  if (out.prompt_tokens) c.prompt_tokens = out.prompt_tokens;
  if (out.cached_tokens) c.cached_tokens = out.cached_tokens;
  if (!out.token_ids.empty()) {
    const auto now = Clock::now();
    if (!c.saw_token) {
      metrics_.ObserveTimeToFirstToken(std::chrono::duration<double>(now - received_).count());
      c.saw_token = true;
    } else {
      const double gap = std::chrono::duration<double>(now - c.last_token).count();
      metrics_.ObserveInterTokenLatency(gap / static_cast<double>(out.token_ids.size()), out.token_ids.size());
    }
    c.last_token = now;
  }
  std::string released;
  for (size_t k = 0; k < out.token_ids.size(); ++k) {
    ++c.tokens;
    std::string piece = c.decoder.Step(out.token_ids[k]);
    if (req_.logprobs) {
      c.logprobs.push_back(k < out.logprobs.size() ? out.logprobs[k] : TokenLogprob{out.token_ids[k], 0.0f, {}});
      c.text_offsets.push_back(c.decoded_bytes);
    }
    c.decoded_bytes += piece.size();
    StopMatcher::Step step = c.stop.Push(piece);
    released += step.text;
    if (step.stopped) {
      c.finished = true;
      c.finish_reason = "stop";
      c.context->Cancel();  // frees the engine's resources now rather than at max_tokens
      break;
    }
  }
  if (!c.finished && out.finish_reason) {
    StopMatcher::Step step = c.stop.Push(c.decoder.Finish());
    released += step.text;
    if (!step.stopped) released += c.stop.Flush();
    c.finished = true;
    c.finish_reason = step.stopped ? "stop" : ReasonName(*out.finish_reason);
  }
  if (!req_.stream) c.text += released;
  return released;
}

void GenerationCall::FailWithEngineError(const std::string& error) {
  for (auto& c : choices_) c->context->Cancel();
  int status = 500;
  std::string type = "server_error";
  if (error.rfind("InvalidArgument", 0) == 0) {
    status = 400;
    type = "invalid_request_error";
  } else if (error.rfind("ResourceExhausted", 0) == 0 || error.rfind("Unavailable", 0) == 0) {
    status = 503;
    type = "service_unavailable";
  }
  ApiError e{status, error, type, "", "engine_error"};
  metrics_.ErrorReturned(e.code);
  completed_ = true;
  auto hooks = std::move(hooks_);
  hooks_ = {};
  if (req_.stream && head_sent_) {
    // Tokens already went out with status 200: the error can only be an SSE event.
    std::string out;
    AppendChunk(&out, "data: " + e.ToJson() + "\n\ndata: [DONE]\n\n");
    out.append(kLastChunk);
    hooks.write(std::move(out));
    hooks.done(200);
  } else {
    hooks.write(FormatHttpResponse(status, "application/json", e.ToJson(), request_id_, keep_alive_, WorkerHeader()));
    hooks.done(status);
  }
}

void GenerationCall::MaybeComplete() {
  if (completed_ || finished_ < choices_.size()) return;
  completed_ = true;
  auto hooks = std::move(hooks_);
  hooks_ = {};
  if (req_.stream) {
    std::string out;  // the head went out with the first delta (OnOutput)
    if (req_.include_usage) {
      json::object chunk = BaseObject(req_.kind == ApiKind::kChat ? "chat.completion.chunk" : "text_completion");
      chunk["choices"] = json::array();
      chunk["usage"] = Usage();
      AppendChunk(&out, "data: " + json::serialize(chunk) + "\n\n");
    }
    AppendChunk(&out, "data: [DONE]\n\n");
    out.append(kLastChunk);
    hooks.write(std::move(out));
  } else {
    hooks.write(FormatHttpResponse(200, "application/json", FinalBody(), request_id_, keep_alive_, WorkerHeader()));
  }
  hooks.done(200);
}

json::object GenerationCall::BaseObject(const char* object) const {
  json::object o;
  o["id"] = response_id_;
  o["object"] = object;
  o["created"] = created_;
  o["model"] = req_.model_name;
  return o;
}

json::object GenerationCall::Usage() const {
  uint64_t prompt = 0, completion = 0, cached = 0;
  for (const auto& ids : req_.prompts) prompt += ids.size();
  for (const auto& c : choices_) {
    completion += c->tokens;
    if (c->index % static_cast<size_t>(req_.n) == 0) cached += c->cached_tokens;
  }
  json::object usage;
  usage["prompt_tokens"] = prompt;
  usage["completion_tokens"] = completion;
  usage["total_tokens"] = prompt + completion;
  usage["prompt_tokens_details"] = json::object{{"cached_tokens", cached}};
  return usage;
}

json::value GenerationCall::LogprobsJson(const Choice& c, size_t from) const {
  const Tokenizer& tok = *req_.model->tokenizer;
  const bool as_ids = req_.return_tokens_as_token_ids;
  auto token_text = [&tok, as_ids](uint32_t id) {
    if (as_ids) return "token_id:" + std::to_string(id);
    const uint32_t one[1] = {id};
    return tok.Decode(one, false);
  };
  if (req_.kind == ApiKind::kChat) {
    json::array content;
    for (size_t i = from; i < c.logprobs.size(); ++i) {
      const TokenLogprob& lp = c.logprobs[i];
      std::string text = token_text(lp.token);
      json::array top;
      for (const auto& t : lp.top) {
        std::string alt = token_text(t.token);
        top.push_back(json::object{{"token", alt}, {"logprob", t.logprob}, {"bytes", BytesOf(alt)}});
      }
      content.push_back(json::object{{"token", text}, {"logprob", lp.logprob}, {"bytes", BytesOf(text)}, {"top_logprobs", std::move(top)}});
    }
    return json::object{{"content", std::move(content)}};
  }
  json::array tokens, token_logprobs, top_logprobs, text_offset;
  for (size_t i = from; i < c.logprobs.size(); ++i) {
    const TokenLogprob& lp = c.logprobs[i];
    tokens.push_back(json::string(token_text(lp.token)));
    token_logprobs.push_back(lp.logprob);
    json::object top;
    for (const auto& t : lp.top) top[token_text(t.token)] = t.logprob;
    top_logprobs.push_back(std::move(top));
    text_offset.push_back(c.text_offsets[i]);
  }
  return json::object{{"tokens", std::move(tokens)}, {"token_logprobs", std::move(token_logprobs)},
                      {"top_logprobs", std::move(top_logprobs)}, {"text_offset", std::move(text_offset)}};
}

void GenerationCall::SendChunk(const json::object& chunk) {
  std::string out;
  AppendChunk(&out, "data: " + json::serialize(chunk) + "\n\n");
  hooks_.write(std::move(out));
}

std::string GenerationCall::FinalBody() const {
  const bool chat = req_.kind == ApiKind::kChat;
  json::object body = BaseObject(chat ? "chat.completion" : "text_completion");
  json::array choices;
  for (const auto& c : choices_) {
    json::object choice;
    choice["index"] = c->index;
    if (chat) {
      choice["message"] = json::object{{"role", "assistant"}, {"content", c->text}};
    } else {
      choice["text"] = req_.echo ? req_.echo_texts[c->prompt_index] + c->text : c->text;
    }
    choice["logprobs"] = req_.logprobs ? LogprobsJson(*c, 0) : json::value(nullptr);
    choice["finish_reason"] = c->finish_reason;
    choices.push_back(std::move(choice));
  }
  body["choices"] = std::move(choices);
  body["usage"] = Usage();
  if (!choices_.empty() && choices_[0]->first_worker != 0) body["nvext"] = Nvext(*choices_[0]);
  return json::serialize(body);
}

}  // namespace dyn
