// Pipelined decode (Model::LaunchSample / TakeSample, async scheduling) against ForwardSample on
// a small Llama-shaped model with dummy weights: the same tokens, step for step, while the batch
// reorders its rows and drops a sequence. Skips without a GPU.
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "engine/native/backend/cuda/cuda_backend.h"
#include "engine/native/model/loaded_model.h"

namespace dyn {
namespace {

std::unique_ptr<Model> SmallDummyModel(const std::string& dir) {
  auto loaded = LoadHfConfigDummy(dir);
  EXPECT_TRUE(loaded.ok()) << loaded.status().ToString();
  auto backend = CreateCudaBackend(0);
  EXPECT_TRUE(backend.ok()) << backend.status().ToString();
  if (!loaded.ok() || !backend.ok()) return nullptr;
  auto model = CreateLlamaModel(std::move(loaded).value(), std::move(backend).value());
  EXPECT_TRUE(model.ok()) << model.status().ToString();
  return model.ok() ? std::move(model).value() : nullptr;
}

TEST(CudaPipelinedTest, PipelinedDecodeEqualsSynchronousDecode) {
  if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device visible";
  const std::string dir = std::filesystem::temp_directory_path() / ("dyn_pipelined_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  std::ofstream(dir + "/config.json") << R"({"architectures": ["LlamaForCausalLM"], "hidden_size": 512,
    "intermediate_size": 1024, "num_hidden_layers": 3, "num_attention_heads": 8, "num_key_value_heads": 2,
    "vocab_size": 1000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "rope_theta": 500000.0})";
  // Two models with the same dummy weights (each backend draws them from the same seeds).
  std::unique_ptr<Model> sync = SmallDummyModel(dir), piped = SmallDummyModel(dir);
  std::filesystem::remove_all(dir);
  ASSERT_TRUE(sync && piped);
  ASSERT_TRUE(piped->samples_pipelined());
  constexpr int kSeqs = 3, kBlock = 16, kPerSeq = 12, kSteps = 40;
  ASSERT_TRUE(sync->InitKvCache(kSeqs * kPerSeq, kBlock).ok());
  ASSERT_TRUE(piped->InitKvCache(kSeqs * kPerSeq, kBlock).ok());
  std::vector<std::vector<int32_t>> tables(kSeqs);
  std::vector<std::vector<uint32_t>> prompts(kSeqs);
  for (int s = 0; s < kSeqs; ++s) {
    for (int i = 0; i < kPerSeq; ++i) tables[s].push_back(s * kPerSeq + (i * 5) % kPerSeq);  // not the identity
    for (int i = 0; i < 17 + 23 * s; ++i) prompts[s].push_back(static_cast<uint32_t>((i * 131 + s * 7) % 1000));
  }
  // Sequence 2 draws at temperature 0.8 (a fixed uniform a step), the others are greedy.
  auto sampling_of = [](int seq, int step) {
    return seq == 2 ? DeviceSampling{0.8f, static_cast<float>((step * 37 % 100) / 100.0), SampleCut{}} : DeviceSampling{};
  };
  // The batch's order of sequences at each step: reversed from step 10, without sequence 1 from 25.
  auto order_of = [](int step) {
    if (step >= 25) return std::vector<int>{2, 0};
    return step >= 10 ? std::vector<int>{2, 1, 0} : std::vector<int>{0, 1, 2};
  };
  std::vector<std::vector<uint32_t>> want(kSeqs), got(kSeqs);
  std::vector<int> pos(kSeqs);
  {  // synchronous: every step's ids come back before the next step is built
    for (int step = 0; step < kSteps; ++step) {
      const std::vector<int> order = order_of(step);
      std::vector<ForwardSeq> batch;
      std::vector<DeviceSampling> sampling;
      std::vector<uint32_t> one(kSeqs);
      for (int s : order) {
        ForwardSeq f;
        if (step == 0) {
          f.tokens = prompts[s];
        } else {
          one[s] = want[s].back();
          f.tokens = std::span<const uint32_t>(&one[s], 1);
        }
        f.start_pos = pos[s];
        f.block_table = tables[s];
        batch.push_back(f);
        sampling.push_back(sampling_of(s, step));
      }
      std::vector<uint32_t> ids(batch.size());
      ASSERT_TRUE(sync->ForwardSample(batch, sampling, ids.data()).ok());
      for (size_t r = 0; r < order.size(); ++r) {
        pos[order[r]] += static_cast<int>(batch[r].tokens.size());
        want[order[r]].push_back(ids[r]);
      }
    }
  }
  pos.assign(kSeqs, 0);
  {  // pipelined: step N + 1 names its tokens by step N's rows and is launched before N's ids are taken
    std::vector<int> row_of(kSeqs, -1);  // each sequence's row in the last launched step
    std::vector<std::vector<int>> launched;  // the order of each launched step not yet taken
    const uint32_t placeholder = 0;
    auto take = [&] {
      std::vector<uint32_t> ids(launched.front().size());
      ASSERT_TRUE(piped->TakeSample(ids.data()).ok());
      for (size_t r = 0; r < ids.size(); ++r) got[launched.front()[r]].push_back(ids[r]);
      launched.erase(launched.begin());
    };
    for (int step = 0; step < kSteps; ++step) {
      const std::vector<int> order = order_of(step);
      std::vector<ForwardSeq> batch;
      std::vector<DeviceSampling> sampling;
      for (int s : order) {
        ForwardSeq f;
        if (step == 0) {
          f.tokens = prompts[s];
        } else {
          f.tokens = std::span<const uint32_t>(&placeholder, 1);
          f.sampled_row = row_of[s];
        }
        f.start_pos = pos[s];
        f.block_table = tables[s];
        batch.push_back(f);
        sampling.push_back(sampling_of(s, step));
      }
      ASSERT_TRUE(piped->LaunchSample(batch, sampling).ok());
      for (size_t r = 0; r < order.size(); ++r) {
        pos[order[r]] += static_cast<int>(batch[r].tokens.size());
        row_of[order[r]] = static_cast<int>(r);
      }
      launched.push_back(order);
      if (launched.size() > 1) take();
    }
    take();
    EXPECT_FALSE(piped->TakeSample(std::vector<uint32_t>(3).data()).ok());  // nothing left to take
  }
  for (int s = 0; s < kSeqs; ++s) EXPECT_EQ(got[s], want[s]) << "sequence " << s;
  // A sampled row past the last sample's rows is refused.
  ForwardSeq bad;
  const uint32_t placeholder = 0;
  bad.tokens = std::span<const uint32_t>(&placeholder, 1);
  bad.start_pos = pos[0];
  bad.block_table = tables[0];
  bad.sampled_row = 2;  // the last step had two rows
  const DeviceSampling greedy{};
  EXPECT_FALSE(piped->LaunchSample(std::span<const ForwardSeq>(&bad, 1), std::span<const DeviceSampling>(&greedy, 1)).ok());
  // A launch must leave a sample to take: a step without a sampled row is refused.
  ForwardSeq silent;
  silent.tokens = prompts[0];
  silent.block_table = tables[0];
  silent.want_logits = false;
  EXPECT_FALSE(piped->LaunchSample(std::span<const ForwardSeq>(&silent, 1), {}).ok());
}

}  // namespace
}  // namespace dyn
