// Chat templates: a sandboxed interpreter for the Jinja2 subset that Hugging Face chat templates
// use, rendering as transformers' apply_chat_template does (jinja2 with trim_blocks and
// lstrip_blocks, `raise_exception`, `tojson`, `strftime_now`).
//
// Sandboxed: templates see only the variables given; no I/O; loops, recursion and output are
// bounded, so a hostile template gets an error, not a hang or a crash.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include <boost/json/fwd.hpp>

#include "base/status.h"

namespace dyn {

struct RenderLimits {
  // Evaluation steps (statements, expression nodes, loop iterations, items a filter touches).
  // Real chat templates take thousands; 10M is about a second of CPU.
  uint64_t max_steps = 10'000'000;
  size_t max_output_bytes = 64u << 20;    // rendered text
  int max_recursion = 200;                // macro / call nesting
};

class ChatTemplate {
 public:
  // Parses the template source; syntax errors carry line numbers.
  static Result<std::unique_ptr<ChatTemplate>> Parse(std::string_view source);
  ~ChatTemplate();

  // Renders with `variables` as the template's globals (JSON values become template values:
  // objects are dicts that keep insertion order, arrays are lists). `raise_exception(msg)` in
  // the template yields InvalidArgument with msg.
  // Errors: syntax-free runtime errors (undefined attribute access, type errors) are
  // InvalidArgument; exceeding max_steps or max_recursion is ResourceExhausted; exceeding
  // max_output_bytes (including building a string that large) is TooLarge. Thread-safe: a parsed
  // template may render on many threads at once.
  Result<std::string> Render(const boost::json::object& variables, const RenderLimits& limits = {}) const;

  // As above, with `now` as the clock that strftime_now reads (local time zone); for tests.
  using Clock = std::function<std::chrono::system_clock::time_point()>;
  Result<std::string> Render(const boost::json::object& variables, const RenderLimits& limits, Clock now) const;

  struct Impl;

 private:
  explicit ChatTemplate(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// The variables transformers' apply_chat_template passes: messages, tools and documents (null
// when absent, as transformers passes them), add_generation_prompt, bos_token and eos_token
// (omitted when empty, as transformers omits unset special tokens), plus `extra` (e.g.
// enable_thinking) merged on top. Like transformers, a message whose reasoning is given as
// `reasoning_content`, `thinking` or `reasoning` gets it under both `thinking` and
// `reasoning_content`.
boost::json::object ChatTemplateVariables(const boost::json::array& messages, const boost::json::value* tools,
                                          bool add_generation_prompt, std::string_view bos_token,
                                          std::string_view eos_token, const boost::json::object* extra);

}  // namespace dyn
