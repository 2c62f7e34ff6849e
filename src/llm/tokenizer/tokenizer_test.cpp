// Unit tests of the tokenizer's pieces. Expected values were produced with HF `tokenizers` 0.23
// (pre_tokenize_str / normalize_str / decoders) on the same inputs.
#include <gtest/gtest.h>

#include <boost/json.hpp>

#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "base/file.h"
#include "llm/gguf.h"
#include "llm/tokenizer/components.h"
#include "llm/tokenizer/tokenize_cli.h"
#include "llm/tokenizer/text_util.h"
#include "llm/tokenizer/tokenizer.h"

namespace dyn {
namespace {

const std::string kTok = "/work/shared/tokenizers/";
const std::string kStories = "/work/shared/models/stories260K/hf";

std::vector<std::string> PreTokenize(const std::string& json, const std::string& text) {
  auto p = tok::ParsePreTokenizer(boost::json::parse(json));
  EXPECT_TRUE(p.ok()) << p.status().ToString();
  std::vector<tok::Piece> pieces{{text, true}}, scratch;
  (*p)->PreTokenize(pieces, scratch);
  std::vector<std::string> out;
  for (auto& pc : pieces) out.push_back(pc.text);
  return out;
}

using V = std::vector<std::string>;

TEST(PreTokenizer, SplitBehaviors) {
  const std::string s = "Hey  friend!  How are-you?123 ok";
  auto split = [&](const char* behavior, bool invert) {
    return PreTokenize(std::string(R"({"type":"Split","pattern":{"Regex":"[ \\-]"},"behavior":")") + behavior +
                           R"(","invert":)" + (invert ? "true" : "false") + "}",
                       s);
  };
  EXPECT_EQ(split("Removed", false), (V{"Hey", "friend!", "How", "are", "you?123", "ok"}));
  EXPECT_EQ(split("Removed", true), (V{" ", " ", " ", " ", " ", "-", " "}));
  EXPECT_EQ(split("Isolated", false),
            (V{"Hey", " ", " ", "friend!", " ", " ", "How", " ", "are", "-", "you?123", " ", "ok"}));
  EXPECT_EQ(split("MergedWithPrevious", false), (V{"Hey ", " ", "friend! ", " ", "How ", "are-", "you?123 ", "ok"}));
  EXPECT_EQ(split("MergedWithPrevious", true), (V{"Hey", " ", " friend!", " ", " How", " are", "-you?123", " ok"}));
  EXPECT_EQ(split("MergedWithNext", false), (V{"Hey", " ", " friend!", " ", " How", " are", "-you?123", " ok"}));
  EXPECT_EQ(split("MergedWithNext", true), (V{"Hey ", " ", "friend! ", " ", "How ", "are-", "you?123 ", "ok"}));
  EXPECT_EQ(split("Contiguous", false),
            (V{"Hey", "  ", "friend!", "  ", "How", " ", "are", "-", "you?123", " ", "ok"}));
}

TEST(PreTokenizer, Others) {
  EXPECT_EQ(PreTokenize(R"({"type":"Digits","individual_digits":true})", "a12b345"),
            (V{"a", "1", "2", "b", "3", "4", "5"}));
  EXPECT_EQ(PreTokenize(R"({"type":"Digits","individual_digits":false})", "a12b345"), (V{"a", "12", "b", "345"}));
  EXPECT_EQ(PreTokenize(R"({"type":"Whitespace"})", "Hello, world!  foo_bar"),
            (V{"Hello", ",", "world", "!", "foo_bar"}));
  EXPECT_EQ(PreTokenize(R"({"type":"WhitespaceSplit"})", "Hello, world!  foo_bar"), (V{"Hello,", "world!", "foo_bar"}));
  EXPECT_EQ(PreTokenize(R"({"type":"Punctuation"})", "Hello, world!!"), (V{"Hello", ",", " world", "!", "!"}));
  EXPECT_EQ(PreTokenize(R"({"type":"Metaspace","replacement":"▁","prepend_scheme":"always","split":true})",
                        "Hello my  friend"),
            (V{"▁Hello", "▁my", "▁", "▁friend"}));
  EXPECT_EQ(PreTokenize(R"({"type":"Metaspace","replacement":"▁","prepend_scheme":"never","split":false})",
                        "Hello my  friend"),
            (V{"Hello▁my▁▁friend"}));
  EXPECT_EQ(PreTokenize(R"({"type":"ByteLevel","add_prefix_space":true,"use_regex":true})", "Hello wörld"),
            (V{"ĠHello", "ĠwÃ¶rld"}));
}

std::string Normalize(const std::string& json, std::string text) {
  auto n = tok::ParseNormalizer(boost::json::parse(json));
  EXPECT_TRUE(n.ok()) << n.status().ToString();
  (*n)->Normalize(text);
  return text;
}

TEST(Normalizer, UnicodeFormsCaseStrip) {
  const std::string s = "  \uFB01 E\u0301e\u0301 \u0130STANBUL  x  ";
  EXPECT_EQ(Normalize(R"({"type":"NFC"})", s), "  \uFB01 \u00C9\u00E9 \u0130STANBUL  x  ");
  EXPECT_EQ(Normalize(R"({"type":"NFD"})", s), "  \uFB01 E\u0301e\u0301 I\u0307STANBUL  x  ");
  EXPECT_EQ(Normalize(R"({"type":"NFKC"})", s), "  fi \u00C9\u00E9 \u0130STANBUL  x  ");
  EXPECT_EQ(Normalize(R"({"type":"NFKD"})", s), "  fi E\u0301e\u0301 I\u0307STANBUL  x  ");
  EXPECT_EQ(Normalize(R"({"type":"Lowercase"})", s), "  \uFB01 e\u0301e\u0301 i\u0307stanbul  x  ");
  EXPECT_EQ(Normalize(R"({"type":"Strip","strip_left":true,"strip_right":true})", s),
            "\uFB01 E\u0301e\u0301 \u0130STANBUL  x");
  EXPECT_EQ(Normalize(R"({"type":"Sequence","normalizers":[{"type":"Prepend","prepend":"▁"},
                        {"type":"Replace","pattern":{"String":" "},"content":"▁"}]})",
                      "a b"),
            "▁a▁b");
  EXPECT_EQ(Normalize(R"({"type":"Replace","pattern":{"Regex":"\\s+"},"content":" "})", " a \t\n b "), " a b ");
}

std::string DecodeWith(const std::string& json, std::vector<std::string> tokens) {
  auto d = tok::ParseDecoder(boost::json::parse(json));
  EXPECT_TRUE(d.ok()) << d.status().ToString();
  (*d)->DecodeChain(tokens);
  std::string out;
  for (auto& t : tokens) out += t;
  return out;
}

TEST(Decoder, SentencePieceByteFallbackMetaspace) {
  EXPECT_EQ(DecodeWith(R"({"type":"Sequence","decoders":[{"type":"Replace","pattern":{"String":"▁"},"content":" "},
                         {"type":"ByteFallback"},{"type":"Fuse"},{"type":"Strip","content":" ","start":1,"stop":0}]})",
                       {"▁Hi", "<0xE2>", "<0x82>", "▁x", "<0xE2>", "<0x82>", "<0xAC>"}),
            "Hi\uFFFD\uFFFD x\u20AC");
  EXPECT_EQ(DecodeWith(R"({"type":"Metaspace","replacement":"▁","prepend_scheme":"always"})", {"▁Hi", "▁there"}),
            "Hi there");
  EXPECT_EQ(DecodeWith(R"({"type":"Metaspace","replacement":"▁","prepend_scheme":"never"})", {"▁Hi", "▁there"}),
            " Hi there");
  EXPECT_EQ(DecodeWith(R"({"type":"ByteLevel"})", {"Hello", "Ġw", "Ã¶", "rld", "<|x|>"}), "Hello wörld<|x|>");
}

TEST(TextUtil, LossyUtf8MatchesPythonReplace) {
  // Python: b"\xe2\x82A\xff\xf0\x9f\x98".decode("utf-8", "replace") == "\ufffdA\ufffd\ufffd"
  EXPECT_EQ(tok::Utf8Lossy("\xE2\x82" "A\xFF\xF0\x9F\x98"), "\uFFFD" "A\uFFFD\uFFFD");
  EXPECT_EQ(tok::Utf8Lossy("\xED\xA0\x80"), "\uFFFD\uFFFD\uFFFD");  // surrogates are invalid
  EXPECT_TRUE(tok::IsValidUtf8("h\u00E9\U0001F600"));
  EXPECT_FALSE(tok::IsValidUtf8("\xC0\xAF"));
}

TEST(Tokenizer, Stories260KReferenceCases) {
  auto ref = ReadFile("/work/shared/models/stories260K/reference.json");
  if (!ref.ok()) GTEST_SKIP() << "no stories260K";
  auto tok = Tokenizer::FromDirectory(kStories);
  ASSERT_TRUE(tok.ok()) << tok.status().ToString();
  auto cases = boost::json::parse(*ref).at("tokenizer_cases").as_array();
  ASSERT_FALSE(cases.empty());
  for (const auto& c : cases) {
    std::vector<uint32_t> want;
    for (const auto& id : c.at("ids").as_array()) want.push_back(static_cast<uint32_t>(id.to_number<int64_t>()));
    std::string text(c.at("text").as_string());
    EXPECT_EQ((*tok)->Encode(text), want) << text;
    EXPECT_EQ((*tok)->Decode(want), text);
  }
  const auto& info = (*tok)->info();
  EXPECT_TRUE(info.add_bos);
  EXPECT_FALSE(info.add_eos);
  EXPECT_EQ(info.bos_id, 1u);
  EXPECT_EQ(info.eos_id, 2u);
  EXPECT_EQ(info.bos_token, "<s>");
}

TEST(Tokenizer, InfoFromConfig) {
  auto qwen = Tokenizer::FromDirectory(kTok + "qwen3");
  ASSERT_TRUE(qwen.ok()) << qwen.status().ToString();
  EXPECT_FALSE((*qwen)->info().chat_template.empty());
  EXPECT_EQ((*qwen)->info().eos_token, "<|im_end|>");
  EXPECT_EQ((*qwen)->info().eos_id, (*qwen)->TokenToId("<|im_end|>"));
  EXPECT_FALSE((*qwen)->info().add_bos);
  EXPECT_TRUE((*qwen)->IsSpecial(*(*qwen)->TokenToId("<|im_start|>")));
  EXPECT_FALSE((*qwen)->IsSpecial(*(*qwen)->TokenToId("<think>")));
  EXPECT_EQ((*qwen)->vocab_size(), 151669u);
  EXPECT_EQ((*qwen)->IdToToken(9707), "Hello");
  // DeepSeek-V3 asks for BOS in tokenizer_config.json, but its tokenizer.json post-processor is
  // ByteLevel: HF tokenizers and transformers 5 add no BOS, and neither does dyn.
  auto ds = Tokenizer::FromDirectory(kTok + "deepseek-v3");
  ASSERT_TRUE(ds.ok());
  EXPECT_FALSE((*ds)->info().add_bos);
  EXPECT_EQ((*ds)->info().bos_id, 0u);
}

TEST(Tokenizer, UnknownComponentsAreNamed) {
  std::string dir = ::testing::TempDir() + "/dyn_tok_unknown";
  std::string cmd = "mkdir -p " + dir;
  ASSERT_EQ(std::system(cmd.c_str()), 0);
  auto write = [&](const std::string& field, const std::string& json) {
    std::ofstream(dir + "/tokenizer.json")
        << R"({"model":{"type":"BPE","vocab":{"a":0},"merges":[]},)" << field << ":" << json << "}";
    return Tokenizer::FromDirectory(dir);
  };
  auto a = write(R"("pre_tokenizer")", R"({"type":"FancySplit"})");
  ASSERT_FALSE(a.ok());
  EXPECT_NE(a.status().message().find("FancySplit"), std::string::npos);
  auto b = write(R"("normalizer")", R"({"type":"Precompiled"})");
  EXPECT_NE(b.status().message().find("Precompiled"), std::string::npos);
  auto c = write(R"("decoder")", R"({"type":"WordPiece"})");
  EXPECT_NE(c.status().message().find("WordPiece"), std::string::npos);
  auto d = write(R"("post_processor")", R"({"type":"Mystery"})");
  EXPECT_NE(d.status().message().find("Mystery"), std::string::npos);
  std::ofstream(dir + "/tokenizer.json") << R"({"model":{"type":"Unigram","vocab":[]}})";
  auto e = Tokenizer::FromDirectory(dir);
  EXPECT_NE(e.status().message().find("Unigram"), std::string::npos);
}

TEST(Tokenizer, AddedTokenFlags) {
  // Expected ids from HF tokenizers for the same tokenizer.json.
  std::string dir = ::testing::TempDir() + "/dyn_tok_added";
  ASSERT_EQ(std::system(("mkdir -p " + dir).c_str()), 0);
  std::ofstream(dir + "/tokenizer.json") << R"({
    "added_tokens":[
      {"id":7,"content":"<L>","single_word":false,"lstrip":true,"rstrip":false,"normalized":false,"special":true},
      {"id":8,"content":"<R>","single_word":false,"lstrip":false,"rstrip":true,"normalized":false,"special":true},
      {"id":9,"content":"cat","single_word":true,"lstrip":false,"rstrip":false,"normalized":false,"special":false}],
    "pre_tokenizer":{"type":"WhitespaceSplit"},
    "model":{"type":"BPE","unk_token":"?","vocab":{"?":0,"a":1,"b":2,"c":3,"t":4,"s":5,"ab":6},"merges":["a b"]}})";
  auto tok = Tokenizer::FromDirectory(dir);
  ASSERT_TRUE(tok.ok()) << tok.status().ToString();
  const Tokenizer& t = **tok;
  EXPECT_EQ(t.Encode("ab  <L>ab"), (std::vector<uint32_t>{6, 7, 6}));
  EXPECT_EQ(t.Encode("ab<R>  ab"), (std::vector<uint32_t>{6, 8, 6}));
  EXPECT_EQ(t.Encode("a cat b"), (std::vector<uint32_t>{1, 9, 2}));
  EXPECT_EQ(t.Encode("cats"), (std::vector<uint32_t>{3, 1, 4, 5}));  // single_word: not inside a word
  EXPECT_EQ(t.Encode("xab"), (std::vector<uint32_t>{0, 6}));
  EXPECT_EQ(t.Decode(std::vector<uint32_t>{6, 7, 9}, true), "ab cat");
  EXPECT_EQ(t.Decode(std::vector<uint32_t>{6, 7, 9}, false), "ab <L> cat");
}

TEST(IncrementalDecoder, KeepsSentencePieceSpaceAfterPrompt) {
  auto tok = Tokenizer::FromDirectory(kTok + "mistral-7b-v0.1");
  ASSERT_TRUE(tok.ok());
  const Tokenizer& t = **tok;
  auto prompt = t.Encode("Hello");
  auto all = t.Encode("Hello world, how are you? 🦙");
  ASSERT_EQ(std::vector<uint32_t>(all.begin(), all.begin() + static_cast<ptrdiff_t>(prompt.size())), prompt);
  IncrementalDecoder dec(t, true, prompt);
  std::string out;
  for (size_t i = prompt.size(); i < all.size(); ++i) out += dec.Step(all[i]);
  out += dec.Finish();
  EXPECT_EQ(out, " world, how are you? 🦙");
  // Without context the leading space is stripped, as Decode does.
  IncrementalDecoder plain(t, true);
  std::string out2;
  for (size_t i = prompt.size(); i < all.size(); ++i) out2 += plain.Step(all[i]);
  out2 += plain.Finish();
  EXPECT_EQ(out2, t.Decode(std::span<const uint32_t>(all).subspan(prompt.size())));
  EXPECT_EQ(out2, "world, how are you? 🦙");
}

TEST(IncrementalDecoder, HoldsIncompleteUtf8) {
  auto tok = Tokenizer::FromDirectory(kTok + "gpt2");
  ASSERT_TRUE(tok.ok());
  const Tokenizer& t = **tok;
  auto ids = t.Encode("🦙", false);
  ASSERT_GT(ids.size(), 1u);
  IncrementalDecoder dec(t, true);
  for (size_t i = 0; i + 1 < ids.size(); ++i) EXPECT_EQ(dec.Step(ids[i]), "");
  EXPECT_EQ(dec.Step(ids.back()), "🦙");
  EXPECT_EQ(dec.Finish(), "");
  IncrementalDecoder cut(t, true);
  cut.Step(ids[0]);
  EXPECT_EQ(cut.Finish(), t.Decode(std::span<const uint32_t>(ids).first(1)));
}

// Found by tokenizer_fuzz: an id Decode drops (past the vocabulary, as a padded embedding table
// can sample) between two byte pieces must not split their group, or the stream would emit a
// lone byte and half a replacement character.
TEST(IncrementalDecoder, DroppedIdDoesNotSplitByteGroup) {
  auto tok = Tokenizer::FromDirectory(kStories);
  ASSERT_TRUE(tok.ok());
  const Tokenizer& t = **tok;
  const std::vector<uint32_t> ids = {3 + 0x5B, 513, 3 + 0xFD};  // <0x5B>, unknown, <0xFD>
  IncrementalDecoder dec(t, true);
  std::string out;
  for (uint32_t id : ids) out += dec.Step(id);
  out += dec.Finish();
  EXPECT_EQ(out, t.Decode(ids));
}

// Found by tokenizer_fuzz: a prompt ending in ids that decode to nothing must not make the
// SentencePiece leading space of the first generated token disappear.
TEST(IncrementalDecoder, KeepsSpaceAfterPromptEndingInDroppedIds) {
  auto tok = Tokenizer::FromDirectory(kTok + "mistral-7b-v0.1");
  ASSERT_TRUE(tok.ok());
  const Tokenizer& t = **tok;
  std::vector<uint32_t> prompt = t.Encode("Hello", false);
  const uint32_t unknown = 1u << 30;
  for (int i = 0; i < 5; ++i) prompt.push_back(unknown);
  const std::vector<uint32_t> gen = t.Encode(" pens", false);
  std::vector<uint32_t> all = prompt;
  all.insert(all.end(), gen.begin(), gen.end());
  IncrementalDecoder dec(t, true, prompt);
  std::string out;
  for (uint32_t id : gen) out += dec.Step(id);
  out += dec.Finish();
  EXPECT_EQ(out, t.Decode(all).substr(t.Decode(prompt).size()));
  EXPECT_EQ(out.substr(0, 1), " ");
}

TEST(Tokenizer, GgufSmolLM2) {
  const std::string path = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
  if (!FileExists(path)) GTEST_SKIP() << path << " is absent";
  auto gguf = GgufFile::Open(path);
  ASSERT_TRUE(gguf.ok());
  auto tok = Tokenizer::FromGguf(**gguf);
  ASSERT_TRUE(tok.ok()) << tok.status().ToString();
  const auto& info = (*tok)->info();
  EXPECT_EQ(info.bos_id, 1u);
  EXPECT_EQ(info.eos_id, 2u);
  EXPECT_EQ(info.eos_token, "<|im_end|>");
  EXPECT_FALSE(info.add_bos);
  EXPECT_NE(info.chat_template.find("<|im_start|>"), std::string::npos);
  auto ids = (*tok)->Encode("<|im_start|>user\n2024<|im_end|>");
  EXPECT_EQ(ids.front(), 1u);
  EXPECT_EQ(ids.back(), 2u);
  EXPECT_EQ(ids.size(), 8u);  // special, "user", "\n", four digits one by one, special
  EXPECT_EQ((*tok)->Decode(ids, true), "user\n2024");
}

TEST(TokenizeCli, TokenizeAndDetokenize) {
  std::string model = kTok + "qwen3";
  std::vector<std::string> args = {"tokenize", "--model", model, "--text", "Hello world"};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  ::testing::internal::CaptureStdout();
  EXPECT_EQ(RunTokenizeCli(static_cast<int>(argv.size()), argv.data(), false), 0);
  EXPECT_EQ(::testing::internal::GetCapturedStdout(), "[9707,1879]\n");
  std::vector<std::string> dargs = {"detokenize", "--model", model, "--ids", "9707,1879"};
  argv.clear();
  for (auto& a : dargs) argv.push_back(a.data());
  ::testing::internal::CaptureStdout();
  EXPECT_EQ(RunTokenizeCli(static_cast<int>(argv.size()), argv.data(), true), 0);
  EXPECT_EQ(::testing::internal::GetCapturedStdout(), "\"Hello world\"\n");
  std::vector<std::string> bad = {"tokenize", "--model", "/nonexistent", "--text", "x"};
  argv.clear();
  for (auto& a : bad) argv.push_back(a.data());
  EXPECT_EQ(RunTokenizeCli(static_cast<int>(argv.size()), argv.data(), false), 1);
}

}  // namespace
}  // namespace dyn
