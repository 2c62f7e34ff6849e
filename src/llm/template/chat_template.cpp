#include "llm/template/chat_template.h"

#include <boost/json.hpp>

#include "llm/template/ast.h"
#include "llm/template/interpreter.h"
#include "llm/template/lexer.h"

namespace dyn {

struct ChatTemplate::Impl {
  tmpl::Body body;
};

ChatTemplate::ChatTemplate(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ChatTemplate::~ChatTemplate() = default;

Result<std::unique_ptr<ChatTemplate>> ChatTemplate::Parse(std::string_view source) {
  DYN_ASSIGN_OR_RETURN(std::vector<tmpl::Token> tokens, tmpl::Tokenize(source));
  auto impl = std::make_unique<Impl>();
  DYN_ASSIGN_OR_RETURN(impl->body, tmpl::ParseTemplate(tokens));
  return std::unique_ptr<ChatTemplate>(new ChatTemplate(std::move(impl)));
}

Result<std::string> ChatTemplate::Render(const boost::json::object& variables, const RenderLimits& limits) const {
  return Render(variables, limits, nullptr);
}

Result<std::string> ChatTemplate::Render(const boost::json::object& variables, const RenderLimits& limits,
                                         Clock now) const {
  auto globals = std::make_shared<tmpl::Scope>();
  globals->parent = tmpl::MakeBuiltinScope();
  globals->vars.reserve(variables.size() + 4);
  for (const auto& kv : variables) globals->Set(kv.key(), tmpl::FromJson(kv.value()));
  tmpl::Interpreter interpreter(limits, std::move(now));
  return interpreter.Run(impl_->body, std::move(globals));
}

boost::json::object ChatTemplateVariables(const boost::json::array& messages, const boost::json::value* tools,
                                          bool add_generation_prompt, std::string_view bos_token,
                                          std::string_view eos_token, const boost::json::object* extra) {
  static const char* const kReasoningFields[] = {"reasoning_content", "thinking", "reasoning"};
  boost::json::array aliased;
  aliased.reserve(messages.size());
  for (const auto& message : messages) {
    const boost::json::object* obj = message.if_object();
    const boost::json::value* reasoning = nullptr;
    for (const char* field : kReasoningFields) {
      if (!obj || reasoning) break;
      const boost::json::value* v = obj->if_contains(field);
      if (v && !v->is_null()) reasoning = v;
    }
    if (!reasoning) {
      aliased.push_back(message);
      continue;
    }
    // {"thinking": r, **message, "reasoning_content": r}
    boost::json::object out;
    out["thinking"] = *reasoning;
    for (const auto& kv : *obj) out[kv.key()] = kv.value();
    out["reasoning_content"] = *reasoning;
    aliased.push_back(std::move(out));
  }
  boost::json::object vars;
  vars["messages"] = std::move(aliased);
  vars["tools"] = tools ? *tools : boost::json::value(nullptr);
  vars["documents"] = nullptr;
  vars["add_generation_prompt"] = add_generation_prompt;
  if (!bos_token.empty()) vars["bos_token"] = bos_token;
  if (!eos_token.empty()) vars["eos_token"] = eos_token;
  if (extra) {
    for (const auto& kv : *extra) vars[kv.key()] = kv.value();
  }
  return vars;
}

}  // namespace dyn
