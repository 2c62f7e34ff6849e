// Model tests against golden data: stories260K (Hugging Face transformers fp32 goldens in
// reference.json) and SmolLM2-135M Q4_1 GGUF (numpy reference from scripts/ref_forward.py).
#include <gtest/gtest.h>

#include <algorithm>
#include <boost/json.hpp>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "base/file.h"
#include "engine/native/model/model.h"

namespace dyn {
namespace {

namespace json = boost::json;
const char* kStoriesDir = "../shared/models/stories260K/hf";
const char* kStoriesRef = "../shared/models/stories260K/reference.json";
const char* kSmolGguf = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
const char* kSmolRef = "src/engine/native/model/testdata/smollm2_q4_1_reference.json";

json::value ReadJson(const std::string& path) {
  auto text = ReadFile(path);
  EXPECT_TRUE(text.ok()) << path;
  return text.ok() ? json::parse(*text) : json::value();
}

std::vector<uint32_t> Ids(const json::value& v) {
  std::vector<uint32_t> out;
  for (const auto& x : v.as_array()) out.push_back(static_cast<uint32_t>(x.to_number<int64_t>()));
  return out;
}

uint32_t Argmax(const float* x, int n) { return static_cast<uint32_t>(std::max_element(x, x + n) - x); }

std::unique_ptr<Model> Load(const std::string& path, int threads = 0) {
  ModelLoadOptions opt;
  opt.num_threads = threads;
  auto m = LoadModel(path, opt);
  EXPECT_TRUE(m.ok()) << m.status().ToString();
  return m.ok() ? std::move(m).value() : nullptr;
}

// Drives one sequence: a block table of scattered block ids, prefill in chunks, then greedy decode.
class Sequence {
 public:
  Sequence(Model& model, std::vector<int32_t> blocks) : model_(model), blocks_(std::move(blocks)) {}

  // Feeds tokens (one Forward) and returns the logits of the last one.
  std::vector<float> Feed(std::span<const uint32_t> tokens) {
    ForwardSeq f;
    f.tokens = tokens;
    f.start_pos = pos_;
    f.block_table = blocks_;
    std::vector<float> logits(model_.config().vocab_size);
    Status s = model_.Forward(std::span<const ForwardSeq>(&f, 1), logits.data());
    EXPECT_TRUE(s.ok()) << s.ToString();
    pos_ += static_cast<int>(tokens.size());
    return logits;
  }

  // Prefills `prompt` in chunks of chunk_size, then decodes greedily.
  std::vector<uint32_t> Greedy(const std::vector<uint32_t>& prompt, size_t chunk_size, int steps) {
    std::vector<float> logits;
    for (size_t i = 0; i < prompt.size(); i += chunk_size) {
      logits = Feed(std::span(prompt).subspan(i, std::min(chunk_size, prompt.size() - i)));
    }
    std::vector<uint32_t> out;
    for (int s = 0; s < steps; ++s) {
      uint32_t next = Argmax(logits.data(), static_cast<int>(logits.size()));
      out.push_back(next);
      if (s + 1 < steps) logits = Feed(std::span<const uint32_t>(&out.back(), 1));
    }
    return out;
  }

 private:
  Model& model_;
  std::vector<int32_t> blocks_;
  int pos_ = 0;
};

std::vector<int32_t> ScatteredBlocks(int n, int num_blocks) {
  std::vector<int32_t> b;
  for (int i = 0; i < n; ++i) b.push_back((i * 7 + 5) % num_blocks);  // 7 is coprime with num_blocks below
  return b;
}

TEST(StoriesModel, LoadsConfig) {
  auto model = Load(kStoriesDir);
  ASSERT_TRUE(model);
  const ModelConfig& c = model->config();
  EXPECT_EQ(c.architecture, "llama");
  EXPECT_EQ(c.num_layers, 5);
  EXPECT_EQ(c.num_kv_heads, 4);
  EXPECT_EQ(c.head_dim, 8);
  EXPECT_TRUE(c.tie_word_embeddings);
  ASSERT_EQ(c.eos_token_ids.size(), 1u);
  EXPECT_EQ(c.eos_token_ids[0], 2u);
  EXPECT_EQ(model->KvBytesPerToken(), 5u * 2 * 4 * 8 * 4);
}

TEST(StoriesModel, FirstStepLogitsMatchTransformers) {
  auto model = Load(kStoriesDir);
  ASSERT_TRUE(model);
  json::value ref = ReadJson(kStoriesRef);
  ASSERT_TRUE(model->InitKvCache(64, 16).ok());
  Sequence seq(*model, ScatteredBlocks(32, 64));
  const uint32_t bos = 1;
  std::vector<float> logits = seq.Feed(std::span<const uint32_t>(&bos, 1));
  std::vector<int> order(logits.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int>(i);
  std::partial_sort(order.begin(), order.begin() + 5, order.end(), [&](int a, int b) { return logits[a] > logits[b]; });
  const auto& top5 = ref.at("first_step_top5_logits_after_bos").as_array();
  for (int i = 0; i < 5; ++i) {
    const double want_logit = top5[i].as_array()[0].to_number<double>();
    const int want_id = static_cast<int>(top5[i].as_array()[1].to_number<int64_t>());
    EXPECT_EQ(order[i], want_id) << "rank " << i;
    EXPECT_NEAR(logits[want_id], want_logit, 1e-4) << "token " << want_id;
  }
}

struct StoriesCase {
  int block_size;
  size_t chunk;  // prefill chunk size (1 = token by token)
};

class StoriesGreedy : public ::testing::TestWithParam<StoriesCase> {};

TEST_P(StoriesGreedy, MatchesGoldens) {
  const StoriesCase p = GetParam();
  auto model = Load(kStoriesDir);
  ASSERT_TRUE(model);
  json::value ref = ReadJson(kStoriesRef);
  const int num_blocks = 512 / p.block_size + 8;
  ASSERT_TRUE(model->InitKvCache(num_blocks, p.block_size).ok());
  const auto& cases = ref.at("cases").as_array();
  {
    Sequence seq(*model, ScatteredBlocks(512 / p.block_size, num_blocks));
    EXPECT_EQ(seq.Greedy(Ids(cases[0].at("prompt_ids_with_bos")), p.chunk, 40), Ids(cases[0].at("greedy_ids_40")));
  }
  {
    const std::vector<uint32_t> want = Ids(cases[1].at("continuation_ids"));
    Sequence seq(*model, ScatteredBlocks(512 / p.block_size, num_blocks));
    EXPECT_EQ(seq.Greedy(Ids(cases[1].at("prompt_ids_with_bos")), p.chunk, static_cast<int>(want.size())), want);
  }
}

INSTANTIATE_TEST_SUITE_P(Layouts, StoriesGreedy,
                         ::testing::Values(StoriesCase{16, 1}, StoriesCase{16, 100}, StoriesCase{16, 2}, StoriesCase{4, 3},
                                           StoriesCase{1, 100}),
                         [](const auto& info) {
                           return "block" + std::to_string(info.param.block_size) + "_chunk" + std::to_string(info.param.chunk);
                         });

// Runs several sequences in one Forward and each alone; logits must agree.
void CheckBatchInvariance(Model& model, const std::vector<std::vector<uint32_t>>& prompts, int decode_steps, float tol) {
  const int V = model.config().vocab_size;
  const int bs = 16, per_seq = 16;
  ASSERT_TRUE(model.InitKvCache(per_seq * static_cast<int>(prompts.size()) * 2, bs).ok());
  auto blocks_of = [&](size_t s, int copy) {
    std::vector<int32_t> b;
    for (int i = 0; i < per_seq; ++i) b.push_back(static_cast<int32_t>((copy * prompts.size() + s) * per_seq + i));
    std::reverse(b.begin(), b.end());
    return b;
  };
  // Alone (copy 0).
  std::vector<std::vector<std::vector<float>>> alone(prompts.size());
  std::vector<std::vector<uint32_t>> tokens(prompts.size());
  for (size_t s = 0; s < prompts.size(); ++s) {
    Sequence seq(model, blocks_of(s, 0));
    std::vector<float> logits = seq.Feed(prompts[s]);
    alone[s].push_back(logits);
    for (int step = 0; step < decode_steps; ++step) {
      tokens[s].push_back(Argmax(logits.data(), V));
      logits = seq.Feed(std::span<const uint32_t>(&tokens[s].back(), 1));
      alone[s].push_back(logits);
    }
  }
  // Together (copy 1): one Forward per step carrying every sequence.
  std::vector<std::vector<int32_t>> tables;
  for (size_t s = 0; s < prompts.size(); ++s) tables.push_back(blocks_of(s, 1));
  std::vector<float> logits(prompts.size() * V);
  float max_diff = 0;
  for (int step = 0; step <= decode_steps; ++step) {
    std::vector<ForwardSeq> batch(prompts.size());
    for (size_t s = 0; s < prompts.size(); ++s) {
      batch[s].block_table = tables[s];
      if (step == 0) {
        batch[s].tokens = prompts[s];
        batch[s].start_pos = 0;
      } else {
        batch[s].tokens = std::span<const uint32_t>(&tokens[s][step - 1], 1);
        batch[s].start_pos = static_cast<int>(prompts[s].size()) + step - 1;
      }
    }
    ASSERT_TRUE(model.Forward(batch, logits.data()).ok());
    for (size_t s = 0; s < prompts.size(); ++s)
      for (int i = 0; i < V; ++i) max_diff = std::max(max_diff, std::fabs(logits[s * V + i] - alone[s][step][i]));
  }
  EXPECT_LE(max_diff, tol);
  std::printf("batch invariance: max |diff| = %g over %zu sequences\n", max_diff, prompts.size());
}

TEST(StoriesModel, BatchedSequencesMatchAlone) {
  auto model = Load(kStoriesDir);
  ASSERT_TRUE(model);
  CheckBatchInvariance(*model, {{1, 403, 407, 261, 378}, {1}, {1, 274, 287, 269, 301, 314}, {1, 346, 306}}, 12, 1e-5f);
}

TEST(StoriesModel, RejectsBadInput) {
  auto model = Load(kStoriesDir);
  ASSERT_TRUE(model);
  const uint32_t tok = 1, bad_tok = 100000;
  std::vector<float> logits(512);
  ForwardSeq f;
  f.tokens = std::span<const uint32_t>(&tok, 1);
  EXPECT_FALSE(model->Forward(std::span<const ForwardSeq>(&f, 1), logits.data()).ok());  // no KV cache yet
  ASSERT_TRUE(model->InitKvCache(4, 16).ok());
  EXPECT_EQ(model->Forward(std::span<const ForwardSeq>(&f, 1), logits.data()).code(), StatusCode::kInvalidArgument);
  const int32_t block = 9;
  f.block_table = std::span<const int32_t>(&block, 1);
  EXPECT_EQ(model->Forward(std::span<const ForwardSeq>(&f, 1), logits.data()).code(), StatusCode::kInvalidArgument);
  const int32_t good_block = 3;
  f.block_table = std::span<const int32_t>(&good_block, 1);
  f.tokens = std::span<const uint32_t>(&bad_tok, 1);
  EXPECT_EQ(model->Forward(std::span<const ForwardSeq>(&f, 1), logits.data()).code(), StatusCode::kInvalidArgument);
}

TEST(ModelLoader, UnsupportedArchitectureIsNamed) {
  const auto dir = std::filesystem::temp_directory_path() / ("dyn_model_test_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "config.json") << R"({"architectures": ["GPT2LMHeadModel"], "hidden_size": 8})";
  auto m = LoadModel(dir.string());
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), StatusCode::kUnsupported);
  EXPECT_NE(m.status().message().find("GPT2LMHeadModel"), std::string::npos) << m.status().message();
  std::filesystem::remove_all(dir);
  EXPECT_EQ(LoadModel("/nonexistent/model").status().code(), StatusCode::kNotFound);
}

// --load-format dummy: config.json alone, random bf16 weights (host memory on the CPU backend).
TEST(ModelLoader, DummyLoadFormatNeedsOnlyConfig) {
  const auto dir = std::filesystem::temp_directory_path() / ("dyn_model_dummy_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "config.json") << R"({"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64,
      "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
      "vocab_size": 300, "max_position_embeddings": 256, "tie_word_embeddings": true})";
  EXPECT_EQ(LoadModel(dir.string()).status().code(), StatusCode::kNotFound);  // no weight files
  ModelLoadOptions opt;
  opt.num_threads = 2;
  opt.load_format = "dummy";
  std::vector<std::vector<float>> runs;
  for (int run = 0; run < 2; ++run) {
    auto m = LoadModel(dir.string(), opt);
    ASSERT_TRUE(m.ok()) << m.status().ToString();
    Model& model = **m;
    EXPECT_EQ(model.config().architecture, "qwen2");
    EXPECT_EQ(model.config().head_dim, 16);
    EXPECT_NE(model.Describe().find("dummy"), std::string::npos) << model.Describe();
    ASSERT_TRUE(model.InitKvCache(4, 16).ok());
    Sequence seq(model, {2, 0});
    const std::vector<uint32_t> prompt = {1, 17, 250, 3};
    std::vector<float> logits = seq.Feed(prompt);
    logits = seq.Feed(std::span<const uint32_t>(&prompt[1], 1));
    ASSERT_EQ(logits.size(), 300u);
    for (float x : logits) ASSERT_TRUE(std::isfinite(x));
    const auto [lo, hi] = std::minmax_element(logits.begin(), logits.end());
    EXPECT_GT(*hi - *lo, 1e-3f);  // random weights give distinct logits, not a constant
    runs.push_back(std::move(logits));
  }
  EXPECT_EQ(runs[0], runs[1]);  // the same weights every load
  opt.load_format = "safetensors";
  EXPECT_EQ(LoadModel(dir.string(), opt).status().code(), StatusCode::kInvalidArgument);
  opt.load_format = "dummy";
  EXPECT_EQ(LoadModel((dir / "config.json").string(), opt).status().code(), StatusCode::kInvalidArgument);
  std::filesystem::remove_all(dir);
}

// Teacher-forced greedy steps of the SmolLM2 numpy reference (exact F32 arithmetic over the
// dequantized Q4_1 weights). A differing argmax is allowed only where the reference's top two are
// closer than `max_flip_gap`; returns the worst |logit error| of the reference's top-1 token.
double CheckSmolReference(Model& model, double max_flip_gap, size_t* agree_out, size_t* steps_out) {
  json::value ref = ReadJson(kSmolRef);
  EXPECT_TRUE(model.InitKvCache(64, 16).ok());
  double worst = 0;
  for (const auto& c : ref.at("cases").as_array()) {
    const std::vector<uint32_t> prompt = Ids(c.at("prompt_ids"));
    const std::vector<uint32_t> want = Ids(c.at("greedy_ids"));
    const auto& top = c.at("step_top2").as_array();  // per step: [[id, logit], [id, logit]]
    Sequence seq(model, ScatteredBlocks(32, 64));
    std::vector<float> logits = seq.Feed(prompt);
    int agree = 0;
    double max_err = 0;
    for (size_t step = 0; step < want.size(); ++step) {
      const uint32_t got = Argmax(logits.data(), static_cast<int>(logits.size()));
      const auto& t = top[step].as_array();
      const uint32_t ref1 = static_cast<uint32_t>(t[0].as_array()[0].to_number<int64_t>());
      const double ref1_logit = t[0].as_array()[1].to_number<double>();
      const double gap = ref1_logit - t[1].as_array()[1].to_number<double>();
      max_err = std::max(max_err, std::fabs(logits[ref1] - ref1_logit));
      // The reference's tokens are fed back either way (teacher forcing), so later steps still compare.
      if (got == ref1) ++agree;
      else EXPECT_LT(gap, max_flip_gap) << "step " << step << " got " << got << " want " << ref1;
      if (step + 1 < want.size()) logits = seq.Feed(std::span<const uint32_t>(&want[step], 1));
    }
    std::printf("SmolLM2 case: %d/%zu greedy steps agree, max |logit diff| of top-1 %g\n", agree, want.size(), max_err);
    *agree_out += agree;
    *steps_out += want.size();
    worst = std::max(worst, max_err);
  }
  return worst;
}

TEST(SmolLM2Gguf, MatchesNumpyReference) {
  if (!FileExists(kSmolGguf)) GTEST_SKIP() << kSmolGguf << " absent";
  auto model = Load(kSmolGguf);
  ASSERT_TRUE(model);
  std::printf("%s\n", model->Describe().c_str());
  EXPECT_EQ(model->config().architecture, "llama");
  EXPECT_EQ(model->config().vocab_size, 49152);
  // dyn (like llama.cpp) rounds activations to 8 bits before quantized matmuls, which moves
  // logits by a few tenths against the exact float reference: only near-ties may flip.
  size_t agree = 0, steps = 0;
  EXPECT_LT(CheckSmolReference(*model, 0.5, &agree, &steps), 1.5);  // typical 0.4-0.9 through 30 layers
  EXPECT_GE(agree * 10, steps * 9);                                  // at least 90% of the greedy steps
}

// With the weights converted to F32 at load the CPU backend computes what the reference computes
// (float sums in another order): every greedy step agrees and the logits are within float rounding.
// dyn_cuda_compare --cpu-weights f32 measures the GPU against this reference.
TEST(SmolLM2Gguf, WeightsF32MatchNumpyReferenceExactly) {
  if (!FileExists(kSmolGguf)) GTEST_SKIP() << kSmolGguf << " absent";
  ModelLoadOptions opt;
  opt.convert_weights = "f32";
  auto m = LoadModel(kSmolGguf, opt);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  EXPECT_NE((*m)->Describe().find("attn_q F32"), std::string::npos) << (*m)->Describe();
  size_t agree = 0, steps = 0;
  EXPECT_LT(CheckSmolReference(**m, 0.0, &agree, &steps), 1e-3);  // measured 3e-5
  EXPECT_EQ(agree, steps);
}

TEST(SmolLM2Gguf, BatchedSequencesMatchAlone) {
  if (!FileExists(kSmolGguf)) GTEST_SKIP() << kSmolGguf << " absent";
  auto model = Load(kSmolGguf);
  ASSERT_TRUE(model);
  CheckBatchInvariance(*model, {{1, 9707, 28, 314, 1073}, {504, 3458, 282}, {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17}}, 4, 1e-5f);
}

}  // namespace
}  // namespace dyn

namespace dyn {
namespace {

TEST(GpuMemory, KvCacheTakesWhatUtilizationLeaves) {
  constexpr size_t kGiB = size_t{1} << 30;
  // 140 GiB device, 16 GiB of weights in use, 90 %: 126 - 16 - 2 (reserve) = 108 GiB.
  EXPECT_EQ(KvCacheBytesForDevice(140 * kGiB, 124 * kGiB, 0.9, 2 * kGiB), 108 * kGiB);
  // More in use than the budget, or a reserve that does not fit: nothing, not a wrap-around.
  EXPECT_EQ(KvCacheBytesForDevice(140 * kGiB, 10 * kGiB, 0.9, 0), 0u);
  EXPECT_EQ(KvCacheBytesForDevice(140 * kGiB, 124 * kGiB, 0.9, 200 * kGiB), 0u);
  EXPECT_EQ(KvCacheBytesForDevice(140 * kGiB, 150 * kGiB, 0.5, 0), 70 * kGiB);  // free > total: clamp
}

TEST(GpuMemory, WorkspaceGrowsWithTheBatchAndStaysSmallNextToAnEightBModel) {
  ModelConfig c;  // Llama-3.1-8B's shape
  c.hidden_size = 4096;
  c.intermediate_size = 14336;
  c.num_heads = 32;
  c.num_kv_heads = 8;
  c.head_dim = 128;
  c.vocab_size = 128256;
  const size_t small = ForwardWorkspaceBytes(c, 256, 16);
  const size_t large = ForwardWorkspaceBytes(c, 8192, 1024);
  EXPECT_GT(large, small);
  EXPECT_GT(large, size_t{1} << 30);
  EXPECT_LT(large, size_t{4} << 30);  // well under the 16 GB of weights
}

}  // namespace
}  // namespace dyn
