#include "workload/trace.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <set>

#include "base/file.h"

namespace dyn::workload {
namespace {

const char* kConversationTrace = "../shared/traces/mooncake/conversation_trace.jsonl";
const char* kSyntheticTrace = "../shared/traces/mooncake/synthetic_trace.jsonl";
const char* kAzureCodeTrace = "../shared/traces/azure2023/AzureLLMInferenceTrace_code.csv";

// A file under /tmp removed at the end of the test.
class TempFile {
 public:
  TempFile(const std::string& suffix, const std::string& content) {
    path_ = "/tmp/dyn_trace_test_" + std::to_string(getpid()) + "_" + std::to_string(counter_++) + suffix;
    std::ofstream(path_, std::ios::binary) << content;
  }
  ~TempFile() { std::remove(path_.c_str()); }
  const std::string& path() const { return path_; }

 private:
  static inline int counter_ = 0;
  std::string path_;
};

TEST(MooncakeTrace, ParsesLinesInOrder) {
  TempFile f(".jsonl",
             "{\"timestamp\": 0, \"input_length\": 700, \"output_length\": 5, \"hash_ids\": [0, 1]}\n"
             "\n"
             "{\"timestamp\": 27.5, \"input_length\": 10, \"output_length\": 1, \"hash_ids\": [0]}\n");
  auto trace = LoadMooncakeTrace(f.path());
  ASSERT_TRUE(trace.ok()) << trace.status().ToString();
  ASSERT_EQ(trace->size(), 2u);
  EXPECT_EQ((*trace)[0].input_length, 700);
  EXPECT_EQ((*trace)[0].output_length, 5);
  EXPECT_EQ((*trace)[0].hash_ids, (std::vector<uint64_t>{0, 1}));
  EXPECT_DOUBLE_EQ((*trace)[1].arrival_ms, 27.5);
}

TEST(MooncakeTrace, ErrorsNameTheLine) {
  TempFile bad_json(".jsonl", "{\"timestamp\": 0, \"input_length\": 1, \"output_length\": 1}\n{oops\n");
  auto r = LoadMooncakeTrace(bad_json.path());
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find(":2:"), std::string::npos) << r.status().message();

  TempFile missing(".jsonl", "{\"timestamp\": 0, \"output_length\": 1}");
  r = LoadMooncakeTrace(missing.path());
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find(":1:"), std::string::npos);
  EXPECT_NE(r.status().message().find("input_length"), std::string::npos);

  TempFile negative_id(".jsonl", "{\"timestamp\": 0, \"input_length\": 1, \"output_length\": 1, \"hash_ids\": [-3]}");
  EXPECT_FALSE(LoadMooncakeTrace(negative_id.path()).ok());
  EXPECT_FALSE(LoadMooncakeTrace("/nonexistent/trace.jsonl").ok());
}

TEST(AzureTrace, BomSevenDigitFractionsNoTrailingNewline) {
  TempFile f(".csv",
             "\xEF\xBB\xBFTIMESTAMP,ContextTokens,GeneratedTokens\r\n"
             "2023-11-16 18:17:03.9799600,4808,10\r\n"
             "2023-11-16 18:17:04.0000000,3180,8\r\n"
             "2023-11-17 00:00:00.5,1,2");
  auto trace = LoadAzureTrace(f.path());
  ASSERT_TRUE(trace.ok()) << trace.status().ToString();
  ASSERT_EQ(trace->size(), 3u);
  EXPECT_DOUBLE_EQ((*trace)[0].arrival_ms, 0);
  EXPECT_NEAR((*trace)[1].arrival_ms, 20.04, 1e-6);
  // 18:17:03.97996 -> next midnight + 0.5 s.
  EXPECT_NEAR((*trace)[2].arrival_ms, (5 * 3600 + 42 * 60 + 56.02004 + 0.5) * 1000, 1e-3);
  EXPECT_EQ((*trace)[0].input_length, 4808);
  EXPECT_EQ((*trace)[2].output_length, 2);
  EXPECT_TRUE((*trace)[0].hash_ids.empty());
}

TEST(AzureTrace, ErrorsNameTheLine) {
  TempFile bad_ts(".csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9,1,1\n2023-13-01 00:00:00,1,1\n");
  auto r = LoadAzureTrace(bad_ts.path());
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find(":3:"), std::string::npos) << r.status().message();

  TempFile bad_count(".csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9,x,1\n");
  r = LoadAzureTrace(bad_count.path());
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find(":2:"), std::string::npos);

  TempFile bad_header(".csv", "time,in,out\n");
  EXPECT_FALSE(LoadAzureTrace(bad_header.path()).ok());
}

TEST(LoadTrace, PicksLoaderBySuffix) {
  TempFile csv(".csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03,5,6\n");
  auto r = LoadTrace(csv.path());
  ASSERT_TRUE(r.ok());
  EXPECT_EQ((*r)[0].input_length, 5);
  EXPECT_FALSE(LoadTrace("/tmp/trace.txt").ok());
}

TEST(Synthesis, SameIdSameTokensAndExactLength) {
  PromptSynthesis synth;
  TraceRequest a{0, 700, 1, {7, 8}};
  TraceRequest b{0, 1100, 1, {7, 9, 10}};
  auto pa = SynthesizePrompt(a, 0, synth);
  auto pb = SynthesizePrompt(b, 1, synth);
  ASSERT_EQ(pa.size(), 700u);
  ASSERT_EQ(pb.size(), 1100u);
  EXPECT_TRUE(std::equal(pa.begin(), pa.begin() + 512, pb.begin()));
  EXPECT_FALSE(std::equal(pa.begin() + 512, pa.end(), pb.begin() + 512));
  auto block = HashIdBlock(8, synth);
  ASSERT_EQ(block.size(), 512u);
  EXPECT_TRUE(std::equal(pa.begin() + 512, pa.end(), block.begin()));
  for (uint32_t t : pb) {
    EXPECT_GE(t, synth.first_token);
    EXPECT_LT(t, synth.vocab_size);
  }
  // Deterministic; a different seed changes tokens.
  EXPECT_EQ(pa, SynthesizePrompt(a, 0, synth));
  PromptSynthesis other = synth;
  other.seed = 1;
  EXPECT_NE(pa, SynthesizePrompt(a, 0, other));
  // Not constant: a block has many distinct tokens.
  EXPECT_GT(std::set<uint32_t>(block.begin(), block.end()).size(), 400u);
}

TEST(Synthesis, NoIdsMeansUniquePerRequest) {
  PromptSynthesis synth;
  TraceRequest r{0, 300, 1, {}};
  auto p0 = SynthesizePrompt(r, 0, synth);
  auto p1 = SynthesizePrompt(r, 1, synth);
  ASSERT_EQ(p0.size(), 300u);
  EXPECT_NE(p0, p1);
  EXPECT_EQ(p0, SynthesizePrompt(r, 0, synth));
  // Too few ids: the remainder is unique filler, still exact length.
  TraceRequest short_ids{0, 1000, 1, {3}};
  EXPECT_EQ(SynthesizePrompt(short_ids, 5, synth).size(), 1000u);
}

TEST(HitRatio, HandMadeChains) {
  std::vector<TraceRequest> reqs = {
      {0, 1024, 1, {1, 2}},       // nothing seen
      {0, 1200, 1, {1, 2, 3}},    // 2 blocks hit = 1024
      {0, 600, 1, {4, 2}},        // different first block: chain differs, no hit
      {0, 300, 1, {1}},           // 1 block, capped at 300
  };
  double expected = (1024.0 + 300.0) / (1024 + 1200 + 600 + 300);
  EXPECT_DOUBLE_EQ(InfiniteCacheHitRatio(reqs, 512), expected);
  std::vector<std::vector<uint32_t>> prompts;
  PromptSynthesis synth;
  for (size_t i = 0; i < reqs.size(); ++i) prompts.push_back(SynthesizePrompt(reqs[i], i, synth));
  // The prompt-based ratio treats [1] cut to 300 tokens as a new short block: a miss.
  EXPECT_DOUBLE_EQ(InfiniteCacheHitRatioOfPrompts(prompts, 512), 1024.0 / (1024 + 1200 + 600 + 300));
  EXPECT_DOUBLE_EQ(InfiniteCacheHitRatio({}, 512), 0.0);
}

TEST(ScaleTrace, SpeedupMaxAndLimit) {
  std::vector<TraceRequest> reqs = {{0, 1, 1, {}}, {1000, 1, 1, {}}, {2000, 1, 1, {}}, {3000, 1, 1, {}}};
  auto scaled = ScaleTrace(reqs, 10);
  ASSERT_EQ(scaled.size(), 4u);
  EXPECT_DOUBLE_EQ(scaled[3].arrival_ms, 300);
  EXPECT_EQ(ScaleTrace(reqs, 10, 250).size(), 3u);
  EXPECT_EQ(ScaleTrace(reqs, 1, 0, 2).size(), 2u);
}

TEST(RealTraces, PublishedInfiniteCacheRatios) {
  if (!FileExists(kConversationTrace) || !FileExists(kSyntheticTrace)) GTEST_SKIP() << "traces absent";
  auto conv = LoadMooncakeTrace(kConversationTrace);
  ASSERT_TRUE(conv.ok()) << conv.status().ToString();
  EXPECT_EQ(conv->size(), 12031u);
  double conv_ratio = InfiniteCacheHitRatio(*conv);
  std::printf("conversation_trace: %zu requests, infinite-cache hit ratio %.4f\n", conv->size(), conv_ratio);
  EXPECT_NEAR(conv_ratio, 0.374, 0.0005);

  auto syn = LoadMooncakeTrace(kSyntheticTrace);
  ASSERT_TRUE(syn.ok());
  EXPECT_EQ(syn->size(), 3993u);
  double syn_ratio = InfiniteCacheHitRatio(*syn);
  std::printf("synthetic_trace: %zu requests, infinite-cache hit ratio %.4f\n", syn->size(), syn_ratio);
  EXPECT_NEAR(syn_ratio, 0.651, 0.0005);
}

TEST(RealTraces, PromptRatioEqualsIdRatio) {
  if (!FileExists(kConversationTrace)) GTEST_SKIP() << "trace absent";
  auto conv = LoadMooncakeTrace(kConversationTrace);
  ASSERT_TRUE(conv.ok());
  std::span<const TraceRequest> head(conv->data(), std::min<size_t>(2000, conv->size()));
  PromptSynthesis synth;
  std::vector<std::vector<uint32_t>> prompts;
  for (size_t i = 0; i < head.size(); ++i) {
    prompts.push_back(SynthesizePrompt(head[i], i, synth));
    ASSERT_EQ(prompts.back().size(), static_cast<size_t>(head[i].input_length));
  }
  double by_ids = InfiniteCacheHitRatio(head);
  double by_prompts = InfiniteCacheHitRatioOfPrompts(prompts);
  std::printf("first %zu requests: ids %.6f prompts %.6f\n", head.size(), by_ids, by_prompts);
  EXPECT_GT(by_ids, 0.1);
  EXPECT_DOUBLE_EQ(by_ids, by_prompts);
}

TEST(RealTraces, AzureLoads) {
  if (!FileExists(kAzureCodeTrace)) GTEST_SKIP() << "trace absent";
  auto r = LoadAzureTrace(kAzureCodeTrace);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->size(), 8819u);
  EXPECT_DOUBLE_EQ(r->front().arrival_ms, 0);
  EXPECT_GT(r->back().arrival_ms, 50 * 60 * 1000.0);
  EXPECT_LT(r->back().arrival_ms, 60 * 60 * 1000.0);
}

}  // namespace
}  // namespace dyn::workload
