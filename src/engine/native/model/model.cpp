// LoadModel: picks the loader by path (directory = Hugging Face, file = GGUF), validates and
// builds the Llama-family model on the requested backend.
#include "engine/native/model/model.h"

#include <algorithm>

#include "base/file.h"
#include "engine/native/backend/cpu/quant_blocks.h"
#include "engine/native/model/loaded_model.h"

namespace dyn {

Status ValidateLoadedModel(const LoadedModel& m) {
  const ModelConfig& c = m.config;
  if (c.num_layers <= 0 || c.hidden_size <= 0 || c.num_heads <= 0 || c.num_kv_heads <= 0 || c.head_dim <= 0 ||
      c.vocab_size <= 0 || c.intermediate_size <= 0) {
    return Status::InvalidArgument("model config has a non-positive size");
  }
  if (c.num_heads % c.num_kv_heads != 0) return Status::InvalidArgument("num_heads is not a multiple of num_kv_heads");
  if (c.head_dim % 2 != 0) return Status::InvalidArgument("head_dim must be even for RoPE");
  if (static_cast<int>(m.layers.size()) != c.num_layers) return Status::InvalidArgument("layer count does not match the config");
  if (!m.rope_freq_factors.empty() && static_cast<int>(m.rope_freq_factors.size()) != c.head_dim / 2) {
    return Status::InvalidArgument("rope_freqs has the wrong length");
  }
  auto check = [](const Weight& w, const std::string& name) -> Status {
    if (DTypeIsQuantized(w.dtype) && w.cols % 32 != 0) {
      return Status::Unsupported(name + ": quantized rows must be a multiple of 32 elements");
    }
    return Status::Ok();
  };
  DYN_RETURN_IF_ERROR(check(m.embed, "embedding"));
  DYN_RETURN_IF_ERROR(check(m.output, "output"));
  for (size_t l = 0; l < m.layers.size(); ++l) {
    const LoadedLayer& L = m.layers[l];
    for (const Weight* w : {&L.wq, &L.wk, &L.wv, &L.wo, &L.w_gate, &L.w_up, &L.w_down}) {
      DYN_RETURN_IF_ERROR(check(*w, "layer " + std::to_string(l)));
    }
  }
  return Status::Ok();
}

size_t KvCacheBytesForDevice(size_t total_bytes, size_t free_bytes, double utilization, size_t reserve_bytes) {
  const double budget = utilization * static_cast<double>(total_bytes);
  const double used = static_cast<double>(total_bytes - std::min(free_bytes, total_bytes));
  const double left = budget - used - static_cast<double>(reserve_bytes);
  return left > 0 ? static_cast<size_t>(left) : 0;
}

size_t ForwardWorkspaceBytes(const ModelConfig& c, int max_tokens, int max_seqs) {
  const size_t m = static_cast<size_t>(std::max(1, max_tokens));
  const size_t qkv = static_cast<size_t>(c.num_heads + 2 * c.num_kv_heads) * c.head_dim;
  // Per token: residual, normed input, attention output (hidden each), q/k/v, gate and up; the
  // model grows its buffers with 25 % slack; bf16 copies of the matmul inputs on a device.
  const size_t per_token = (3 * static_cast<size_t>(c.hidden_size) + qkv + 2 * static_cast<size_t>(c.intermediate_size)) * 4;
  const size_t bf16_inputs = std::max<size_t>(c.hidden_size, c.intermediate_size) * 2;
  const size_t logits = static_cast<size_t>(std::max(1, max_seqs)) * static_cast<size_t>(c.vocab_size) * 4;
  constexpr size_t kLibraries = size_t{1} << 30;  // cuBLAS workspaces, CUDA graphs, allocator slack
  return (m * (per_token + bf16_inputs) + logits) * 5 / 4 + kLibraries;
}

void ConvertWeights(LoadedModel* m, DType to) {
  auto convert = [m, to](Weight* w) {
    // Dummy matrices (no data) are left to the backend; F32 stays F32 (the GPU keeps it too).
    if (w->data == nullptr || w->dtype == DType::kF32 || w->dtype == to) return;
    const size_t n = static_cast<size_t>(w->rows) * w->cols, row_bytes = DTypeRowBytes(w->dtype, w->cols);
    auto f32 = std::make_shared<std::vector<float>>(n);
    for (int64_t r = 0; r < w->rows; ++r) {
      DequantizeRow(w->dtype, static_cast<const uint8_t*>(w->data) + r * row_bytes, w->cols, f32->data() + r * w->cols);
    }
    if (to == DType::kF32) {
      *w = Weight{DType::kF32, w->rows, w->cols, f32->data()};
      m->keep_alive.push_back(std::move(f32));
      return;
    }
    auto bf16 = std::make_shared<std::vector<uint16_t>>(n);
    for (size_t i = 0; i < n; ++i) (*bf16)[i] = F32ToBF16((*f32)[i]);
    *w = Weight{DType::kBF16, w->rows, w->cols, bf16->data()};
    m->keep_alive.push_back(std::move(bf16));
  };
  // A tied LM head is the embedding table: convert it once and keep the two the same.
  const bool tied = m->output.data == m->embed.data;
  convert(&m->embed);
  if (tied) m->output = m->embed;
  else convert(&m->output);
  for (LoadedLayer& l : m->layers) {
    for (Weight* w : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down}) convert(w);
  }
}

Result<std::unique_ptr<Model>> LoadModel(const std::string& path, const ModelLoadOptions& options) {
  const bool dummy = options.load_format == "dummy";
  if (!dummy && options.load_format != "auto") {
    return Status::InvalidArgument("load format '" + options.load_format + "' (auto | dummy)");
  }
  Result<LoadedModel> loaded = Status::NotFound(path + ": no such model directory or file");
  if (IsDirectory(path)) {
    loaded = dummy ? LoadHfConfigDummy(path) : LoadHfDirectory(path);
  } else if (dummy && FileExists(path)) {
    loaded = Status::InvalidArgument("the dummy load format needs a directory with config.json");
  } else if (FileExists(path)) {
    loaded = LoadGgufFile(path);
  }
  if (!loaded.ok()) return loaded.status().WithContext("loading model " + path);
  DYN_ASSIGN_OR_RETURN(std::unique_ptr<Backend> backend, CreateBackend(options.device, options.num_threads));
  // The CPU backend uses host weights in place; device backends make dummy weights themselves.
  if (dummy && options.device == "cpu") FillDummyWeightsOnHost(&loaded.value());
  if (!options.convert_weights.empty()) {
    if (options.convert_weights != "f32" && options.convert_weights != "bf16") {
      return Status::InvalidArgument("convert_weights '" + options.convert_weights + "' (f32 | bf16)");
    }
    ConvertWeights(&loaded.value(), options.convert_weights == "f32" ? DType::kF32 : DType::kBF16);
  }
  auto model = CreateLlamaModel(std::move(loaded).value(), std::move(backend));
  if (!model.ok()) return model.status().WithContext("loading model " + path);
  return model;
}

}  // namespace dyn
