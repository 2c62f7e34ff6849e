// Private: what a loader hands to the Llama model: the config, weight views into mapped files and
// small F32 vectors (norms, biases) converted at load time. Shared by the HF and GGUF loaders.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "base/status.h"
#include "engine/native/backend/backend.h"
#include "engine/native/model/model.h"

namespace dyn {

struct LoadedLayer {
  Weight wq, wk, wv, wo, w_gate, w_up, w_down;
  std::vector<float> attn_norm, ffn_norm;
  std::vector<float> q_norm, k_norm;      // Qwen3 (config.qk_norm)
  std::vector<float> bq, bk, bv;          // Qwen2 (config.attention_bias)
};

struct LoadedModel {
  ModelConfig config;
  RopeStyle rope_style = RopeStyle::kNeox;
  std::string format;  // "safetensors" or "gguf", for Describe()
  Weight embed;
  Weight output;       // the embedding table when tied
  std::vector<float> output_norm;
  std::vector<float> rope_freq_factors;  // GGUF rope_freqs.weight (Llama 3.1): inv_freq[j] /= factor[j]
  std::vector<LoadedLayer> layers;
  std::vector<std::shared_ptr<void>> keep_alive;  // mapped files the weight views point into
};

// Loaders (loader_hf.cpp, loader_gguf.cpp).
Result<LoadedModel> LoadHfDirectory(const std::string& dir);
Result<LoadedModel> LoadGgufFile(const std::string& path);
// config.json of a Hugging Face directory alone: every matrix is BF16 with data == nullptr (a
// device backend's PrepareWeight makes it random), norms are ones, biases zeros. Tied embeddings
// get a separate (random) output matrix of the same shape, which reads the same bytes per step.
Result<LoadedModel> LoadHfConfigDummy(const std::string& dir);
// Replaces every data == nullptr matrix by random host BF16 (kept alive by the model), for
// backends that use host weights in place (the CPU backend).
void FillDummyWeightsOnHost(LoadedModel* m);
// Replaces every matrix that is neither F32 nor `to` (kF32 or kBF16) by a copy of type `to`, kept
// alive by the model: ModelLoadOptions::convert_weights.
void ConvertWeights(LoadedModel* m, DType to);

// Checks shapes against the config; names the first tensor that does not fit.
Status ValidateLoadedModel(const LoadedModel& m);

// Builds the Llama-family model on `backend` (llama_model.cpp).
Result<std::unique_ptr<Model>> CreateLlamaModel(LoadedModel loaded, std::unique_ptr<Backend> backend);

// RoPE inverse frequencies for head_dim with theta and optional llama3/linear scaling, in F32 as
// Hugging Face computes them.
Result<std::vector<float>> RopeInvFreq(const ModelConfig& c);

}  // namespace dyn
