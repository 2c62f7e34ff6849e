#include "frontend/openai_request.h"

#include <algorithm>

#include <boost/json/array.hpp>
#include <boost/json/string.hpp>

#include "frontend/json_fields.h"
#include "llm/template/chat_template.h"
#include "llm/tokenizer/tokenizer.h"

namespace dyn {
namespace json = boost::json;

namespace {

// Chat content may be a list of parts; templates written for string content get the text parts
// joined with newlines (as vLLM does). Other part types need a multimodal model.
std::optional<ApiError> NormalizeMessages(const json::array& in, json::array* out) {
  if (in.empty()) return ApiError::BadRequest("messages: must not be empty", "messages");
  for (size_t i = 0; i < in.size(); ++i) {
    const std::string where = "messages[" + std::to_string(i) + "]";
    if (!in[i].is_object()) return ApiError::BadRequest(where + ": expected an object", "messages", "invalid_type");
    json::object msg = in[i].get_object();
    const json::value* role = msg.if_contains("role");
    if (!role) return ApiError::BadRequest(where + ": missing 'role'", "messages", "missing_required_parameter");
    if (!role->is_string()) return ApiError::BadRequest(where + ".role: expected a string", "messages", "invalid_type");
    json::value* content = msg.if_contains("content");
    if (content && content->is_array()) {
      std::string text;
      for (const auto& part : content->get_array()) {
        const json::object* p = part.if_object();
        const json::value* type = p ? p->if_contains("type") : nullptr;
        const json::value* t = p ? p->if_contains("text") : nullptr;
        if (!type || !type->is_string() || type->get_string() != "text" || !t || !t->is_string()) {
          return ApiError::BadRequest(where + ".content: only parts of type 'text' with a string 'text' are supported",
                                      "messages", "unsupported_content");
        }
        if (!text.empty()) text += "\n";
        text.append(t->get_string().data(), t->get_string().size());
      }
      *content = json::string(text);
    } else if (content && !content->is_string() && !content->is_null()) {
      return ApiError::BadRequest(where + ".content: expected a string, an array of parts or null", "messages",
                                  "invalid_type");
    }
    out->push_back(std::move(msg));
  }
  return std::nullopt;
}

std::optional<ApiError> CheckTokenIds(const json::array& arr, const Tokenizer& tok, std::vector<uint32_t>* ids,
                                      const char* param) {
  for (const auto& v : arr) {
    auto id = JsonToInt(v);
    if (!id) return ApiError::BadRequest(std::string(param) + ": token ids must be integers", param, "invalid_type");
    if (*id < 0 || *id >= static_cast<int64_t>(tok.vocab_size())) {
      return ApiError::BadRequest(std::string(param) + ": token id " + std::to_string(*id) + " is outside the vocabulary (size " +
                                      std::to_string(tok.vocab_size()) + ")",
                                  param);
    }
    ids->push_back(static_cast<uint32_t>(*id));
  }
  return std::nullopt;
}

// prompt: a string, a list of strings, a list of token ids or a list of token-id lists.
std::optional<ApiError> ParseCompletionPrompts(const json::value& prompt, const Tokenizer& tok, bool add_special,
                                               GenerationRequest* out) {
  auto add_text = [&](std::string_view s) {
    out->prompts.push_back(tok.Encode(s, add_special));
    out->echo_texts.emplace_back(s);
  };
  if (prompt.is_string()) {
    add_text(prompt.get_string());
  } else if (prompt.is_array() && !prompt.get_array().empty()) {
    const json::array& arr = prompt.get_array();
    if (arr[0].is_string()) {
      for (const auto& v : arr) {
        if (!v.is_string()) return ApiError::BadRequest("prompt: mixed list; expected all strings", "prompt", "invalid_type");
        add_text(v.get_string());
      }
    } else if (arr[0].is_array()) {
      for (const auto& v : arr) {
        if (!v.is_array()) return ApiError::BadRequest("prompt: mixed list; expected all token-id lists", "prompt", "invalid_type");
        if (v.get_array().empty()) return ApiError::BadRequest("prompt: empty token-id list", "prompt");
        std::vector<uint32_t> ids;
        if (auto e = CheckTokenIds(v.get_array(), tok, &ids, "prompt")) return e;
        out->prompts.push_back(std::move(ids));
        out->echo_texts.push_back("");
      }
    } else {
      std::vector<uint32_t> ids;
      if (auto e = CheckTokenIds(arr, tok, &ids, "prompt")) return e;
      out->prompts.push_back(std::move(ids));
      out->echo_texts.push_back("");
    }
  } else {
    return ApiError::BadRequest("prompt: expected a string, a list of strings, a list of token ids or a list of token-id lists",
                                "prompt", prompt.is_array() ? "invalid_value" : "invalid_type");
  }
  for (size_t i = 0; i < out->prompts.size(); ++i) {
    if (out->prompts[i].empty()) return ApiError::BadRequest("prompt: tokenizes to no tokens", "prompt");
    if (out->echo_texts[i].empty() && out->echo) out->echo_texts[i] = tok.Decode(out->prompts[i], true);
  }
  return std::nullopt;
}

std::optional<ApiError> ParseSampling(JsonFields& f, const Tokenizer& tok, GenerationRequest* out) {
  SamplingParams& s = out->sampling;
  s = SamplingParams{};
  double d;
  int64_t i;
  if (f.Number("temperature", &d)) { s.temperature = static_cast<float>(d); f.CheckRange("temperature", d, 0, 2); }
  if (f.Number("top_p", &d)) {
    s.top_p = static_cast<float>(d);
    if (d <= 0) f.Fail(ApiError::BadRequest("top_p: must be in (0, 1]", "top_p"));
    f.CheckRange("top_p", d, 0, 1);
  }
  if (f.Int("top_k", &i)) {
    if (i < -1) f.Fail(ApiError::BadRequest("top_k: must be -1 (off), 0 (off) or positive", "top_k"));
    s.top_k = i <= 0 ? 0 : static_cast<int>(std::min<int64_t>(i, 1 << 30));
  }
  if (f.Number("min_p", &d)) { s.min_p = static_cast<float>(d); f.CheckRange("min_p", d, 0, 1); }
  if (f.Number("repetition_penalty", &d)) {
    s.repetition_penalty = static_cast<float>(d);
    if (d <= 0) f.Fail(ApiError::BadRequest("repetition_penalty: must be > 0", "repetition_penalty"));
  }
  if (f.Number("frequency_penalty", &d)) { s.frequency_penalty = static_cast<float>(d); f.CheckRange("frequency_penalty", d, -2, 2); }
  if (f.Number("presence_penalty", &d)) { s.presence_penalty = static_cast<float>(d); f.CheckRange("presence_penalty", d, -2, 2); }
  if (f.Int("seed", &i)) s.seed = static_cast<uint64_t>(i);

  if (out->kind == ApiKind::kChat) {
    bool lp = false;
    f.Bool("logprobs", &lp);
    if (f.Int("top_logprobs", &i)) {
      f.CheckRange("top_logprobs", static_cast<double>(i), 0, 20);
      if (!lp && i > 0) f.Fail(ApiError::BadRequest("top_logprobs: requires logprobs to be true", "top_logprobs"));
      s.top_logprobs = static_cast<int>(std::clamp<int64_t>(i, 0, 20));
    }
    s.logprobs = lp;
  } else if (f.Int("logprobs", &i)) {
    f.CheckRange("logprobs", static_cast<double>(i), 0, 20);
    s.logprobs = true;
    s.top_logprobs = static_cast<int>(std::clamp<int64_t>(i, 0, 20));
  }
  out->logprobs = s.logprobs;

  StopConditions& sc = out->stop_conditions;
  if (f.Int("min_tokens", &i)) {
    if (i < 0) f.Fail(ApiError::BadRequest("min_tokens: must be >= 0", "min_tokens"));
    sc.min_tokens = static_cast<int>(std::clamp<int64_t>(i, 0, 1 << 30));
  }
  f.Bool("ignore_eos", &sc.ignore_eos);
  const json::array* ids = nullptr;
  if (f.Array("stop_token_ids", &ids)) {
    if (auto e = CheckTokenIds(*ids, tok, &sc.stop_token_ids, "stop_token_ids")) f.Fail(*e);
  }
  return f.error();
}

std::optional<ApiError> ParseStop(JsonFields& f, GenerationRequest* out) {
  const json::value* stop = f.Get("stop");
  if (!stop) return std::nullopt;
  if (stop->is_string()) {
    out->stop.emplace_back(stop->get_string());
  } else if (stop->is_array()) {
    for (const auto& v : stop->get_array()) {
      if (!v.is_string()) return ApiError::BadRequest("stop: expected a string or a list of strings", "stop", "invalid_type");
      out->stop.emplace_back(v.get_string());
    }
    if (out->stop.size() > 256) return ApiError::BadRequest("stop: at most 256 stop strings", "stop");
  } else {
    return ApiError::BadRequest("stop: expected a string or a list of strings", "stop", "invalid_type");
  }
  return std::nullopt;
}

}  // namespace

std::optional<ApiError> ResolveModel(const json::object& body, const ModelRegistry& registry, bool optional,
                                     std::shared_ptr<const ServedModel>* model, std::string* name) {
  JsonFields f(body);
  if (!f.String("model", name)) {
    if (f.error()) return f.error();
    if (optional) {
      auto all = registry.List();
      if (all.size() == 1) {
        *model = all[0];
        *name = all[0]->name;
        return std::nullopt;
      }
    }
    return ApiError::BadRequest("model: required", "model", "missing_required_parameter");
  }
  *model = registry.Find(*name);
  if (!*model) return ApiError::NotFound("The model '" + *name + "' does not exist", "model", "model_not_found");
  return std::nullopt;
}

std::optional<ApiError> RenderChatPrompt(const ServedModel& model, const json::object& body, std::vector<uint32_t>* ids) {
  JsonFields f(body);
  const json::array* messages = nullptr;
  if (!f.Array("messages", &messages)) {
    if (f.error()) return f.error();
    return ApiError::BadRequest("messages: required", "messages", "missing_required_parameter");
  }
  if (!model.chat_template) {
    return ApiError::BadRequest("The model '" + model.name + "' has no chat template; use /v1/completions", "messages",
                                "no_chat_template");
  }
  json::array normalized;
  if (auto e = NormalizeMessages(*messages, &normalized)) return e;
  bool add_generation_prompt = true, add_special = false;
  f.Bool("add_generation_prompt", &add_generation_prompt);
  f.Bool("add_special_tokens", &add_special);
  const json::object* kwargs = nullptr;
  f.Object("chat_template_kwargs", &kwargs);
  const json::array* tools_array = nullptr;
  f.Array("tools", &tools_array);
  if (f.error()) return f.error();
  const json::value* tools = f.Get("tools");
  const TokenizerInfo& info = model.tokenizer->info();
  json::object vars = ChatTemplateVariables(normalized, tools, add_generation_prompt, info.bos_token, info.eos_token, kwargs);
  auto text = model.chat_template->Render(vars);
  if (!text.ok()) {
    if (text.status().code() == StatusCode::kInvalidArgument)
      return ApiError::BadRequest("chat template: " + text.status().message(), "messages", "chat_template_error");
    return ApiError::Internal("chat template: " + text.status().ToString());
  }
  *ids = model.tokenizer->Encode(*text, add_special);
  if (ids->empty()) return ApiError::BadRequest("messages: the rendered prompt has no tokens", "messages");
  return std::nullopt;
}

std::optional<ApiError> ParseGenerationRequest(ApiKind kind, const json::object& body, const ModelRegistry& registry,
                                               GenerationRequest* out) {
  out->kind = kind;
  if (auto e = ResolveModel(body, registry, false, &out->model, &out->model_name)) return e;
  const ServedModel& model = *out->model;
  JsonFields f(body);

  f.Bool("stream", &out->stream);
  const json::object* stream_options = nullptr;
  if (f.Object("stream_options", &stream_options)) {
    JsonFields so(*stream_options);
    so.Bool("include_usage", &out->include_usage);
    if (so.error()) {
      ApiError e = *so.error();
      e.param = "stream_options." + e.param;
      return e;
    }
  }
  int64_t n = 1;
  if (f.Int("n", &n) && (n < 1 || n > kMaxChoicesPerRequest)) {
    return ApiError::BadRequest("n: must be in [1, " + std::to_string(kMaxChoicesPerRequest) + "], got " + std::to_string(n), "n");
  }
  out->n = static_cast<int>(n);
  if (auto e = ParseStop(f, out)) return e;
  f.Bool("include_stop_str_in_output", &out->include_stop_str_in_output);
  f.Bool("skip_special_tokens", &out->skip_special_tokens);
  f.Bool("return_tokens_as_token_ids", &out->return_tokens_as_token_ids);
  if (kind == ApiKind::kCompletion) f.Bool("echo", &out->echo);
  const json::object* response_format = nullptr;
  if (f.Object("response_format", &response_format)) {
    const json::value* type = response_format->if_contains("type");
    if (!type || !type->is_string() || type->get_string() != "text") {
      return ApiError::BadRequest("response_format: only {\"type\": \"text\"} is supported", "response_format",
                                  "unsupported_value");
    }
  }
  if (auto e = ParseSampling(f, *model.tokenizer, out)) return e;

  std::optional<int64_t> max_tokens;
  const char* max_param = "max_tokens";
  int64_t m;
  if (f.Int("max_completion_tokens", &m)) {
    max_tokens = m;
    max_param = "max_completion_tokens";
  } else if (f.Int("max_tokens", &m)) {
    max_tokens = m;
  }
  if (f.error()) return f.error();
  if (max_tokens && *max_tokens <= 0) {
    return ApiError::BadRequest(std::string(max_param) + ": must be at least 1, got " + std::to_string(*max_tokens), max_param);
  }
  if (max_tokens && out->stop_conditions.min_tokens > *max_tokens) {
    return ApiError::BadRequest("min_tokens: must be <= max_tokens", "min_tokens");
  }

  if (kind == ApiKind::kChat) {
    std::vector<uint32_t> ids;
    if (auto e = RenderChatPrompt(model, body, &ids)) return e;
    out->prompts.push_back(std::move(ids));
    out->echo_texts.push_back("");
  } else {
    const json::value* prompt = f.Get("prompt");
    if (!prompt) return ApiError::BadRequest("prompt: required", "prompt", "missing_required_parameter");
    bool add_special = true;
    f.Bool("add_special_tokens", &add_special);
    if (f.error()) return f.error();
    if (auto e = ParseCompletionPrompts(*prompt, *model.tokenizer, add_special, out)) return e;
  }
  if (out->prompts.size() * static_cast<size_t>(out->n) > kMaxStreamsPerRequest) {
    return ApiError::BadRequest("prompts * n: at most " + std::to_string(kMaxStreamsPerRequest) + " choices per request", "n");
  }

  const int64_t context = model.context_length;
  const char* prompt_param = kind == ApiKind::kChat ? "messages" : "prompt";
  for (const auto& ids : out->prompts) {
    const int64_t len = static_cast<int64_t>(ids.size());
    if (len >= context) {
      return ApiError{400,
                      "This model's maximum context length is " + std::to_string(context) + " tokens. However, your prompt has " +
                          std::to_string(len) + " tokens, which leaves no room for the completion.",
                      "invalid_request_error", prompt_param, "context_length_exceeded"};
    }
    if (max_tokens && len + *max_tokens > context) {
      return ApiError{400,
                      "This model's maximum context length is " + std::to_string(context) + " tokens. However, you requested " +
                          std::to_string(len + *max_tokens) + " tokens (" + std::to_string(len) + " in the prompt, " +
                          std::to_string(*max_tokens) + " for the completion).",
                      "invalid_request_error", max_param, "context_length_exceeded"};
    }
    out->max_tokens.push_back(static_cast<int>(max_tokens ? *max_tokens : context - len));
  }
  return std::nullopt;
}

}  // namespace dyn
