// Server-Sent Events as OpenAI-compatible servers stream them, parsed incrementally.
//
// SseParser takes the response body in whatever pieces the network delivers (an event may be
// split at any byte, several events may come in one read) and hands back each complete event's
// data. ParseOpenAiChunk reads one event's data as a chat or completions chunk. Pure: no I/O, so
// the client can take a timestamp when bytes arrive and parse afterwards.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace dyn::loadgen {

class SseParser {
 public:
  // Appends `bytes` and appends the data of every event completed by them to `events` (multi-line
  // data joined with '\n', as the SSE spec says). Lines end with "\n", "\r\n" or "\r"; comments
  // (":...") and fields other than data are skipped; an event with no data line is not reported.
  void Feed(std::string_view bytes, std::vector<std::string>* events);

 private:
  void EndLine(std::vector<std::string>* events);
  std::string line_;
  std::string data_;
  bool has_data_ = false;
  bool after_cr_ = false;  // the last byte was '\r' (a following '\n' belongs to the same line end)
};

// What one streamed chunk says, for measuring: whether it carries generated text, the usage the
// server reported, an error, and whether it is the terminating [DONE].
struct OpenAiChunk {
  bool done = false;          // data: [DONE]
  bool malformed = false;     // not JSON, or not an object
  int text_choices = 0;       // choices whose delta content / text is non-empty
  size_t text_bytes = 0;      // bytes of that text
  bool finished = false;      // some choice carries a finish_reason
  std::optional<int> prompt_tokens, completion_tokens;  // from "usage"
  std::optional<int> cached_tokens;                     // usage.prompt_tokens_details.cached_tokens
  std::optional<std::string> error;                     // {"error": {"message": ...}}
};

OpenAiChunk ParseOpenAiChunk(std::string_view data);

// A whole non-streaming response body: the same fields (text_choices counts choices with text).
OpenAiChunk ParseOpenAiResponse(std::string_view body);

}  // namespace dyn::loadgen
