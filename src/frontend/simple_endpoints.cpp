#include "frontend/simple_endpoints.h"

#include <boost/json/parse.hpp>
#include <boost/json/serialize.hpp>

#include "frontend/json_fields.h"
#include "frontend/openai_request.h"
#include "llm/tokenizer/tokenizer.h"

namespace dyn {
namespace json = boost::json;

HttpReply ErrorReply(const ApiError& error) {
  HttpReply r;
  r.status = error.status;
  r.body = error.ToJson();
  r.error_code = error.code.empty() ? error.type : error.code;
  return r;
}

std::optional<ApiError> ParseJsonBody(std::string_view body, json::value* out) {
  if (!IsValidUtf8(body)) return ApiError::BadRequest("The request body is not valid UTF-8", "", "invalid_utf8");
  boost::system::error_code ec;
  json::parse_options options;
  options.max_depth = 128;
  *out = json::parse(body, ec, {}, options);
  if (ec) return ApiError::BadRequest("The request body is not valid JSON: " + ec.message(), "", "invalid_json");
  if (!out->is_object()) return ApiError::BadRequest("The request body must be a JSON object", "", "invalid_json");
  return std::nullopt;
}

namespace {

json::object ModelObject(const ServedModel& m) {
  return json::object{{"id", m.name},          {"object", "model"},       {"created", m.created_unix},
                      {"owned_by", "dyn"},     {"root", m.name},          {"parent", nullptr},
                      {"max_model_len", m.context_length}};
}

HttpReply JsonReply(const json::object& o) {
  HttpReply r;
  r.body = json::serialize(o);
  return r;
}

}  // namespace

HttpReply ModelsReply(const ModelRegistry& registry, std::optional<std::string_view> name) {
  if (name) {
    auto m = registry.Find(*name);
    if (!m) return ErrorReply(ApiError::NotFound("The model '" + std::string(*name) + "' does not exist", "model", "model_not_found"));
    return JsonReply(ModelObject(*m));
  }
  json::array data;
  for (const auto& m : registry.List()) data.push_back(ModelObject(*m));
  return JsonReply(json::object{{"object", "list"}, {"data", std::move(data)}});
}

HttpReply TokenizeReply(const ModelRegistry& registry, const json::object& body) {
  std::shared_ptr<const ServedModel> model;
  std::string name;
  if (auto e = ResolveModel(body, registry, true, &model, &name)) return ErrorReply(*e);
  JsonFields f(body);
  std::vector<uint32_t> ids;
  if (f.Has("messages")) {
    if (auto e = RenderChatPrompt(*model, body, &ids)) return ErrorReply(*e);
  } else {
    std::string prompt;
    if (!f.String("prompt", &prompt)) {
      if (f.error()) return ErrorReply(*f.error());
      return ErrorReply(ApiError::BadRequest("prompt or messages: required", "prompt", "missing_required_parameter"));
    }
    bool add_special = true;
    f.Bool("add_special_tokens", &add_special);
    if (f.error()) return ErrorReply(*f.error());
    ids = model->tokenizer->Encode(prompt, add_special);
  }
  bool return_token_strs = false;
  f.Bool("return_token_strs", &return_token_strs);
  json::array tokens;
  for (uint32_t id : ids) tokens.push_back(id);
  json::object out{{"count", ids.size()}, {"max_model_len", model->context_length}, {"tokens", std::move(tokens)}};
  if (return_token_strs) {
    json::array strs;
    for (uint32_t id : ids) strs.push_back(json::string(model->tokenizer->IdToToken(id)));
    out["token_strs"] = std::move(strs);
  }
  return JsonReply(out);
}

HttpReply DetokenizeReply(const ModelRegistry& registry, const json::object& body) {
  std::shared_ptr<const ServedModel> model;
  std::string name;
  if (auto e = ResolveModel(body, registry, true, &model, &name)) return ErrorReply(*e);
  JsonFields f(body);
  const json::array* tokens = nullptr;
  if (!f.Array("tokens", &tokens)) {
    if (f.error()) return ErrorReply(*f.error());
    return ErrorReply(ApiError::BadRequest("tokens: required", "tokens", "missing_required_parameter"));
  }
  std::vector<uint32_t> ids;
  const uint32_t vocab = model->tokenizer->vocab_size();
  for (const auto& v : *tokens) {
    auto id = JsonToInt(v);
    if (!id) return ErrorReply(ApiError::BadRequest("tokens: expected integers", "tokens", "invalid_type"));
    if (*id < 0 || *id >= vocab) {
      return ErrorReply(ApiError::BadRequest("tokens: token id " + std::to_string(*id) + " is outside the vocabulary", "tokens"));
    }
    ids.push_back(static_cast<uint32_t>(*id));
  }
  return JsonReply(json::object{{"prompt", model->tokenizer->Decode(ids, false)}});
}

}  // namespace dyn
