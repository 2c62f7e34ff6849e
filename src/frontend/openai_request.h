// Validation and preprocessing of /v1/chat/completions and /v1/completions bodies (no I/O):
// typed fields, ranges, the chat template, tokenization and the context-length checks.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <boost/json/object.hpp>

#include "engine/engine.h"
#include "frontend/api_error.h"
#include "frontend/frontend.h"

namespace dyn {

enum class ApiKind { kChat, kCompletion };

inline constexpr int kMaxChoicesPerRequest = 128;   // n
inline constexpr int kMaxStreamsPerRequest = 1024;  // prompts * n

struct GenerationRequest {
  ApiKind kind = ApiKind::kCompletion;
  std::shared_ptr<const ServedModel> model;
  std::string model_name;                        // as the client spelled it
  std::vector<std::vector<uint32_t>> prompts;    // one for chat; one or more for completions
  std::vector<int> max_tokens;                   // per prompt
  std::vector<std::string> echo_texts;           // per prompt, with echo
  int n = 1;
  bool stream = false;
  bool include_usage = false;
  std::vector<std::string> stop;
  bool include_stop_str_in_output = false;
  bool skip_special_tokens = true;
  bool return_tokens_as_token_ids = false;  // vLLM extension: logprob tokens as "token_id:N"
  bool echo = false;
  bool logprobs = false;  // chat: logprobs; completions: logprobs is an int
  SamplingParams sampling;
  StopConditions stop_conditions;  // max_tokens filled per prompt from max_tokens[]
};

// Parses and validates `body`; on success the prompts are tokenized and within the context.
std::optional<ApiError> ParseGenerationRequest(ApiKind kind, const boost::json::object& body,
                                               const ModelRegistry& registry, GenerationRequest* out);

// Finds body["model"]; NotFound when unknown. With `optional`, a missing model selects the only
// served model.
std::optional<ApiError> ResolveModel(const boost::json::object& body, const ModelRegistry& registry, bool optional,
                                     std::shared_ptr<const ServedModel>* model, std::string* name);

// Applies the model's chat template to body["messages"] (with tools, add_generation_prompt,
// chat_template_kwargs) and tokenizes the result (add_special_tokens defaults to false, as the
// template writes the special tokens itself).
std::optional<ApiError> RenderChatPrompt(const ServedModel& model, const boost::json::object& body,
                                         std::vector<uint32_t>* ids);

}  // namespace dyn
