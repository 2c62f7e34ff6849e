// The Llama-family decoder (Llama, Mistral, Qwen2, Qwen3, SmolLM2, TinyLlama), written once over
// the Backend interface. One Forward flattens every sequence's new tokens into one activation
// matrix, so each weight matrix is streamed once per step for the whole batch; only attention
// looks at sequences separately (over their block tables).
#include <algorithm>
#include <cmath>
#include <numbers>
#include <sstream>

#include "engine/native/model/loaded_model.h"

namespace dyn {

Result<std::vector<float>> RopeInvFreq(const ModelConfig& c) {
  const int half = c.head_dim / 2;
  std::vector<float> inv(half);
  for (int j = 0; j < half; ++j) {
    inv[j] = 1.0f / std::pow(c.rope_theta, static_cast<float>(2 * j) / static_cast<float>(c.head_dim));
  }
  const RopeScaling& rs = c.rope_scaling;
  if (rs.type.empty() || rs.type == "default") return inv;
  if (rs.type == "linear") {
    for (float& f : inv) f /= rs.factor;
    return inv;
  }
  if (rs.type == "llama3") {
    const float old_ctx = static_cast<float>(rs.original_max_position_embeddings);
    const float low_wavelen = old_ctx / rs.low_freq_factor;
    const float high_wavelen = old_ctx / rs.high_freq_factor;
    for (float& f : inv) {
      const float wavelen = 2.0f * std::numbers::pi_v<float> / f;
      if (wavelen > low_wavelen) {
        f = f / rs.factor;
      } else if (wavelen >= high_wavelen) {
        const float smooth = (old_ctx / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor);
        f = (1.0f - smooth) * f / rs.factor + smooth * f;
      }
    }
    return inv;
  }
  return Status::Unsupported("rope_scaling type '" + rs.type + "' (supported: llama3, linear)");
}

namespace {

struct LayerParams {
  Weight wq, wk, wv, wo, w_gate, w_up, w_down;
  std::unique_ptr<Buffer> attn_norm, ffn_norm, q_norm, k_norm, bq, bk, bv;
};

class LlamaModel : public Model {
 public:
  // Takes the config and mapped files from `loaded`; Init() then takes the weights.
  LlamaModel(LoadedModel& loaded, std::unique_ptr<Backend> backend)
      : config_(std::move(loaded.config)), rope_style_(loaded.rope_style), format_(loaded.format),
        backend_(std::move(backend)), keep_alive_(std::move(loaded.keep_alive)) {}

  Status Init(LoadedModel& loaded) {
    DYN_ASSIGN_OR_RETURN(inv_freq_, RopeInvFreq(config_));
    for (size_t j = 0; j < loaded.rope_freq_factors.size(); ++j) inv_freq_[j] /= loaded.rope_freq_factors[j];
    DYN_ASSIGN_OR_RETURN(embed_, backend_->PrepareWeight(loaded.embed, &owned_));
    DYN_ASSIGN_OR_RETURN(output_, backend_->PrepareWeight(loaded.output, &owned_));
    DYN_ASSIGN_OR_RETURN(output_norm_, Upload(loaded.output_norm));
    for (LoadedLayer& l : loaded.layers) {
      LayerParams p;
      DYN_ASSIGN_OR_RETURN(p.wq, backend_->PrepareWeight(l.wq, &owned_));
      DYN_ASSIGN_OR_RETURN(p.wk, backend_->PrepareWeight(l.wk, &owned_));
      DYN_ASSIGN_OR_RETURN(p.wv, backend_->PrepareWeight(l.wv, &owned_));
      DYN_ASSIGN_OR_RETURN(p.wo, backend_->PrepareWeight(l.wo, &owned_));
      DYN_ASSIGN_OR_RETURN(p.w_gate, backend_->PrepareWeight(l.w_gate, &owned_));
      DYN_ASSIGN_OR_RETURN(p.w_up, backend_->PrepareWeight(l.w_up, &owned_));
      DYN_ASSIGN_OR_RETURN(p.w_down, backend_->PrepareWeight(l.w_down, &owned_));
      DYN_ASSIGN_OR_RETURN(p.attn_norm, Upload(l.attn_norm));
      DYN_ASSIGN_OR_RETURN(p.ffn_norm, Upload(l.ffn_norm));
      if (config_.qk_norm) {
        DYN_ASSIGN_OR_RETURN(p.q_norm, Upload(l.q_norm));
        DYN_ASSIGN_OR_RETURN(p.k_norm, Upload(l.k_norm));
      }
      if (config_.attention_bias) {
        DYN_ASSIGN_OR_RETURN(p.bq, Upload(l.bq));
        DYN_ASSIGN_OR_RETURN(p.bk, Upload(l.bk));
        DYN_ASSIGN_OR_RETURN(p.bv, Upload(l.bv));
      }
      layers_.push_back(std::move(p));
    }
    weight_summary_ = std::string("embed ") + DTypeName(embed_.dtype) + ", attn_q " + DTypeName(layers_[0].wq.dtype) +
                      ", ffn_down " + DTypeName(layers_[0].w_down.dtype) + ", output " + DTypeName(output_.dtype);
    return Status::Ok();
  }

  const ModelConfig& config() const override { return config_; }

  size_t KvBytesPerToken() const override {
    return static_cast<size_t>(config_.num_layers) * 2 * config_.num_kv_heads * config_.head_dim * KvLayoutFor(1, 1).ElementBytes();
  }
  DType KvCacheDType() const override { return KvLayoutFor(1, 1).dtype; }

  Status InitKvCache(int num_blocks, int block_size) override {
    DYN_RETURN_IF_ERROR(SetKvLayout(num_blocks, block_size));
    DYN_ASSIGN_OR_RETURN(kv_cache_, backend_->Allocate(kv_.BlockFloats() * num_blocks * kv_.ElementBytes()));
    return Status::Ok();
  }

  Status InitKvCacheAt(int num_blocks, int block_size, void* host_memory, size_t bytes) override {
    if (!backend_->host_memory()) return Model::InitKvCacheAt(num_blocks, block_size, host_memory, bytes);
    DYN_RETURN_IF_ERROR(SetKvLayout(num_blocks, block_size));
    const size_t need = kv_.BlockFloats() * num_blocks * sizeof(float);
    if (host_memory == nullptr || bytes < need) {
      return Status::InvalidArgument("InitKvCacheAt: " + std::to_string(bytes) + " bytes given, the cache needs " +
                                     std::to_string(need));
    }
    kv_cache_ = std::make_unique<HostSpan>(host_memory, need);
    return Status::Ok();
  }

  bool DeviceMemory(size_t* free_bytes, size_t* total_bytes) const override {
    return backend_->DeviceMemory(free_bytes, total_bytes);
  }

  void* KvCacheHostMemory() override { return kv_cache_ && backend_->host_memory() ? kv_cache_->data() : nullptr; }

  bool PinHostMemory(void* host, size_t bytes) override { return backend_->PinHostMemory(host, bytes); }
  void UnpinHostMemory(void* host) override { backend_->UnpinHostMemory(host); }

  Status CopyKvBlocks(std::span<const int32_t> blocks, std::span<std::byte* const> host, bool to_host) override {
    if (!kv_cache_ || backend_->host_memory()) return Model::CopyKvBlocks(blocks, host, to_host);
    return ForKvRuns(blocks, host, [&](std::byte* dev, std::byte* h, size_t bytes) {
      if (to_host) backend_->CopyToHost(h, dev, bytes);
      else backend_->CopyToBackend(dev, h, bytes);
      return true;
    });
  }
  Status WriteKvBlocksConcurrently(std::span<const int32_t> blocks, std::span<std::byte* const> host) override {
    if (!kv_cache_ || backend_->host_memory()) return Model::WriteKvBlocksConcurrently(blocks, host);
    return ForKvRuns(blocks, host, [&](std::byte* dev, std::byte* h, size_t bytes) {
      return backend_->CopyToBackendConcurrently(dev, h, bytes);
    });
  }

  Status Forward(std::span<const ForwardSeq> batch, float* logits) override { return Run(batch, logits, {}, nullptr); }
  bool samples_on_device() const override { return backend_->samples_on_device(); }
  bool samples_truncated_on_device() const override { return backend_->samples_truncated_on_device(); }
  Status ForwardSample(std::span<const ForwardSeq> batch, std::span<const DeviceSampling> sampling, uint32_t* tokens,
                       float* host_logits = nullptr) override {
    if (!backend_->samples_on_device()) return Model::ForwardSample(batch, sampling, tokens, host_logits);
    return Run(batch, host_logits, sampling, tokens);
  }
  bool samples_pipelined() const override { return backend_->samples_pipelined(); }
  Status LaunchSample(std::span<const ForwardSeq> batch, std::span<const DeviceSampling> sampling) override {
    if (!backend_->samples_pipelined()) return Model::LaunchSample(batch, sampling);
    // Every launch leaves one sample in the backend for TakeSample: a row a sequence, none on the host.
    const size_t rows = static_cast<size_t>(std::count_if(batch.begin(), batch.end(), [](const ForwardSeq& f) { return f.want_logits; }));
    if (rows == 0 || rows != sampling.size()) {
      return Status::InvalidArgument("LaunchSample: one DeviceSampling per sequence with want_logits, at least one");
    }
    for (const DeviceSampling& d : sampling) {
      if (d.on_host) return Status::InvalidArgument("LaunchSample: a row sampled on the host cannot be pipelined");
    }
    return Run(batch, nullptr, sampling, nullptr, /*pipelined=*/true);
  }
  Status TakeSample(uint32_t* tokens) override {
    if (!backend_->samples_pipelined() || backend_->TakeSampled(tokens) < 0) {
      return Status::InvalidArgument("TakeSample: no launched step to take");
    }
    return Status::Ok();
  }

  std::string Describe() const override {
    std::ostringstream os;
    os << config_.architecture << " (" << format_ << "): " << config_.num_layers << " layers, hidden " << config_.hidden_size
       << ", ffn " << config_.intermediate_size << ", heads " << config_.num_heads << "/" << config_.num_kv_heads << " x "
       << config_.head_dim << ", vocab " << config_.vocab_size << ", ctx " << config_.max_position_embeddings << "; "
       << weight_summary_ << "; rope " << (rope_style_ == RopeStyle::kNeox ? "neox" : "interleaved") << "; backend "
       << backend_->Describe();
    return os.str();
  }

 private:
  // Calls copy(device address, host address, bytes) for each run of consecutive cache blocks
  // whose host blocks are consecutive too (one copy a run). copy returning false: Unsupported.
  template <class Copy>
  Status ForKvRuns(std::span<const int32_t> blocks, std::span<std::byte* const> host, Copy copy) {
    if (blocks.size() != host.size()) return Status::InvalidArgument("KV block copy: one host address a block");
    const size_t block_bytes = kv_.BlockFloats() * kv_.ElementBytes();
    auto* cache = static_cast<std::byte*>(kv_cache_->data());
    for (size_t i = 0; i < blocks.size();) {
      if (blocks[i] < 0 || blocks[i] >= kv_.num_blocks) return Status::InvalidArgument("KV block copy: no block " + std::to_string(blocks[i]));
      size_t n = 1;
      while (i + n < blocks.size() && blocks[i + n] == blocks[i] + static_cast<int32_t>(n) && blocks[i + n] < kv_.num_blocks &&
             host[i + n] == host[i] + n * block_bytes) {
        ++n;
      }
      if (!copy(cache + static_cast<size_t>(blocks[i]) * block_bytes, host[i], n * block_bytes)) {
        return Status::Unsupported("the backend cannot copy KV blocks this way");
      }
      i += n;
    }
    return Status::Ok();
  }

  Result<std::unique_ptr<Buffer>> Upload(const std::vector<float>& v) {
    DYN_ASSIGN_OR_RETURN(auto buf, backend_->Allocate(v.size() * sizeof(float)));
    backend_->CopyToBackend(buf->data(), v.data(), v.size() * sizeof(float));
    return buf;
  }

  // Grows `buf` to hold n floats.
  Status Ensure(std::unique_ptr<Buffer>& buf, size_t n) {
    if (buf && buf->size() >= n * sizeof(float)) return Status::Ok();
    DYN_ASSIGN_OR_RETURN(buf, backend_->Allocate(n * sizeof(float) * 5 / 4 + 64));
    return Status::Ok();
  }

  Status Validate(std::span<const ForwardSeq> batch) const;
  // Forward, ending with the logits copied to `logits` or, with `tokens`, sampled on the device
  // (then `logits` receives the rows marked on_host).
  Status Run(std::span<const ForwardSeq> batch, float* logits, std::span<const DeviceSampling> sampling, uint32_t* tokens,
             bool pipelined = false);

  Status SetKvLayout(int num_blocks, int block_size) {
    if (num_blocks <= 0 || block_size <= 0) return Status::InvalidArgument("InitKvCache: num_blocks and block_size must be positive");
    kv_ = KvLayoutFor(num_blocks, block_size);
    return Status::Ok();
  }
  KvLayout KvLayoutFor(int num_blocks, int block_size) const {
    KvLayout kv;
    kv.num_layers = config_.num_layers;
    kv.num_kv_heads = config_.num_kv_heads;
    kv.head_dim = config_.head_dim;
    kv.block_size = block_size;
    kv.num_blocks = num_blocks;
    kv.dtype = backend_->host_memory() ? DType::kF32 : backend_->KvCacheDType(layers_.empty() ? DType::kF32 : layers_[0].wq.dtype);
    return kv;
  }

  // Memory the model uses but does not own (a KV cache in the caller's shared memory).
  class HostSpan : public Buffer {
   public:
    HostSpan(void* data, size_t size) : data_(data), size_(size) {}
    void* data() override { return data_; }
    size_t size() const override { return size_; }

   private:
    void* data_;
    size_t size_;
  };

  ModelConfig config_;
  RopeStyle rope_style_;
  std::string format_;
  std::unique_ptr<Backend> backend_;
  std::vector<std::shared_ptr<void>> keep_alive_;
  std::vector<std::unique_ptr<Buffer>> owned_;
  std::vector<float> inv_freq_;
  Weight embed_, output_;
  std::unique_ptr<Buffer> output_norm_;
  std::vector<LayerParams> layers_;
  std::string weight_summary_;
  KvLayout kv_;
  std::unique_ptr<Buffer> kv_cache_;
  int last_sampled_rows_ = 0;      // rows of the last step sampled on the device (ForwardSeq::sampled_row)
  // Step workspace, grown to the largest batch seen.
  std::unique_ptr<Buffer> x_, h_, q_, k_, v_, attn_, gate_, up_, cos_sin_, last_, logits_;
};

Status LlamaModel::Validate(std::span<const ForwardSeq> batch) const {
  if (!kv_cache_) return Status::Internal("Forward before InitKvCache");
  for (size_t s = 0; s < batch.size(); ++s) {
    const ForwardSeq& f = batch[s];
    if (f.tokens.empty()) return Status::InvalidArgument("Forward: sequence " + std::to_string(s) + " has no new tokens");
    if (f.start_pos < 0) return Status::InvalidArgument("Forward: negative start_pos");
    const int64_t end = f.start_pos + static_cast<int64_t>(f.tokens.size());
    if (end > config_.max_position_embeddings) {
      return Status::TooLarge("Forward: position " + std::to_string(end) + " exceeds the context length " +
                              std::to_string(config_.max_position_embeddings));
    }
    if (static_cast<int64_t>(f.block_table.size()) * kv_.block_size < end) {
      return Status::InvalidArgument("Forward: block table of sequence " + std::to_string(s) + " covers " +
                                     std::to_string(f.block_table.size() * kv_.block_size) + " tokens, needs " + std::to_string(end));
    }
    for (int32_t b : f.block_table) {
      if (b < 0 || b >= kv_.num_blocks) return Status::InvalidArgument("Forward: KV block id " + std::to_string(b) + " out of range");
    }
    if (f.sampled_row >= 0) {
      if (f.tokens.size() != 1) return Status::InvalidArgument("Forward: a sequence fed by a sampled row has one new token");
      if (!backend_->samples_pipelined() || f.sampled_row >= last_sampled_rows_) {
        return Status::InvalidArgument("Forward: sampled row " + std::to_string(f.sampled_row) + " is not in the last device sample");
      }
      continue;
    }
    for (uint32_t t : f.tokens) {
      if (t >= static_cast<uint32_t>(config_.vocab_size)) return Status::InvalidArgument("Forward: token id " + std::to_string(t) + " >= vocab size");
    }
  }
  return Status::Ok();
}

Status LlamaModel::Run(std::span<const ForwardSeq> batch, float* logits, std::span<const DeviceSampling> sampling,
                       uint32_t* tokens, bool pipelined) {
  DYN_RETURN_IF_ERROR(Validate(batch));
  const ModelConfig& c = config_;
  std::vector<uint32_t> ids;
  std::vector<int32_t> positions;
  std::vector<AttentionSeq> seqs;
  std::vector<uint32_t> logit_rows;
  for (const ForwardSeq& f : batch) {
    AttentionSeq a;
    a.row_begin = static_cast<int>(ids.size());
    a.num_rows = static_cast<int>(f.tokens.size());
    a.start_pos = f.start_pos;
    a.block_table = f.block_table;
    seqs.push_back(a);
    for (size_t i = 0; i < f.tokens.size(); ++i) {
      ids.push_back(f.sampled_row >= 0 ? kSampledRow | static_cast<uint32_t>(f.sampled_row) : f.tokens[i]);
      positions.push_back(f.start_pos + static_cast<int32_t>(i));
    }
    if (f.want_logits) logit_rows.push_back(static_cast<uint32_t>(ids.size() - 1));
  }
  const int T = static_cast<int>(ids.size());
  if (T == 0) return Status::Ok();
  const size_t hidden = c.hidden_size, q_dim = static_cast<size_t>(c.num_heads) * c.head_dim,
               kv_dim = static_cast<size_t>(c.num_kv_heads) * c.head_dim, ffn = c.intermediate_size;
  DYN_RETURN_IF_ERROR(Ensure(x_, T * hidden));
  DYN_RETURN_IF_ERROR(Ensure(h_, T * hidden));
  DYN_RETURN_IF_ERROR(Ensure(q_, T * q_dim));
  DYN_RETURN_IF_ERROR(Ensure(k_, T * kv_dim));
  DYN_RETURN_IF_ERROR(Ensure(v_, T * kv_dim));
  DYN_RETURN_IF_ERROR(Ensure(attn_, T * std::max(q_dim, hidden)));
  DYN_RETURN_IF_ERROR(Ensure(gate_, T * ffn));
  DYN_RETURN_IF_ERROR(Ensure(up_, T * ffn));
  DYN_RETURN_IF_ERROR(Ensure(cos_sin_, static_cast<size_t>(T) * c.head_dim));
  Backend& be = *backend_;
  float *x = x_->f32(), *h = h_->f32(), *q = q_->f32(), *k = k_->f32(), *v = v_->f32(), *attn = attn_->f32(),
        *gate = gate_->f32(), *up = up_->f32(), *cos_sin = cos_sin_->f32();

  be.Embedding(embed_, ids, x);
  be.RopeTable(positions, inv_freq_, cos_sin);
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  for (int l = 0; l < c.num_layers; ++l) {
    const LayerParams& p = layers_[l];
    be.RmsNorm(x, p.attn_norm->f32(), T, c.hidden_size, c.rms_norm_eps, h);
    {
      const Weight qkv[3] = {p.wq, p.wk, p.wv};
      float* const outs[3] = {q, k, v};
      be.MatMulShared(h, T, qkv, outs);
    }
    if (c.attention_bias) {
      be.AddBias(q, T, static_cast<int>(q_dim), p.bq->f32());
      be.AddBias(k, T, static_cast<int>(kv_dim), p.bk->f32());
      be.AddBias(v, T, static_cast<int>(kv_dim), p.bv->f32());
    }
    if (c.qk_norm) {
      be.HeadRmsNorm(q, T, c.num_heads, c.head_dim, p.q_norm->f32(), c.rms_norm_eps);
      be.HeadRmsNorm(k, T, c.num_kv_heads, c.head_dim, p.k_norm->f32(), c.rms_norm_eps);
    }
    be.Rope(q, T, c.num_heads, c.head_dim, cos_sin, rope_style_);
    be.Rope(k, T, c.num_kv_heads, c.head_dim, cos_sin, rope_style_);
    be.WriteKv(kv_cache_->f32(), kv_, l, seqs, k, v);
    be.Attention(kv_cache_->f32(), kv_, l, seqs, q, c.num_heads, scale, attn);
    be.MatMul(attn, T, p.wo, h);
    be.Add(x, h, T * hidden);
    be.RmsNorm(x, p.ffn_norm->f32(), T, c.hidden_size, c.rms_norm_eps, h);
    {
      const Weight gate_up[2] = {p.w_gate, p.w_up};
      float* const outs[2] = {gate, up};
      be.MatMulShared(h, T, gate_up, outs);
    }
    be.SwiGlu(gate, up, T * ffn, gate);
    be.MatMul(gate, T, p.w_down, h);
    be.Add(x, h, T * hidden);
  }
  if (logit_rows.empty()) return Status::Ok();
  const int S = static_cast<int>(logit_rows.size());
  DYN_RETURN_IF_ERROR(Ensure(logits_, static_cast<size_t>(S) * c.vocab_size));
  // The rows to sample, normalized into h (free by now). A decode step samples every row, in
  // order: no gather.
  bool all_rows = S == T;
  for (int i = 0; all_rows && i < S; ++i) all_rows = logit_rows[i] == static_cast<uint32_t>(i);
  const float* rows = x;
  if (!all_rows) {
    DYN_RETURN_IF_ERROR(Ensure(last_, S * hidden));
    be.GatherRows(x, c.hidden_size, logit_rows, last_->f32());
    rows = last_->f32();
  }
  be.RmsNorm(rows, output_norm_->f32(), S, c.hidden_size, c.rms_norm_eps, h);
  be.MatMul(h, S, output_, logits_->f32());
  if (tokens != nullptr || pipelined) {
    if (sampling.size() != static_cast<size_t>(S)) return Status::InvalidArgument("ForwardSample: one DeviceSampling per sampled sequence");
    std::vector<float> temperature(S), uniform(S);
    std::vector<SampleCut> cuts;  // empty: no row truncates
    for (int i = 0; i < S; ++i) {
      // A row the host samples gets the cheapest draw (greedy), whose token is ignored.
      temperature[i] = sampling[i].on_host ? 0.0f : sampling[i].temperature;
      uniform[i] = sampling[i].uniform;
    }
    const bool any_cut = std::any_of(sampling.begin(), sampling.end(), [&](const DeviceSampling& d) {
      return !d.on_host && d.temperature > 0.0f && d.cut.active(c.vocab_size);
    });
    if (any_cut) {
      if (!be.samples_truncated_on_device()) return Status::Unsupported("ForwardSample: this backend does not truncate on the device");
      for (const DeviceSampling& d : sampling) cuts.push_back(d.on_host ? SampleCut{} : d.cut);
    }
    be.SampleRows(logits_->f32(), S, c.vocab_size, temperature, uniform, cuts, tokens);  // pipelined: tokens == nullptr
    last_sampled_rows_ = S;
    if (pipelined) return Status::Ok();  // LaunchSample: no row is on the host
    // The host rows' logits, one copy per run of consecutive host rows.
    const size_t row = static_cast<size_t>(c.vocab_size);
    size_t copied = 0;
    for (int i = 0; i < S;) {
      if (!sampling[i].on_host) {
        ++i;
        continue;
      }
      if (logits == nullptr) return Status::InvalidArgument("ForwardSample: rows on the host need host_logits");
      int end = i + 1;
      while (end < S && sampling[end].on_host) ++end;
      be.CopyToHost(logits + copied * row, logits_->f32() + static_cast<size_t>(i) * row, (end - i) * row * sizeof(float));
      copied += static_cast<size_t>(end - i);
      i = end;
    }
    return Status::Ok();
  }
  be.CopyToHost(logits, logits_->f32(), static_cast<size_t>(S) * c.vocab_size * sizeof(float));
  return Status::Ok();
}

}  // namespace

Result<std::unique_ptr<Model>> CreateLlamaModel(LoadedModel loaded, std::unique_ptr<Backend> backend) {
  DYN_RETURN_IF_ERROR(ValidateLoadedModel(loaded));
  auto model = std::make_unique<LlamaModel>(loaded, std::move(backend));
  DYN_RETURN_IF_ERROR(model->Init(loaded));
  return std::unique_ptr<Model>(std::move(model));
}

}  // namespace dyn
