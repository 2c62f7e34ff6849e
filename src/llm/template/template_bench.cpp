// Render time per request for the golden chat templates: a typical 4-message chat and a tools
// chat (inputs from tests/golden/templates/cases). Parse happens once, outside the timed loop;
// each iteration builds the variables and renders. Run from the repository root.
#include <fstream>
#include <sstream>
#include <string>

#include <benchmark/benchmark.h>
#include <boost/json.hpp>

#include "llm/template/chat_template.h"

namespace {

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

void BM_Render(benchmark::State& state, const std::string& family, const std::string& chat) {
  const std::string dir = "tests/golden/templates/";
  std::string case_text = ReadFile(dir + "cases/" + family + "_" + chat + "_gen.json");
  if (case_text.empty()) {
    state.SkipWithError("golden case missing (run from the repository root)");
    return;
  }
  boost::json::object c = boost::json::parse(case_text).as_object();
  auto tmpl = dyn::ChatTemplate::Parse(ReadFile(dir + family + ".jinja"));
  if (!tmpl.ok()) {
    state.SkipWithError(tmpl.status().ToString().c_str());
    return;
  }
  const boost::json::value& tools = c.at("tools");
  auto token = [&](const char* key) {
    const auto& v = c.at(key);
    return v.is_string() ? std::string(v.as_string()) : std::string();
  };
  std::string bos = token("bos_token"), eos = token("eos_token");
  size_t bytes = 0;
  for (auto _ : state) {
    auto vars = dyn::ChatTemplateVariables(c.at("messages").as_array(), tools.is_null() ? nullptr : &tools, true, bos,
                                           eos, &c.at("extra").as_object());
    auto out = (*tmpl)->Render(vars);
    if (!out.ok()) {
      state.SkipWithError(out.status().ToString().c_str());
      return;
    }
    bytes = out->size();
    benchmark::DoNotOptimize(out);
  }
  state.counters["out_bytes"] = static_cast<double>(bytes);
}

void BM_Parse(benchmark::State& state, const std::string& family) {
  std::string source = ReadFile("tests/golden/templates/" + family + ".jinja");
  for (auto _ : state) {
    auto tmpl = dyn::ChatTemplate::Parse(source);
    benchmark::DoNotOptimize(tmpl);
  }
}

}  // namespace

BENCHMARK_CAPTURE(BM_Render, qwen3_chat, "qwen3", "multi_turn");
BENCHMARK_CAPTURE(BM_Render, qwen3_tools, "qwen3", "tools_with_text");
BENCHMARK_CAPTURE(BM_Render, mistral_nemo_chat, "mistral-nemo", "multi_turn");
BENCHMARK_CAPTURE(BM_Render, mistral_nemo_tools, "mistral-nemo", "tools_with_text");
BENCHMARK_CAPTURE(BM_Render, deepseek_v3_chat, "deepseek-v3", "multi_turn");
BENCHMARK_CAPTURE(BM_Render, deepseek_v3_tools, "deepseek-v3", "tools_with_text");
BENCHMARK_CAPTURE(BM_Render, smollm2_chat, "smollm2", "multi_turn");
BENCHMARK_CAPTURE(BM_Render, smollm2_tools, "smollm2", "tools_with_text");
BENCHMARK_CAPTURE(BM_Parse, qwen3, "qwen3");
BENCHMARK_CAPTURE(BM_Parse, mistral_nemo, "mistral-nemo");

BENCHMARK_MAIN();
