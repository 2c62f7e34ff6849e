// Hugging Face directory loader: config.json (+ generation_config.json) and model.safetensors or
// a sharded model.safetensors.index.json. Files are memory-mapped and F32/F16/BF16 matrices are
// used in place; only the 1-D tensors (norm weights, biases) are converted to F32 copies.
#include <algorithm>
#include <boost/json.hpp>
#include <cmath>
#include <cstring>
#include <map>

#include "base/file.h"
#include "engine/native/backend/cpu/quant_blocks.h"
#include "engine/native/model/loaded_model.h"

namespace dyn {
namespace {

namespace json = boost::json;

struct StTensor {
  DType dtype;
  std::vector<int64_t> shape;
  const uint8_t* data;
  size_t nbytes;
};

std::optional<double> Num(const json::object& o, const char* key) {
  auto it = o.find(key);
  if (it == o.end()) return std::nullopt;
  if (it->value().is_double()) return it->value().as_double();
  if (it->value().is_int64()) return static_cast<double>(it->value().as_int64());
  if (it->value().is_uint64()) return static_cast<double>(it->value().as_uint64());
  return std::nullopt;
}

void AppendIds(const json::value* v, std::vector<uint32_t>* out) {
  if (v == nullptr) return;
  auto add = [&](const json::value& x) {
    if (x.is_int64() && x.as_int64() >= 0) {
      const uint32_t id = static_cast<uint32_t>(x.as_int64());
      if (std::find(out->begin(), out->end(), id) == out->end()) out->push_back(id);
    }
  };
  if (v->is_array()) {
    for (const auto& x : v->as_array()) add(x);
  } else {
    add(*v);
  }
}

Result<json::object> ReadJsonObject(const std::string& path) {
  DYN_ASSIGN_OR_RETURN(std::string text, ReadFile(path));
  boost::system::error_code ec;
  json::value v = json::parse(text, ec);
  if (ec || !v.is_object()) return Status::InvalidArgument(path + ": not a JSON object");
  return v.as_object();
}

Status ParseConfig(const json::object& o, ModelConfig* c) {
  std::string arch;
  if (auto it = o.find("architectures"); it != o.end() && it->value().is_array() && !it->value().as_array().empty() &&
                                         it->value().as_array()[0].is_string()) {
    arch = std::string(it->value().as_array()[0].as_string());
  }
  if (arch == "LlamaForCausalLM") {
    c->architecture = "llama";
  } else if (arch == "MistralForCausalLM") {
    c->architecture = "mistral";
  } else if (arch == "Qwen2ForCausalLM") {
    c->architecture = "qwen2";
    c->attention_bias = true;
  } else if (arch == "Qwen3ForCausalLM") {
    c->architecture = "qwen3";
    c->qk_norm = true;
  } else {
    return Status::Unsupported("model architecture '" + arch +
                               "' (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM)");
  }
  auto req = [&](const char* key, int* out) -> Status {
    auto v = Num(o, key);
    if (!v) return Status::InvalidArgument(std::string("config.json: missing ") + key);
    *out = static_cast<int>(*v);
    return Status::Ok();
  };
  DYN_RETURN_IF_ERROR(req("hidden_size", &c->hidden_size));
  DYN_RETURN_IF_ERROR(req("intermediate_size", &c->intermediate_size));
  DYN_RETURN_IF_ERROR(req("num_hidden_layers", &c->num_layers));
  DYN_RETURN_IF_ERROR(req("num_attention_heads", &c->num_heads));
  DYN_RETURN_IF_ERROR(req("vocab_size", &c->vocab_size));
  c->num_kv_heads = static_cast<int>(Num(o, "num_key_value_heads").value_or(c->num_heads));
  auto head_dim = Num(o, "head_dim");
  c->head_dim = head_dim ? static_cast<int>(*head_dim) : c->hidden_size / c->num_heads;
  c->max_position_embeddings = static_cast<int>(Num(o, "max_position_embeddings").value_or(2048));
  c->rms_norm_eps = static_cast<float>(Num(o, "rms_norm_eps").value_or(1e-6));
  c->rope_theta = static_cast<float>(Num(o, "rope_theta").value_or(10000.0));
  if (auto it = o.find("tie_word_embeddings"); it != o.end() && it->value().is_bool()) c->tie_word_embeddings = it->value().as_bool();
  if (auto it = o.find("attention_bias"); it != o.end() && it->value().is_bool()) c->attention_bias = it->value().as_bool() || c->architecture == "qwen2";
  if (auto it = o.find("rope_scaling"); it != o.end() && it->value().is_object()) {
    const json::object& rs = it->value().as_object();
    for (const char* key : {"rope_type", "type"}) {
      if (auto t = rs.find(key); t != rs.end() && t->value().is_string()) {
        c->rope_scaling.type = std::string(t->value().as_string());
        break;
      }
    }
    c->rope_scaling.factor = static_cast<float>(Num(rs, "factor").value_or(1.0));
    c->rope_scaling.low_freq_factor = static_cast<float>(Num(rs, "low_freq_factor").value_or(1.0));
    c->rope_scaling.high_freq_factor = static_cast<float>(Num(rs, "high_freq_factor").value_or(4.0));
    c->rope_scaling.original_max_position_embeddings =
        static_cast<int>(Num(rs, "original_max_position_embeddings").value_or(8192));
  }
  if (auto v = Num(o, "bos_token_id")) c->bos_token_id = static_cast<uint32_t>(*v);
  if (auto it = o.find("eos_token_id"); it != o.end()) AppendIds(&it->value(), &c->eos_token_ids);
  return Status::Ok();
}

Status MapSafetensors(const std::string& path, std::map<std::string, StTensor>* tensors, std::vector<std::shared_ptr<void>>* keep) {
  DYN_ASSIGN_OR_RETURN(std::unique_ptr<MappedFile> map, MappedFile::Open(path));
  const uint8_t* base = map->data();
  if (map->size() < 8) return Status::InvalidArgument(path + ": too small for safetensors");
  uint64_t header_len;
  std::memcpy(&header_len, base, 8);
  if (header_len > map->size() - 8) return Status::InvalidArgument(path + ": truncated safetensors header");
  boost::system::error_code ec;
  json::value header = json::parse(std::string_view(reinterpret_cast<const char*>(base + 8), header_len), ec);
  if (ec || !header.is_object()) return Status::InvalidArgument(path + ": bad safetensors header");
  const uint8_t* data = base + 8 + header_len;
  const size_t data_size = map->size() - 8 - header_len;
  for (const auto& [name, v] : header.as_object()) {
    if (name == "__metadata__" || !v.is_object()) continue;
    const json::object& t = v.as_object();
    const auto* dt = t.if_contains("dtype");
    const auto* shape = t.if_contains("shape");
    const auto* offs = t.if_contains("data_offsets");
    if (!dt || !dt->is_string() || !shape || !shape->is_array() || !offs || !offs->is_array() || offs->as_array().size() != 2) {
      return Status::InvalidArgument(path + ": bad entry for tensor " + std::string(name));
    }
    StTensor st;
    const std::string dtype(dt->as_string());
    if (dtype == "F32") st.dtype = DType::kF32;
    else if (dtype == "F16") st.dtype = DType::kF16;
    else if (dtype == "BF16") st.dtype = DType::kBF16;
    else return Status::Unsupported("tensor " + std::string(name) + " has dtype " + dtype + " (supported: F32, F16, BF16)");
    for (const auto& d : shape->as_array()) st.shape.push_back(d.is_int64() ? d.as_int64() : 0);
    const uint64_t b = offs->as_array()[0].to_number<uint64_t>(), e = offs->as_array()[1].to_number<uint64_t>();
    if (b > e || e > data_size) return Status::InvalidArgument(path + ": tensor " + std::string(name) + " out of bounds");
    st.data = data + b;
    st.nbytes = e - b;
    (*tensors)[std::string(name)] = st;
  }
  keep->push_back(std::shared_ptr<MappedFile>(std::move(map)));
  return Status::Ok();
}

class HfTensors {
 public:
  std::map<std::string, StTensor> tensors;

  bool Has(const std::string& name) const { return tensors.count(name) != 0; }

  Result<Weight> Matrix(const std::string& name, int64_t rows, int64_t cols) const {
    auto it = tensors.find(name);
    if (it == tensors.end()) return Status::NotFound("missing tensor " + name);
    const StTensor& t = it->second;
    if (t.shape.size() != 2 || t.shape[0] != rows || t.shape[1] != cols) {
      return Status::InvalidArgument("tensor " + name + " has an unexpected shape (want [" + std::to_string(rows) + ", " +
                                     std::to_string(cols) + "])");
    }
    return Weight{t.dtype, rows, cols, t.data};
  }

  Result<std::vector<float>> Vector(const std::string& name, int64_t n) const {
    auto it = tensors.find(name);
    if (it == tensors.end()) return Status::NotFound("missing tensor " + name);
    const StTensor& t = it->second;
    if (t.shape.size() != 1 || t.shape[0] != n) return Status::InvalidArgument("tensor " + name + " has an unexpected shape");
    std::vector<float> out(n);
    DequantizeRow(t.dtype, t.data, n, out.data());
    return out;
  }
};

}  // namespace

Result<LoadedModel> LoadHfDirectory(const std::string& dir) {
  LoadedModel m;
  m.format = "safetensors";
  DYN_ASSIGN_OR_RETURN(json::object cfg, ReadJsonObject(dir + "/config.json"));
  DYN_RETURN_IF_ERROR(ParseConfig(cfg, &m.config).WithContext(dir + "/config.json"));
  if (FileExists(dir + "/generation_config.json")) {
    auto gen = ReadJsonObject(dir + "/generation_config.json");
    if (gen.ok()) {
      if (auto* e = gen->if_contains("eos_token_id")) AppendIds(e, &m.config.eos_token_ids);
      if (!m.config.bos_token_id) {
        if (auto v = Num(*gen, "bos_token_id")) m.config.bos_token_id = static_cast<uint32_t>(*v);
      }
    }
  }
  HfTensors t;
  if (FileExists(dir + "/model.safetensors")) {
    DYN_RETURN_IF_ERROR(MapSafetensors(dir + "/model.safetensors", &t.tensors, &m.keep_alive));
  } else if (FileExists(dir + "/model.safetensors.index.json")) {
    DYN_ASSIGN_OR_RETURN(json::object index, ReadJsonObject(dir + "/model.safetensors.index.json"));
    const auto* wm = index.if_contains("weight_map");
    if (!wm || !wm->is_object()) return Status::InvalidArgument(dir + "/model.safetensors.index.json: no weight_map");
    std::vector<std::string> files;
    for (const auto& [name, file] : wm->as_object()) {
      if (file.is_string() && std::find(files.begin(), files.end(), std::string(file.as_string())) == files.end()) {
        files.emplace_back(file.as_string());
      }
    }
    for (const std::string& f : files) DYN_RETURN_IF_ERROR(MapSafetensors(dir + "/" + f, &t.tensors, &m.keep_alive));
  } else {
    return Status::NotFound(dir + ": no model.safetensors or model.safetensors.index.json");
  }
  const ModelConfig& c = m.config;
  const int64_t H = c.hidden_size, q_dim = int64_t{c.num_heads} * c.head_dim, kv_dim = int64_t{c.num_kv_heads} * c.head_dim;
  DYN_ASSIGN_OR_RETURN(m.embed, t.Matrix("model.embed_tokens.weight", c.vocab_size, H));
  if (t.Has("lm_head.weight")) {
    DYN_ASSIGN_OR_RETURN(m.output, t.Matrix("lm_head.weight", c.vocab_size, H));
  } else {
    m.output = m.embed;
    m.config.tie_word_embeddings = true;
  }
  DYN_ASSIGN_OR_RETURN(m.output_norm, t.Vector("model.norm.weight", H));
  for (int l = 0; l < c.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    LoadedLayer L;
    DYN_ASSIGN_OR_RETURN(L.wq, t.Matrix(p + "self_attn.q_proj.weight", q_dim, H));
    DYN_ASSIGN_OR_RETURN(L.wk, t.Matrix(p + "self_attn.k_proj.weight", kv_dim, H));
    DYN_ASSIGN_OR_RETURN(L.wv, t.Matrix(p + "self_attn.v_proj.weight", kv_dim, H));
    DYN_ASSIGN_OR_RETURN(L.wo, t.Matrix(p + "self_attn.o_proj.weight", H, q_dim));
    DYN_ASSIGN_OR_RETURN(L.w_gate, t.Matrix(p + "mlp.gate_proj.weight", c.intermediate_size, H));
    DYN_ASSIGN_OR_RETURN(L.w_up, t.Matrix(p + "mlp.up_proj.weight", c.intermediate_size, H));
    DYN_ASSIGN_OR_RETURN(L.w_down, t.Matrix(p + "mlp.down_proj.weight", H, c.intermediate_size));
    DYN_ASSIGN_OR_RETURN(L.attn_norm, t.Vector(p + "input_layernorm.weight", H));
    DYN_ASSIGN_OR_RETURN(L.ffn_norm, t.Vector(p + "post_attention_layernorm.weight", H));
    if (c.qk_norm) {
      DYN_ASSIGN_OR_RETURN(L.q_norm, t.Vector(p + "self_attn.q_norm.weight", c.head_dim));
      DYN_ASSIGN_OR_RETURN(L.k_norm, t.Vector(p + "self_attn.k_norm.weight", c.head_dim));
    }
    if (c.attention_bias) {
      DYN_ASSIGN_OR_RETURN(L.bq, t.Vector(p + "self_attn.q_proj.bias", q_dim));
      DYN_ASSIGN_OR_RETURN(L.bk, t.Vector(p + "self_attn.k_proj.bias", kv_dim));
      DYN_ASSIGN_OR_RETURN(L.bv, t.Vector(p + "self_attn.v_proj.bias", kv_dim));
    }
    m.layers.push_back(std::move(L));
  }
  m.rope_style = RopeStyle::kNeox;
  return m;
}

Result<LoadedModel> LoadHfConfigDummy(const std::string& dir) {
  LoadedModel m;
  m.format = "dummy";
  DYN_ASSIGN_OR_RETURN(json::object cfg, ReadJsonObject(dir + "/config.json"));
  DYN_RETURN_IF_ERROR(ParseConfig(cfg, &m.config).WithContext(dir + "/config.json"));
  const ModelConfig& c = m.config;
  const int64_t H = c.hidden_size, q_dim = int64_t{c.num_heads} * c.head_dim, kv_dim = int64_t{c.num_kv_heads} * c.head_dim;
  auto mat = [](int64_t rows, int64_t cols) { return Weight{DType::kBF16, rows, cols, nullptr}; };
  m.embed = mat(c.vocab_size, H);
  m.output = mat(c.vocab_size, H);
  m.output_norm.assign(H, 1.0f);
  for (int l = 0; l < c.num_layers; ++l) {
    LoadedLayer L;
    L.wq = mat(q_dim, H);
    L.wk = mat(kv_dim, H);
    L.wv = mat(kv_dim, H);
    L.wo = mat(H, q_dim);
    L.w_gate = mat(c.intermediate_size, H);
    L.w_up = mat(c.intermediate_size, H);
    L.w_down = mat(H, c.intermediate_size);
    L.attn_norm.assign(H, 1.0f);
    L.ffn_norm.assign(H, 1.0f);
    if (c.qk_norm) {
      L.q_norm.assign(c.head_dim, 1.0f);
      L.k_norm.assign(c.head_dim, 1.0f);
    }
    if (c.attention_bias) {
      L.bq.assign(q_dim, 0.0f);
      L.bk.assign(kv_dim, 0.0f);
      L.bv.assign(kv_dim, 0.0f);
    }
    m.layers.push_back(std::move(L));
  }
  m.rope_style = RopeStyle::kNeox;
  return m;
}

void FillDummyWeightsOnHost(LoadedModel* m) {
  uint64_t state = 0x9E3779B97F4A7C15ull;
  auto fill = [&](Weight& w) {
    if (w.data != nullptr) return;
    const size_t n = static_cast<size_t>(w.rows) * w.cols;
    auto buf = std::shared_ptr<uint16_t[]>(new uint16_t[n]);
    // Uniform in [-a, a] with a = sqrt(3 / cols): variance 1/cols, as the CUDA backend makes them.
    const float a = std::sqrt(3.0f / static_cast<float>(w.cols));
    for (size_t i = 0; i < n; ++i) {
      state ^= state << 13, state ^= state >> 7, state ^= state << 17;  // xorshift64
      const float f = a * (static_cast<float>(state >> 40) * (2.0f / 16777216.0f) - 1.0f);
      uint32_t bits;
      std::memcpy(&bits, &f, 4);
      buf[i] = static_cast<uint16_t>(bits >> 16);
    }
    w.dtype = DType::kBF16;
    w.data = buf.get();
    m->keep_alive.push_back(std::move(buf));
  };
  fill(m->embed);
  fill(m->output);
  for (LoadedLayer& L : m->layers) {
    for (Weight* w : {&L.wq, &L.wk, &L.wv, &L.wo, &L.w_gate, &L.w_up, &L.w_down}) fill(*w);
  }
}

}  // namespace dyn
