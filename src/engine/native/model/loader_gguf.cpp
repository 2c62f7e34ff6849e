// GGUF loader (llama.cpp's format): llama, qwen2 and qwen3 architectures; F32/F16/BF16/Q8_0/Q4_0/
// Q4_1 tensors used in place in the mapped file. llama.cpp's converter permutes the Q/K rows of
// llama-arch models for its "NORM" RoPE, which rotates interleaved pairs; qwen2/qwen3 use NEOX
// (rotate-half) like Hugging Face.
#include <algorithm>

#include "engine/native/backend/cpu/quant_blocks.h"
#include "engine/native/model/loaded_model.h"
#include "llm/gguf.h"

namespace dyn {
namespace {

Result<DType> ToDType(const GgufTensor& t) {
  switch (t.type) {
    case GgmlType::kF32: return DType::kF32;
    case GgmlType::kF16: return DType::kF16;
    case GgmlType::kBF16: return DType::kBF16;
    case GgmlType::kQ8_0: return DType::kQ8_0;
    case GgmlType::kQ4_0: return DType::kQ4_0;
    case GgmlType::kQ4_1: return DType::kQ4_1;
    default: break;
  }
  return Status::Unsupported("tensor " + t.name + " has type " + GgmlTypeName(t.type) +
                             " (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1)");
}

class GgufTensors {
 public:
  explicit GgufTensors(const GgufFile& f) : f_(f) {}

  bool Has(const std::string& name) const { return f_.FindTensor(name) != nullptr; }

  Result<Weight> Matrix(const std::string& name, int64_t rows, int64_t cols) const {
    const GgufTensor* t = f_.FindTensor(name);
    if (t == nullptr) return Status::NotFound("missing tensor " + name);
    DYN_ASSIGN_OR_RETURN(DType dt, ToDType(*t));
    if (t->dims.size() != 2 || static_cast<int64_t>(t->dims[0]) != cols || static_cast<int64_t>(t->dims[1]) != rows) {
      return Status::InvalidArgument("tensor " + name + " has an unexpected shape (want " + std::to_string(cols) + " x " +
                                     std::to_string(rows) + ")");
    }
    Weight w{dt, rows, cols, t->data};
    if (w.bytes() != t->nbytes) return Status::InvalidArgument("tensor " + name + ": size does not match its type and shape");
    return w;
  }

  Result<std::vector<float>> Vector(const std::string& name, int64_t n) const {
    const GgufTensor* t = f_.FindTensor(name);
    if (t == nullptr) return Status::NotFound("missing tensor " + name);
    DYN_ASSIGN_OR_RETURN(DType dt, ToDType(*t));
    if (static_cast<int64_t>(t->elements()) != n || (DTypeIsQuantized(dt) && n % kQuantBlock != 0)) {
      return Status::InvalidArgument("tensor " + name + " has " + std::to_string(t->elements()) + " elements, want " + std::to_string(n));
    }
    std::vector<float> out(n);
    DequantizeRow(dt, t->data, n, out.data());
    return out;
  }

 private:
  const GgufFile& f_;
};

}  // namespace

Result<LoadedModel> LoadGgufFile(const std::string& path) {
  DYN_ASSIGN_OR_RETURN(std::unique_ptr<GgufFile> file, GgufFile::Open(path));
  const GgufFile& f = *file;
  LoadedModel m;
  m.format = "gguf";
  ModelConfig& c = m.config;
  const std::string arch = f.GetString("general.architecture").value_or("");
  if (arch != "llama" && arch != "qwen2" && arch != "qwen3") {
    return Status::Unsupported(path + ": GGUF architecture '" + arch + "' (supported: llama, qwen2, qwen3)");
  }
  c.architecture = arch;
  auto req = [&](const std::string& key, int* out) -> Status {
    auto v = f.GetInt(arch + "." + key);
    if (!v) return Status::InvalidArgument(path + ": missing GGUF key " + arch + "." + key);
    *out = static_cast<int>(*v);
    return Status::Ok();
  };
  DYN_RETURN_IF_ERROR(req("block_count", &c.num_layers));
  DYN_RETURN_IF_ERROR(req("embedding_length", &c.hidden_size));
  DYN_RETURN_IF_ERROR(req("feed_forward_length", &c.intermediate_size));
  DYN_RETURN_IF_ERROR(req("attention.head_count", &c.num_heads));
  c.num_kv_heads = static_cast<int>(f.GetInt(arch + ".attention.head_count_kv").value_or(c.num_heads));
  c.head_dim = static_cast<int>(f.GetInt(arch + ".attention.key_length").value_or(c.hidden_size / c.num_heads));
  c.max_position_embeddings = static_cast<int>(f.GetInt(arch + ".context_length").value_or(2048));
  c.rope_theta = static_cast<float>(f.GetFloat(arch + ".rope.freq_base").value_or(10000.0));
  c.rms_norm_eps = static_cast<float>(f.GetFloat(arch + ".attention.layer_norm_rms_epsilon").value_or(1e-5));
  if (auto rot = f.GetInt(arch + ".rope.dimension_count"); rot && *rot != c.head_dim) {
    return Status::Unsupported(path + ": partial rotary embedding (rope.dimension_count " + std::to_string(*rot) +
                               " != head_dim " + std::to_string(c.head_dim) + ")");
  }
  if (auto type = f.GetString(arch + ".rope.scaling.type"); type && *type != "none") {
    if (*type != "linear") return Status::Unsupported(path + ": rope scaling type '" + *type + "' (supported: linear)");
    c.rope_scaling.type = "linear";
    c.rope_scaling.factor = static_cast<float>(f.GetFloat(arch + ".rope.scaling.factor").value_or(1.0));
  }
  const GgufTensor* embd = f.FindTensor("token_embd.weight");
  if (embd == nullptr || embd->dims.size() != 2) return Status::InvalidArgument(path + ": missing tensor token_embd.weight");
  if (const auto* tokens = f.GetStringArray("tokenizer.ggml.tokens")) {
    c.vocab_size = static_cast<int>(tokens->size());
  } else {
    c.vocab_size = static_cast<int>(f.GetInt(arch + ".vocab_size").value_or(static_cast<int64_t>(embd->dims[1])));
  }
  if (auto v = f.GetInt("tokenizer.ggml.bos_token_id")) c.bos_token_id = static_cast<uint32_t>(*v);
  for (const char* key : {"tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"}) {
    if (auto v = f.GetInt(key)) {
      const uint32_t id = static_cast<uint32_t>(*v);
      if (std::find(c.eos_token_ids.begin(), c.eos_token_ids.end(), id) == c.eos_token_ids.end()) c.eos_token_ids.push_back(id);
    }
  }
  GgufTensors t(f);
  c.attention_bias = t.Has("blk.0.attn_q.bias");
  c.qk_norm = t.Has("blk.0.attn_q_norm.weight");
  m.rope_style = arch == "llama" ? RopeStyle::kInterleaved : RopeStyle::kNeox;

  const int64_t H = c.hidden_size, q_dim = int64_t{c.num_heads} * c.head_dim, kv_dim = int64_t{c.num_kv_heads} * c.head_dim;
  DYN_ASSIGN_OR_RETURN(m.embed, t.Matrix("token_embd.weight", c.vocab_size, H));
  if (t.Has("output.weight")) {
    DYN_ASSIGN_OR_RETURN(m.output, t.Matrix("output.weight", c.vocab_size, H));
  } else {
    m.output = m.embed;
    c.tie_word_embeddings = true;
  }
  DYN_ASSIGN_OR_RETURN(m.output_norm, t.Vector("output_norm.weight", H));
  if (t.Has("rope_freqs.weight")) {
    DYN_ASSIGN_OR_RETURN(m.rope_freq_factors, t.Vector("rope_freqs.weight", c.head_dim / 2));
  }
  for (int l = 0; l < c.num_layers; ++l) {
    const std::string p = "blk." + std::to_string(l) + ".";
    LoadedLayer L;
    DYN_ASSIGN_OR_RETURN(L.wq, t.Matrix(p + "attn_q.weight", q_dim, H));
    DYN_ASSIGN_OR_RETURN(L.wk, t.Matrix(p + "attn_k.weight", kv_dim, H));
    DYN_ASSIGN_OR_RETURN(L.wv, t.Matrix(p + "attn_v.weight", kv_dim, H));
    DYN_ASSIGN_OR_RETURN(L.wo, t.Matrix(p + "attn_output.weight", H, q_dim));
    DYN_ASSIGN_OR_RETURN(L.w_gate, t.Matrix(p + "ffn_gate.weight", c.intermediate_size, H));
    DYN_ASSIGN_OR_RETURN(L.w_up, t.Matrix(p + "ffn_up.weight", c.intermediate_size, H));
    DYN_ASSIGN_OR_RETURN(L.w_down, t.Matrix(p + "ffn_down.weight", H, c.intermediate_size));
    DYN_ASSIGN_OR_RETURN(L.attn_norm, t.Vector(p + "attn_norm.weight", H));
    DYN_ASSIGN_OR_RETURN(L.ffn_norm, t.Vector(p + "ffn_norm.weight", H));
    if (c.qk_norm) {
      DYN_ASSIGN_OR_RETURN(L.q_norm, t.Vector(p + "attn_q_norm.weight", c.head_dim));
      DYN_ASSIGN_OR_RETURN(L.k_norm, t.Vector(p + "attn_k_norm.weight", c.head_dim));
    }
    if (c.attention_bias) {
      DYN_ASSIGN_OR_RETURN(L.bq, t.Vector(p + "attn_q.bias", q_dim));
      DYN_ASSIGN_OR_RETURN(L.bk, t.Vector(p + "attn_k.bias", kv_dim));
      DYN_ASSIGN_OR_RETURN(L.bv, t.Vector(p + "attn_v.bias", kv_dim));
    }
    m.layers.push_back(std::move(L));
  }
  m.keep_alive.push_back(std::shared_ptr<GgufFile>(std::move(file)));
  return m;
}

}  // namespace dyn
