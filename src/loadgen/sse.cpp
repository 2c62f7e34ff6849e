#include "loadgen/sse.h"

#include <boost/json.hpp>

namespace dyn::loadgen {
namespace json = boost::json;

void SseParser::Feed(std::string_view bytes, std::vector<std::string>* events) {
  for (char c : bytes) {
    if (after_cr_) {
      after_cr_ = false;
      if (c == '\n') continue;  // the "\n" of "\r\n"
    }
    if (c == '\n' || c == '\r') {
      after_cr_ = c == '\r';
      EndLine(events);
    } else {
      line_.push_back(c);
    }
  }
}

void SseParser::EndLine(std::vector<std::string>* events) {
  if (line_.empty()) {  // a blank line dispatches the event
    if (has_data_) events->push_back(std::move(data_));
    data_.clear();
    has_data_ = false;
    return;
  }
  std::string_view line(line_);
  if (line.front() != ':') {
    const size_t colon = line.find(':');
    std::string_view field = line.substr(0, colon);
    std::string_view value = colon == std::string_view::npos ? std::string_view() : line.substr(colon + 1);
    if (!value.empty() && value.front() == ' ') value.remove_prefix(1);
    if (field == "data") {
      if (has_data_) data_.push_back('\n');
      data_.append(value);
      has_data_ = true;
    }
  }
  line_.clear();
}

namespace {

std::optional<int> IntField(const json::object& o, std::string_view key) {
  const json::value* v = o.if_contains(key);
  if (!v) return std::nullopt;
  if (v->is_int64()) return static_cast<int>(v->get_int64());
  if (v->is_uint64()) return static_cast<int>(v->get_uint64());
  return std::nullopt;
}

size_t ChoiceTextBytes(const json::object& choice) {
  const json::value* text = choice.if_contains("text");
  if (const json::value* delta = choice.if_contains("delta"); delta && delta->is_object()) {
    text = delta->get_object().if_contains("content");
  } else if (const json::value* message = choice.if_contains("message"); message && message->is_object()) {
    text = message->get_object().if_contains("content");
  }
  return text && text->is_string() ? text->get_string().size() : 0;
}

OpenAiChunk ParseObject(std::string_view data) {
  OpenAiChunk chunk;
  json::error_code ec;
  json::value v = json::parse(data, ec);
  if (ec || !v.is_object()) {
    chunk.malformed = true;
    return chunk;
  }
  const json::object& o = v.get_object();
  if (const json::value* err = o.if_contains("error")) {
    const json::value* msg = err->is_object() ? err->get_object().if_contains("message") : nullptr;
    chunk.error = msg && msg->is_string() ? std::string(msg->get_string()) : json::serialize(*err);
  }
  if (const json::value* choices = o.if_contains("choices"); choices && choices->is_array()) {
    for (const json::value& c : choices->get_array()) {
      if (!c.is_object()) continue;
      const size_t bytes = ChoiceTextBytes(c.get_object());
      if (bytes > 0) {
        ++chunk.text_choices;
        chunk.text_bytes += bytes;
      }
      const json::value* fr = c.get_object().if_contains("finish_reason");
      if (fr && fr->is_string()) chunk.finished = true;
    }
  }
  if (const json::value* usage = o.if_contains("usage"); usage && usage->is_object()) {
    chunk.prompt_tokens = IntField(usage->get_object(), "prompt_tokens");
    chunk.completion_tokens = IntField(usage->get_object(), "completion_tokens");
    const json::value* details = usage->get_object().if_contains("prompt_tokens_details");
    if (details && details->is_object()) chunk.cached_tokens = IntField(details->get_object(), "cached_tokens");
  }
  return chunk;
}

}  // namespace

OpenAiChunk ParseOpenAiChunk(std::string_view data) {
  if (data == "[DONE]") {
    OpenAiChunk chunk;
    chunk.done = true;
    return chunk;
  }
  return ParseObject(data);
}

OpenAiChunk ParseOpenAiResponse(std::string_view body) { return ParseObject(body); }

}  // namespace dyn::loadgen
