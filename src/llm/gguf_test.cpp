#include "llm/gguf.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>

namespace dyn {
namespace {

constexpr const char* kSmol = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

TEST(Gguf, RejectsNonGguf) {
  auto r = GgufFile::Open("../shared/models/stories260K/hf/config.json");
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("not a valid GGUF"), std::string::npos);
}

TEST(Gguf, RejectsTruncated) {
  if (!FileExists(kSmol)) GTEST_SKIP() << "run scripts/setup.sh to fetch " << kSmol;
  auto m = MappedFile::Open(kSmol);
  ASSERT_TRUE(m.ok());
  std::string path = testing::TempDir() + "/trunc.gguf";
  std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>((*m)->data()), 100000);
  auto r = GgufFile::Open(path);
  EXPECT_FALSE(r.ok());
  std::remove(path.c_str());
}

TEST(Gguf, ReadsSmolLM2) {
  if (!FileExists(kSmol)) GTEST_SKIP() << "run scripts/setup.sh to fetch " << kSmol;
  auto r = GgufFile::Open(kSmol);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  const GgufFile& g = **r;
  EXPECT_EQ(g.GetString("general.architecture").value_or(""), "llama");
  EXPECT_EQ(g.GetInt("llama.block_count").value_or(0), 30);
  ASSERT_NE(g.GetStringArray("tokenizer.ggml.tokens"), nullptr);
  EXPECT_EQ(g.GetStringArray("tokenizer.ggml.tokens")->size(), 49152u);
  const GgufTensor* t = g.FindTensor("token_embd.weight");
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->dims[0], 576u);
  EXPECT_NE(t->data, nullptr);
}

}  // namespace
}  // namespace dyn
