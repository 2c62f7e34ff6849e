// Checks dyn's tokenizer against Hugging Face goldens (scripts/gen_tokenizer_goldens.py):
// encode ids, decode with and without special tokens, and streaming decode == one-shot decode.
#include <gtest/gtest.h>

#include <boost/json.hpp>

#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "base/file.h"
#include "llm/gguf.h"
#include "llm/tokenizer/tokenizer.h"

namespace dyn {
namespace {

const char* kGoldenDir = "tests/golden/tokenizer";

std::vector<uint32_t> ParseIds(std::string_view s) {
  std::vector<uint32_t> ids;
  std::istringstream in{std::string(s)};
  uint32_t v;
  while (in >> v) ids.push_back(v);
  return ids;
}

std::string Stream(const Tokenizer& tok, const std::vector<uint32_t>& ids, bool skip,
                   std::span<const uint32_t> prompt = {}) {
  IncrementalDecoder dec(tok, skip, prompt);
  std::string out;
  for (uint32_t id : ids) out += dec.Step(id);
  out += dec.Finish();
  return out;
}

std::vector<std::string> ShareGptPrompts(const std::string& path) {
  std::vector<std::string> out;
  auto text = ReadFile(path);
  if (!text.ok()) return out;
  boost::system::error_code ec;
  auto v = boost::json::parse(*text, ec);
  if (ec || !v.is_array()) return out;
  for (const auto& conv : v.get_array()) {
    std::string first;
    for (const auto& turn : conv.at("conversations").get_array()) {
      if (turn.at("from").get_string() == "human") {
        first = std::string(turn.at("value").get_string());
        break;
      }
    }
    out.push_back(first);
  }
  return out;
}

// The expected decode: `key` itself, or `key`_pre + text, or the text.
std::string Expected(const boost::json::object& c, const char* key, const std::string* text, const std::string& dflt) {
  if (auto it = c.find(key); it != c.end()) return std::string(it->value().get_string());
  if (auto it = c.find(std::string(key) + "_pre"); it != c.end()) return std::string(it->value().get_string()) + *text;
  return text ? *text : dflt;
}

void RunGolden(const std::string& name) {
  std::ifstream in(std::string(kGoldenDir) + "/" + name + ".jsonl");
  ASSERT_TRUE(in.good()) << "missing golden " << name;
  std::string line;
  std::getline(in, line);
  auto header = boost::json::parse(line).as_object();
  std::string kind(header.at("kind").as_string());
  std::string path(header.at("path").as_string());
  std::unique_ptr<GgufFile> gguf;
  Result<std::unique_ptr<Tokenizer>> tok = Status::NotFound("unset");
  if (kind == "gguf") {
    if (!FileExists(path)) GTEST_SKIP() << path << " is absent";
    auto g = GgufFile::Open(path);
    ASSERT_TRUE(g.ok()) << g.status().ToString();
    gguf = std::move(*g);
    tok = Tokenizer::FromGguf(*gguf);
  } else {
    if (!FileExists(path + "/tokenizer.json")) GTEST_SKIP() << path << " is absent";
    tok = Tokenizer::FromDirectory(path);
  }
  ASSERT_TRUE(tok.ok()) << tok.status().ToString();
  const Tokenizer& t = **tok;
  std::vector<std::string> prompts = ShareGptPrompts(std::string(header.at("sharegpt").as_string()));

  int cases = 0, encode_bad = 0, decode_bad = 0, stream_bad = 0, skipped = 0;
  const int kMaxReports = 5;
  while (std::getline(in, line)) {
    auto c = boost::json::parse(line).as_object();
    std::vector<uint32_t> ids = ParseIds(c.at("ids").as_string());
    std::string text_storage;
    const std::string* text = nullptr;
    if (auto it = c.find("sharegpt"); it != c.end()) {
      size_t i = static_cast<size_t>(it->value().to_number<int64_t>());
      if (i >= prompts.size()) {
        ++skipped;
        continue;
      }
      text = &prompts[i];
    } else if (auto it2 = c.find("text"); it2 != c.end()) {
      text_storage = std::string(it2->value().as_string());
      text = &text_storage;
    }
    ++cases;
    if (text) {
      auto got = t.Encode(*text, true);
      if (got != ids) {
        if (++encode_bad <= kMaxReports) {
          ADD_FAILURE() << name << " encode mismatch for: " << text->substr(0, 200) << "\n got " << got.size()
                        << " ids, want " << ids.size();
        }
      }
    }
    std::string dec = Expected(c, "dec", text, "");
    std::string dec_skip = Expected(c, "dec_skip", text, dec);
    if (!text && c.find("dec_skip") == c.end()) dec_skip = dec;
    std::string got_dec = t.Decode(ids, false), got_skip = t.Decode(ids, true);
    if (got_dec != dec || got_skip != dec_skip) {
      if (++decode_bad <= kMaxReports) {
        ADD_FAILURE() << name << " decode mismatch (ids " << c.at("ids").as_string().subview().substr(0, 80)
                      << ")\n got  '" << got_dec.substr(0, 200) << "'\n want '" << dec.substr(0, 200)
                      << "'\n got skip  '" << got_skip.substr(0, 200) << "'\n want skip '" << dec_skip.substr(0, 200) << "'";
      }
    }
    bool stream_ok = Stream(t, ids, false) == got_dec && Stream(t, ids, true) == got_skip;
    if (stream_ok && ids.size() >= 4) {
      // With the first half as the prompt, the stream adds what the prompt's decode lacks.
      std::span<const uint32_t> all(ids);
      size_t k = ids.size() / 2;
      std::string prompt_text = t.Decode(all.first(k), true);
      if (got_skip.compare(0, prompt_text.size(), prompt_text) == 0) {
        std::vector<uint32_t> rest(ids.begin() + static_cast<ptrdiff_t>(k), ids.end());
        stream_ok = Stream(t, rest, true, all.first(k)) == got_skip.substr(prompt_text.size());
      }
    }
    if (!stream_ok && ++stream_bad <= kMaxReports) {
      ADD_FAILURE() << name << " streaming decode differs from one-shot decode (ids "
                    << c.at("ids").as_string().subview().substr(0, 80) << ")";
    }
  }
  EXPECT_GT(cases, 0);
  EXPECT_EQ(encode_bad, 0) << name;
  EXPECT_EQ(decode_bad, 0) << name;
  EXPECT_EQ(stream_bad, 0) << name;
  std::cout << name << ": " << cases << " cases checked, " << skipped << " skipped\n";
}

TEST(TokenizerGolden, Qwen3) { RunGolden("qwen3"); }
TEST(TokenizerGolden, MistralNemo) { RunGolden("mistral-nemo"); }
TEST(TokenizerGolden, Gpt2) { RunGolden("gpt2"); }
TEST(TokenizerGolden, DeepSeekV3) { RunGolden("deepseek-v3"); }
TEST(TokenizerGolden, Mistral7B) { RunGolden("mistral-7b-v0.1"); }
TEST(TokenizerGolden, Stories260K) { RunGolden("stories260K"); }
TEST(TokenizerGolden, SmolLM2Gguf) { RunGolden("smollm2-gguf"); }

}  // namespace
}  // namespace dyn
