// Renders every case in tests/golden/templates/cases (generated with the real jinja2 by
// scripts/gen_template_goldens.py) and requires byte-identical output, or failure for error cases.
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <boost/json.hpp>
#include <gtest/gtest.h>

#include "llm/template/chat_template.h"

namespace dyn {
namespace {

namespace fs = std::filesystem;
const fs::path kGoldenDir = "tests/golden/templates";

bool ReadText(const fs::path& path, std::string* out) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return false;
  std::stringstream buffer;
  buffer << in.rdbuf();
  *out = buffer.str();
  return true;
}

std::vector<std::string> CaseNames() {
  std::vector<std::string> names;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(kGoldenDir / "cases", ec)) {
    if (entry.path().extension() == ".json") names.push_back(entry.path().stem().string());
  }
  std::sort(names.begin(), names.end());
  return names;
}

std::string TokenOrEmpty(const boost::json::object& c, const char* key) {
  const auto* v = c.if_contains(key);
  return v && v->is_string() ? std::string(v->get_string()) : std::string();
}

class TemplateGolden : public ::testing::TestWithParam<std::string> {};

TEST_P(TemplateGolden, MatchesJinja2) {
  const fs::path base = kGoldenDir / "cases" / GetParam();
  std::string case_text;
  ASSERT_TRUE(ReadText(base.string() + ".json", &case_text));
  boost::system::error_code ec;
  boost::json::value parsed = boost::json::parse(case_text, ec);
  ASSERT_FALSE(ec) << ec.message();
  const boost::json::object& c = parsed.as_object();

  std::string source;
  if (const auto* inline_source = c.if_contains("source")) {
    source = std::string(inline_source->as_string());
  } else {
    ASSERT_TRUE(ReadText(kGoldenDir / std::string(c.at("template").as_string()), &source));
  }

  boost::json::object variables;
  if (const auto* v = c.if_contains("variables")) {
    variables = v->as_object();
  } else {
    const boost::json::value& tools = c.at("tools");
    variables = ChatTemplateVariables(c.at("messages").as_array(), tools.is_null() ? nullptr : &tools,
                                      c.at("add_generation_prompt").as_bool(), TokenOrEmpty(c, "bos_token"),
                                      TokenOrEmpty(c, "eos_token"), &c.at("extra").as_object());
  }
  ChatTemplate::Clock clock;
  if (const auto* now = c.if_contains("now_unix")) {
    auto t = std::chrono::system_clock::from_time_t(static_cast<std::time_t>(now->to_number<int64_t>()));
    clock = [t] { return t; };
  }

  std::string expected, expected_error;
  bool expect_error = ReadText(base.string() + ".error", &expected_error);
  if (!expect_error) {
    ASSERT_TRUE(ReadText(base.string() + ".expected", &expected));
  }

  auto tmpl = ChatTemplate::Parse(source);
  Result<std::string> rendered = tmpl.ok() ? (*tmpl)->Render(variables, RenderLimits{}, clock)
                                           : Result<std::string>(tmpl.status());
  if (expect_error) {
    ASSERT_FALSE(rendered.ok()) << "expected error '" << expected_error << "', got output:\n" << *rendered;
    if (c.contains("match_error")) {
      EXPECT_NE(rendered.status().message().find(expected_error), std::string::npos)
          << "got error: " << rendered.status().ToString() << "\nexpected: " << expected_error;
    }
    return;
  }
  ASSERT_TRUE(rendered.ok()) << rendered.status().ToString();
  EXPECT_EQ(*rendered, expected);
}

INSTANTIATE_TEST_SUITE_P(Cases, TemplateGolden, ::testing::ValuesIn(CaseNames()),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           std::string name = info.param;
                           for (char& ch : name) {
                             if (!isalnum(static_cast<unsigned char>(ch))) ch = '_';
                           }
                           return name;
                         });

TEST(TemplateGoldenCorpus, HasCasesForEveryFamily) {
  auto names = CaseNames();
  for (const char* family : {"qwen3_", "mistral-nemo_", "deepseek-v3_", "smollm2_", "feature_"}) {
    EXPECT_TRUE(std::any_of(names.begin(), names.end(), [&](const std::string& n) { return n.rfind(family, 0) == 0; }))
        << family;
  }
}

}  // namespace
}  // namespace dyn
