// The native engine's model: a Llama-family decoder that runs one batched forward step over a
// paged KV cache. Model code is written once against the Backend interface (backend/backend.h);
// CPU and CUDA backends plug in below it, the scheduler above it never sees either.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "base/status.h"
#include "engine/native/backend/backend.h"  // DType

namespace dyn {

struct RopeScaling {
  std::string type;  // "" (none), "llama3", "linear"
  float factor = 1.0f;
  float low_freq_factor = 1.0f;
  float high_freq_factor = 4.0f;
  int original_max_position_embeddings = 8192;
};

struct ModelConfig {
  std::string architecture;  // "llama", "mistral", "qwen2", "qwen3" (after normalisation)
  int vocab_size = 0;
  int hidden_size = 0;
  int intermediate_size = 0;
  int num_layers = 0;
  int num_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int max_position_embeddings = 0;  // the context length
  float rms_norm_eps = 1e-5f;
  float rope_theta = 10000.0f;
  RopeScaling rope_scaling;
  bool tie_word_embeddings = false;
  bool attention_bias = false;  // Qwen2: q/k/v projections have a bias
  bool qk_norm = false;         // Qwen3: RMSNorm over each head of q and k before RoPE
  std::vector<uint32_t> eos_token_ids;  // from config.json / generation_config.json / GGUF
  std::optional<uint32_t> bos_token_id;
};

// One sequence's share of a forward step.
struct ForwardSeq {
  std::span<const uint32_t> tokens;      // new tokens: a prefill chunk, or the one decode token
  int start_pos = 0;                     // position of tokens[0]; KV of [0, start_pos) is cached
  std::span<const int32_t> block_table;  // KV block ids covering [0, start_pos + tokens.size())
  bool want_logits = true;               // produce logits for the last new token
  // Model::LaunchSample only: >= 0 makes the one new token row `sampled_row` of the previous
  // launched step's sample, still on the device (tokens then holds one placeholder).
  int sampled_row = -1;
};

// One sequence's sampling in Model::ForwardSample (penalties, logprobs and banned ids stay with
// the host Sampler; top-k / top-p / min-p only where samples_truncated_on_device()).
struct DeviceSampling {
  float temperature = 0.0f;  // 0: greedy
  float uniform = 0.0f;      // the draw in [0, 1) when temperature > 0
  SampleCut cut;             // truncation before the draw
  bool on_host = false;      // the host samples this row: its logits come back (host_logits)
};

class Model {
 public:
  virtual ~Model() = default;
  virtual const ModelConfig& config() const = 0;
  // Bytes of KV cache one token takes (all layers, K and V).
  virtual size_t KvBytesPerToken() const = 0;
  // Element type of the KV cache: F32, or BF16 where a device backend keeps bf16 K/V.
  virtual DType KvCacheDType() const { return DType::kF32; }
  // Allocates the paged KV cache: num_blocks blocks of block_size tokens. Call once before Forward.
  virtual Status InitKvCache(int num_blocks, int block_size) = 0;
  // The same, with the cache in caller-owned host memory of at least num_blocks * block_size *
  // KvBytesPerToken() bytes (shared memory that another worker reads KV from, in disaggregated
  // serving). Backends whose kernels cannot address host memory return Unsupported.
  virtual Status InitKvCacheAt(int num_blocks, int block_size, void* host_memory, size_t bytes) {
    return Status::Unsupported("this model's backend cannot place its KV cache in host memory");
  }
  // After InitKvCache*: the cache's address if the CPU can address it (blocks laid out as
  // backend/backend.h KvLayout, F32), else nullptr (a device backend).
  virtual void* KvCacheHostMemory() { return nullptr; }
  // A device cache's blocks to or from host memory (disaggregated serving moves KV through host
  // staging blocks): cache block blocks[i] <-> host[i], KvBytesPerToken() x block_size bytes each,
  // laid out as the cache's blocks are; ordered after the forward passes already issued. Runs on
  // the thread that calls Forward. Unsupported where the cache is host memory (use it in place).
  virtual Status CopyKvBlocks(std::span<const int32_t> blocks, std::span<std::byte* const> host, bool to_host) {
    return Status::Unsupported("this model has no device KV cache to copy");
  }
  // Host to cache, as CopyKvBlocks(..., to_host = false), but from any thread while another runs
  // Forward: only for blocks no queued or running forward pass reads or writes (an import's
  // reserved blocks). Unsupported where the backend has no concurrent path: use CopyKvBlocks.
  virtual Status WriteKvBlocksConcurrently(std::span<const int32_t> blocks, std::span<std::byte* const> host) {
    return Status::Unsupported("no concurrent KV write");
  }
  // Page-locks host memory that CopyKvBlocks uses often (Backend::PinHostMemory); false: not done.
  virtual bool PinHostMemory(void* host, size_t bytes) { return false; }
  virtual void UnpinHostMemory(void* host) {}
  // Runs the batch: writes each new token's K/V into its block slot, and for each sequence with
  // want_logits (in batch order) writes vocab_size float logits to `logits`. Sequences are
  // independent: results do not depend on what else is in the batch (up to float rounding).
  virtual Status Forward(std::span<const ForwardSeq> batch, float* logits) = 0;
  // Sampling on the device, where the backend has it: Forward, then for each sequence with
  // want_logits (in batch order) tokens[i] = argmax of its logits if sampling[i].temperature == 0,
  // else the host Sampler's plain-temperature draw at sampling[i].uniform; only the ids come back.
  virtual bool samples_on_device() const { return false; }
  virtual bool samples_truncated_on_device() const { return false; }
  // Rows marked on_host are not sampled: their logits are copied to host_logits (vocab_size
  // floats each, in row order) and their tokens[i] are unspecified.
  virtual Status ForwardSample(std::span<const ForwardSeq> batch, std::span<const DeviceSampling> sampling, uint32_t* tokens,
                               float* host_logits = nullptr) {
    return Status::Unsupported("this model's backend does not sample");
  }
  // Pipelined decode (async scheduling), where samples_pipelined(): LaunchSample is ForwardSample
  // without waiting for the ids, so the host builds and launches step N + 1 (its tokens named by
  // ForwardSeq::sampled_row) while the device runs step N; TakeSample writes the ids of the oldest
  // launched step not yet taken, one per sampled row. No row may be on_host, and a launch samples
  // at least one row (one DeviceSampling per sequence with want_logits).
  virtual bool samples_pipelined() const { return false; }
  virtual Status LaunchSample(std::span<const ForwardSeq> batch, std::span<const DeviceSampling> sampling) {
    return Status::Unsupported("this model's backend does not pipeline sampling");
  }
  virtual Status TakeSample(uint32_t* tokens) { return Status::Unsupported("this model's backend does not pipeline sampling"); }
  // A device backend's free and total memory now (false on the CPU backend).
  virtual bool DeviceMemory(size_t* free_bytes, size_t* total_bytes) const { return false; }
  // Human-readable summary for logs: architecture, sizes, weight types, backend.
  virtual std::string Describe() const = 0;
};

struct ModelLoadOptions {
  std::string device = "cpu";  // "cpu" or "cuda" (builds with the CUDA backend); see DefaultDevice()
  int num_threads = 0;         // 0 = all hardware threads
  // "auto": weights from the files. "dummy": only config.json is read (a Hugging Face directory)
  // and every weight matrix is random bf16 (variance 1/cols; norms are ones, biases zeros), made
  // on the device by a GPU backend: for speed runs of a model's shape without its weights.
  std::string load_format = "auto";
  // Weight matrices converted at load, for comparing backends (not for serving):
  //   "f32": every matrix that is not F32 becomes F32 (exact for every type). The CPU backend then
  //          computes without rounding activations to 8 bits, as it does for quantized weights.
  //   "bf16": every matrix that is not F32 or BF16 becomes BF16 (round to nearest even): the values
  //          the CUDA backend holds, so a CPU model computes with the GPU's weights.
  //   "": as loaded.
  std::string convert_weights;
};

// KV cache bytes for a device of `total_bytes` of which `free_bytes` are free after the weights
// were loaded (vLLM's --gpu-memory-utilization): utilization * total, minus what is in use, minus
// `reserve_bytes` for activations and library workspaces; 0 when nothing is left.
size_t KvCacheBytesForDevice(size_t total_bytes, size_t free_bytes, double utilization, size_t reserve_bytes);
// The forward pass's workspace for steps of up to max_tokens tokens and max_seqs sequences
// (activations in F32, logits, and a fixed allowance for cuBLAS workspaces and CUDA graphs).
size_t ForwardWorkspaceBytes(const ModelConfig& config, int max_tokens, int max_seqs);

// Loads a Hugging Face directory (config.json + *.safetensors) or a .gguf file (see
// ModelLoadOptions::load_format for config-only dummy weights). Unsupported architectures and
// tensor types fail with an error that names them.
Result<std::unique_ptr<Model>> LoadModel(const std::string& path, const ModelLoadOptions& options = {});

}  // namespace dyn
