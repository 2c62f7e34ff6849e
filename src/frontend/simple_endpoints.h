// The endpoints answered at once, without an engine: /v1/models, /tokenize, /detokenize; and
// request-body parsing shared with the generation endpoints. No I/O.
#pragma once

#include <optional>
#include <string>
#include <string_view>

#include <boost/json/value.hpp>

#include "frontend/api_error.h"
#include "frontend/frontend.h"

namespace dyn {

struct HttpReply {
  int status = 200;
  std::string body;
  std::string content_type = "application/json";
  std::string error_code;  // set for error replies (the metrics label)
};

HttpReply ErrorReply(const ApiError& error);
// Valid UTF-8, valid JSON, and an object.
std::optional<ApiError> ParseJsonBody(std::string_view body, boost::json::value* out);

// GET /v1/models, or GET /v1/models/{name} when `name` is given.
HttpReply ModelsReply(const ModelRegistry& registry, std::optional<std::string_view> name);
// POST /tokenize (vLLM): {model?, prompt, add_special_tokens} or {model?, messages, ...}
//   -> {count, max_model_len, tokens}
HttpReply TokenizeReply(const ModelRegistry& registry, const boost::json::object& body);
// POST /detokenize (vLLM): {model?, tokens} -> {prompt}
HttpReply DetokenizeReply(const ModelRegistry& registry, const boost::json::object& body);

}  // namespace dyn
