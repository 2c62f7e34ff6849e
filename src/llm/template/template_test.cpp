// Unit tests: API contracts, ChatTemplateVariables, and hostile templates that must fail
// promptly with an error instead of hanging or crashing.
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include <boost/json.hpp>
#include <gtest/gtest.h>

#include "llm/template/chat_template.h"

namespace dyn {
namespace {

Result<std::string> RenderSource(std::string_view source, const boost::json::object& vars = {},
                                 const RenderLimits& limits = {}) {
  auto parsed = ChatTemplate::Parse(source);
  if (!parsed.ok()) return parsed.status();
  return (*parsed)->Render(vars, limits);
}

std::string Ok(std::string_view source, const boost::json::object& vars = {}) {
  auto r = RenderSource(source, vars);
  EXPECT_TRUE(r.ok()) << source << " -> " << r.status().ToString();
  return r.ok() ? *r : std::string();
}

// Runs `source` and requires an error of `code` (whose message contains `what`, when given). How
// soon the limits stop a render is counted in steps, not timed here: wall time depends on the
// build (sanitizers run this 5-15x slower) and the machine.
void ExpectPromptError(const std::string& source, StatusCode code, const RenderLimits& limits = {}, std::string_view what = {}) {
  auto r = RenderSource(source, {}, limits);
  ASSERT_FALSE(r.ok()) << source.substr(0, 80) << " rendered " << r->size() << " bytes";
  EXPECT_EQ(r.status().code(), code) << r.status().ToString();
  EXPECT_NE(r.status().message().find(what), std::string::npos) << r.status().ToString();
}

TEST(ChatTemplate, RendersVariablesAndWhitespaceControl) {
  EXPECT_EQ(Ok("Hello {{ name }}!", {{"name", "Ann"}}), "Hello Ann!");
  EXPECT_EQ(Ok("{% for m in messages %}\n  {{- m.role }}:{{ m.content }}\n{% endfor %}",
               {{"messages", boost::json::array{{{"role", "user"}, {"content", "hi"}}}}}),
            "user:hi\n");
  EXPECT_EQ(Ok("a\n  {% if true %}\nb\n  {% endif %}\nc"), "a\nb\nc");
}

TEST(ChatTemplate, RaiseExceptionIsInvalidArgumentWithMessage) {
  auto r = RenderSource("{{ raise_exception('Roles must alternate') }}");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(r.status().message(), "Roles must alternate");
}

TEST(ChatTemplate, SyntaxErrorsCarryLineNumbers) {
  auto r = ChatTemplate::Parse("line1\nline2 {% if x %}\n{% endfor %}");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("line 3"), std::string::npos) << r.status().message();
}

TEST(ChatTemplate, UnterminatedAndMalformedTagsAreErrors) {
  for (const char* source : {"{{ x", "{% if x %}", "{# comment", "{{ 'abc }}", "{% for %}", "{% endif %}",
                             "{{ (1 }}", "{{ [1, 2 }}", "{{ 1 + }}", "{% break %}", "{% set %}", "{{ a.1b }}",
                             "{% raw %}never ends", "{% macro m( %}{% endmacro %}", "{{ x | }}", "{% do x %}",
                             "{{ 0x }}", "{{ 99999999999999999999 }}", "{{ '\\x4' }}", "}} {{ ) }}"}) {
    auto r = ChatTemplate::Parse(source);
    EXPECT_FALSE(r.ok()) << source;
  }
}

TEST(ChatTemplate, DeeplyNestedSyntaxIsRejectedNotOverflowed) {
  std::string parens = "{{ " + std::string(100000, '(') + "1" + std::string(100000, ')') + " }}";
  EXPECT_FALSE(ChatTemplate::Parse(parens).ok());
  std::string lists = "{{ " + std::string(50000, '[') + std::string(50000, ']') + " }}";
  EXPECT_FALSE(ChatTemplate::Parse(lists).ok());
  std::string nots = "{{ " ;
  for (int i = 0; i < 50000; ++i) nots += "not ";
  EXPECT_FALSE(ChatTemplate::Parse(nots + "x }}").ok());
  std::string minus = "{{ " + std::string(50000, '-') + "1 }}";
  EXPECT_FALSE(ChatTemplate::Parse(minus).ok());
  std::string ifs;
  for (int i = 0; i < 20000; ++i) ifs += "{% if true %}";
  EXPECT_FALSE(ChatTemplate::Parse(ifs).ok());
  // Long left-deep chains are built by loops, not recursion; they are bounded too.
  std::string sum = "{{ 1";
  for (int i = 0; i < 100000; ++i) sum += "+1";
  EXPECT_FALSE(ChatTemplate::Parse(sum + " }}").ok());
  std::string filters = "{{ 'x'";
  for (int i = 0; i < 100000; ++i) filters += "|upper";
  EXPECT_FALSE(ChatTemplate::Parse(filters + " }}").ok());
  std::string attrs = "{{ x";
  for (int i = 0; i < 100000; ++i) attrs += ".a[0]";
  EXPECT_FALSE(ChatTemplate::Parse(attrs + " }}").ok());
  std::string conds = "{{ 1";
  for (int i = 0; i < 100000; ++i) conds += " if x";
  EXPECT_FALSE(ChatTemplate::Parse(conds + " }}").ok());
  // Moderate nesting is fine.
  EXPECT_EQ(Ok("{{ ((((((1 + 2)))))) * [[[[3]]]][0][0][0][0] }}"), "9");
}

TEST(ChatTemplate, HugeRangesAndLoopsAreBounded) {
  ExpectPromptError("{% for i in range(10**9) %}x{% endfor %}", StatusCode::kResourceExhausted);
  RenderLimits limits;
  limits.max_steps = 1'000'000;
  ExpectPromptError("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                    StatusCode::kResourceExhausted, limits);
  ExpectPromptError("{% set ns = namespace(l=[1]) %}{% for i in range(64) %}{% set ns.l = ns.l + ns.l %}{% endfor %}",
                    StatusCode::kTooLarge);
}

TEST(ChatTemplate, DefaultStepLimitStopsLongLoopsPromptly) {
  // 10^15 iterations, stopped by the default 10M-step limit (about a second of CPU).
  ExpectPromptError(
      "{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}"
      "{% endfor %}{% endfor %}{% endfor %}",
      StatusCode::kResourceExhausted, {}, "step limit (10000000)");
}

TEST(ChatTemplate, RecursionIsBounded) {
  ExpectPromptError("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", StatusCode::kResourceExhausted);
  ExpectPromptError("{% macro f() %}{{ f() }}{{ f() }}{% endmacro %}{{ f() }}", StatusCode::kResourceExhausted);
  ExpectPromptError("{% for n in [[1]] recursive %}{{ loop([n]) }}{% endfor %}", StatusCode::kResourceExhausted);
}

TEST(ChatTemplate, DeepEvaluationIsBoundedAtRunTime) {
  // Recursion through nested blocks and tall expressions, each within the parser's limits.
  std::string body;
  for (int i = 0; i < 90; ++i) body += "{% if true %}";
  body += "{{ f(n + 1) + ((((((((((1)))))))))) }}";
  for (int i = 0; i < 90; ++i) body += "{% endif %}";
  ExpectPromptError("{% macro f(n) %}" + body + "{% endmacro %}{{ f(0) }}", StatusCode::kResourceExhausted);
}

TEST(ChatTemplate, HugeOutputIsBounded) {
  ExpectPromptError("{{ 'x' * 10**9 }}", StatusCode::kTooLarge);
  ExpectPromptError("{{ 10**9 * 'xy' }}", StatusCode::kTooLarge);
  ExpectPromptError("{{ [1] * 10**9 }}", StatusCode::kTooLarge);
  RenderLimits limits;
  limits.max_output_bytes = 1 << 20;
  ExpectPromptError("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", StatusCode::kTooLarge, limits);
  ExpectPromptError("{% set ns = namespace(s='ab') %}{% for i in range(100) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
                    StatusCode::kTooLarge, limits);
  ExpectPromptError("{% set ns = namespace(s='ab') %}{% for i in range(100) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
                    StatusCode::kTooLarge, limits);
  ExpectPromptError("{% set ns = namespace(s='ab') %}{% for i in range(100) %}{% set ns.s = [ns.s, ns.s]|join %}{% endfor %}",
                    StatusCode::kTooLarge, limits);
}

TEST(ChatTemplate, DeeplyNestedValuesAreBounded) {
  ExpectPromptError("{% set ns = namespace(l=[]) %}{% for i in range(100000) %}{% set ns.l = [ns.l] %}{% endfor %}{{ ns.l }}",
                    StatusCode::kResourceExhausted);
  ExpectPromptError("{% set ns = namespace(d={}) %}{% for i in range(100000) %}{% set ns.d = {'k': ns.d} %}{% endfor %}",
                    StatusCode::kResourceExhausted);
  // A namespace that contains itself prints and compares without recursing.
  EXPECT_EQ(Ok("{% set ns = namespace() %}{% set ns.me = ns %}{{ ns.me.me == ns }}{{ [ns] }}"), "True[<Namespace>]");
}

TEST(ChatTemplate, SandboxBlocksHostAccess) {
  EXPECT_EQ(Ok("[{{ ''.__class__ }}][{{ x.__dict__ }}][{{ range.__globals__ }}]", {{"x", boost::json::object{}}}), "[][][]");
  auto r = RenderSource("{% set l = [1] %}{{ l.append(2) }}");
  EXPECT_FALSE(r.ok());
  r = RenderSource("{% set d = {} %}{{ d.update({'a': 1}) }}");
  EXPECT_FALSE(r.ok());
  r = RenderSource("{{ namespace(_x=1) }}");
  EXPECT_FALSE(r.ok());
  r = RenderSource("{% set ns = namespace() %}{% set ns.__x = 1 %}");
  EXPECT_FALSE(r.ok());
  r = RenderSource("{% include 'other.jinja' %}");
  EXPECT_FALSE(r.ok());
}

TEST(ChatTemplate, UndefinedFollowsJinjaDefaults) {
  EXPECT_EQ(Ok("[{{ missing }}][{{ missing|length }}][{% for x in missing %}x{% endfor %}][{{ missing is defined }}]"),
            "[][0][][False]");
  EXPECT_EQ(Ok("[{{ d.nokey }}][{{ d.nokey is defined }}]", {{"d", boost::json::object{}}}), "[][False]");
  EXPECT_FALSE(RenderSource("{{ missing.attr }}").ok());
  EXPECT_FALSE(RenderSource("{{ missing + 1 }}").ok());
  EXPECT_FALSE(RenderSource("{{ missing() }}").ok());
}

TEST(ChatTemplate, FloatsPrintLikePython) {
  EXPECT_EQ(Ok("{{ 1.0 }} {{ 0.1 }} {{ 1e-05 }} {{ 1e16 }} {{ 123456789012345.6 }} {{ 1/3 }} {{ -0.0 }} {{ 2.5e-300 }}"),
            "1.0 0.1 1e-05 1e+16 123456789012345.6 0.3333333333333333 -0.0 2.5e-300");
  EXPECT_EQ(Ok("{{ x }} {{ x|tojson }}", {{"x", 1e100}}), "1e+100 1e+100");
}

TEST(ChatTemplate, StrftimeNowUsesInjectedClock) {
  auto parsed = ChatTemplate::Parse("{{ strftime_now('%Y') }}");
  ASSERT_TRUE(parsed.ok());
  auto t = std::chrono::system_clock::from_time_t(1715000000);  // May 2024 in every time zone
  auto r = (*parsed)->Render({}, RenderLimits{}, [t] { return t; });
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(*r, "2024");
  auto now = (*parsed)->Render({});
  ASSERT_TRUE(now.ok());
  EXPECT_EQ(now->size(), 4u);
}

TEST(ChatTemplate, ParsedTemplateRendersConcurrently) {
  auto parsed = ChatTemplate::Parse("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
                                    "{{ m.content }}{% endfor %}{{ ns.n }}");
  ASSERT_TRUE(parsed.ok());
  boost::json::array messages;
  for (int i = 0; i < 20; ++i) messages.push_back(boost::json::object{{"role", "user"}, {"content", "m"}});
  boost::json::object vars{{"messages", messages}};
  std::vector<std::thread> threads;
  std::atomic<int> good{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 200; ++i) {
        auto r = (*parsed)->Render(vars);
        if (r.ok() && *r == std::string(20, 'm') + "20") ++good;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(good.load(), 800);
}

TEST(ChatTemplateVariables, MatchesApplyChatTemplateConventions) {
  boost::json::array messages = {
      boost::json::object{{"role", "user"}, {"content", "q"}},
      boost::json::object{{"role", "assistant"}, {"content", "a"}, {"reasoning", "why"}},
  };
  boost::json::object extra{{"enable_thinking", false}, {"add_generation_prompt", false}};
  auto vars = ChatTemplateVariables(messages, nullptr, true, "", "</s>", &extra);
  EXPECT_TRUE(vars.at("tools").is_null());
  EXPECT_TRUE(vars.at("documents").is_null());
  EXPECT_FALSE(vars.contains("bos_token"));
  EXPECT_EQ(vars.at("eos_token").as_string(), "</s>");
  EXPECT_EQ(vars.at("enable_thinking").as_bool(), false);
  EXPECT_EQ(vars.at("add_generation_prompt").as_bool(), false);  // extra wins
  const auto& assistant = vars.at("messages").as_array()[1].as_object();
  EXPECT_EQ(assistant.at("thinking").as_string(), "why");
  EXPECT_EQ(assistant.at("reasoning_content").as_string(), "why");
  EXPECT_EQ(assistant.begin()->key(), "thinking");  // {"thinking": r, **message, "reasoning_content": r}
  EXPECT_FALSE(vars.at("messages").as_array()[0].as_object().contains("thinking"));

  boost::json::value tools = boost::json::array{boost::json::object{{"type", "function"}}};
  auto with_tools = ChatTemplateVariables(messages, &tools, false, "<s>", "</s>", nullptr);
  EXPECT_EQ(with_tools.at("tools").as_array().size(), 1u);
  EXPECT_EQ(with_tools.at("bos_token").as_string(), "<s>");
}

}  // namespace
}  // namespace dyn
