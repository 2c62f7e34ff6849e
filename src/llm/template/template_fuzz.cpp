// Fuzz target: parse arbitrary bytes as a template and render it with small limits. Built as a
// libFuzzer target with DYN_FUZZ (clang), and as a plain replay program otherwise.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include <boost/json.hpp>

#include "llm/template/chat_template.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view source(reinterpret_cast<const char*>(data), size);
  auto parsed = dyn::ChatTemplate::Parse(source);
  if (!parsed.ok()) return 0;
  boost::json::array messages = {
      boost::json::object{{"role", "system"}, {"content", "sys"}},
      boost::json::object{{"role", "user"}, {"content", "hi"}},
      boost::json::object{{"role", "assistant"}, {"content", "<think>a</think>b"},
                          {"tool_calls", boost::json::array{boost::json::object{
                                             {"type", "function"},
                                             {"function", boost::json::object{{"name", "f"}, {"arguments", "{}"}}}}}}}};
  boost::json::value tools = boost::json::array{boost::json::object{{"type", "function"}}};
  auto vars = dyn::ChatTemplateVariables(messages, &tools, true, "<s>", "</s>", nullptr);
  dyn::RenderLimits limits;
  limits.max_steps = 200'000;
  limits.max_output_bytes = 1 << 20;
  limits.max_recursion = 50;
  auto rendered = (*parsed)->Render(vars, limits, [] { return std::chrono::system_clock::time_point{}; });
  (void)rendered;
  return 0;
}

#ifdef DYN_TEMPLATE_FUZZ_MAIN
#include "base/fuzz_replay.h"

int main(int argc, char** argv) {
  const int rc = dyn::ReplayFuzzInputs(argc, argv);
  if (rc == 0) std::printf("replayed %d inputs\n", argc - 1);
  return rc;
}
#endif
