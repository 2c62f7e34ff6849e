// LoadModel: picks the loader by path (directory = Hugging Face, file = GGUF), validates and
// builds the Llama-family model on the requested backend.
#include "engine/native/model/model.h"

#include "base/file.h"
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
  auto model = CreateLlamaModel(std::move(loaded).value(), std::move(backend));
  if (!model.ok()) return model.status().WithContext("loading model " + path);
  return model;
}

}  // namespace dyn
