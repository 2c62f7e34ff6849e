// Compute backend interface of the native engine: memory, weight views and the kernels one
// Llama-family forward step needs. The model (model/llama_model.cpp) is written once against this
// interface; the CPU backend (cpu/) and the CUDA backend (cuda/) implement it.
//
// Conventions every backend follows:
// - Activations are F32 row-major matrices in backend memory (Buffer::data()); "m" is the number of
//   rows (flattened new tokens of the whole batch), so one matmul serves every sequence at once.
// - Weights are [rows][cols] row-major, row r = output feature r (the Hugging Face / GGUF layout),
//   in any DType. Block-quantized types need cols % 32 == 0.
// - Small host-side metadata (token ids, positions, block tables) is passed as host pointers; a
//   device backend copies it itself.
// - Results for one row never depend on the other rows of the call (same accumulation order for
//   any m), so batching sequences does not change their outputs.
// - Kernels are called from one thread at a time (the model's forward thread).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "base/status.h"

namespace dyn {

enum class DType : uint8_t { kF32, kF16, kBF16, kQ8_0, kQ4_0, kQ4_1 };

const char* DTypeName(DType t);
// Bytes of one row of `cols` elements (cols % 32 == 0 for quantized types).
size_t DTypeRowBytes(DType t, int64_t cols);
bool DTypeIsQuantized(DType t);

// A weight matrix view. The memory is owned elsewhere (a mapped file or a backend Buffer).
struct Weight {
  DType dtype = DType::kF32;
  int64_t rows = 0;
  int64_t cols = 0;
  const void* data = nullptr;
  size_t bytes() const { return static_cast<size_t>(rows) * DTypeRowBytes(dtype, cols); }
};

// A block of backend memory.
class Buffer {
 public:
  virtual ~Buffer() = default;
  virtual void* data() = 0;
  virtual size_t size() const = 0;
  float* f32() { return static_cast<float*>(data()); }
};

enum class RopeStyle : uint8_t {
  kNeox,         // rotate-half: pairs (i, i + d/2); Hugging Face, GGUF qwen2/qwen3
  kInterleaved,  // pairs (2i, 2i + 1); GGUF llama (llama.cpp permutes Q/K rows at conversion)
};

// Paged KV cache geometry. Block b holds block_size token slots for every layer:
// [layers][K|V][block_size][kv_heads][head_dim] of `dtype`, so one block is one contiguous range
// (cheap to transfer between workers). Sizes and offsets below count elements ("floats"); the cache
// is passed as float* whatever its dtype. F32 everywhere but on a device backend that asks for
// BF16 (Backend::KvCacheDType).
struct KvLayout {
  int num_layers = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int block_size = 16;
  int num_blocks = 0;
  DType dtype = DType::kF32;  // kF32 or kBF16
  size_t ElementBytes() const { return dtype == DType::kBF16 ? 2 : 4; }
  size_t TokenFloats() const { return static_cast<size_t>(num_kv_heads) * head_dim; }
  size_t BlockFloats() const { return static_cast<size_t>(num_layers) * 2 * block_size * TokenFloats(); }
  // Float offset of (block, layer, kv = 0 for K / 1 for V, slot) from the cache start.
  size_t Offset(int block, int layer, int kv, int slot) const {
    return static_cast<size_t>(block) * BlockFloats() +
           ((static_cast<size_t>(layer) * 2 + kv) * block_size + slot) * TokenFloats();
  }
};

// One sequence's rows in an attention call.
struct AttentionSeq {
  int row_begin = 0;                     // first row of this sequence in q/k/v/out
  int num_rows = 0;                      // its new tokens
  int start_pos = 0;                     // position of its first new token
  std::span<const int32_t> block_table;  // host memory; covers [0, start_pos + num_rows)
};

// Truncation of one row's distribution before a device draw (see Backend::SampleRows).
struct SampleCut {
  int top_k = 0;        // 0 or >= vocab: off
  float top_p = 1.0f;   // 1: off
  float min_p = 0.0f;   // 0: off
  bool active(int vocab) const { return (top_k > 0 && top_k < vocab) || top_p < 1.0f || min_p > 0.0f; }
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string Describe() const = 0;
  // Whether Buffers are host memory the CPU can read and write (and kernels may work on any host
  // memory, not only on Allocate's): lets the KV cache live in shared memory for KV transfer.
  virtual bool host_memory() const { return false; }
  // A device backend: its memory's free and total bytes now (false: not a device, or unknown).
  // Sizes the KV cache from --gpu-memory-utilization after the weights are loaded.
  virtual bool DeviceMemory(size_t* free_bytes, size_t* total_bytes) const { return false; }
  // Page-locks host memory the backend copies to and from often (KV staging), so copies run at
  // the link's speed; false where nothing is gained or it failed. Unpin before the memory goes.
  virtual bool PinHostMemory(void* host, size_t bytes) { return false; }
  virtual void UnpinHostMemory(void* host) {}
  // A copy from host memory into backend memory that any thread may make while another thread
  // runs the backend's kernels (its own stream; returns when the bytes have landed). Only for
  // memory no queued or running kernel touches. False: the backend has no such path.
  virtual bool CopyToBackendConcurrently(void* dst, const void* host_src, size_t bytes) { return false; }
  // Element type of the KV cache for a model whose attention weights prepared to `weight_dtype`:
  // F32 on the CPU; the CUDA backend
  // keeps bf16 K/V for bf16 models (half the bytes attention reads) and F32 for F32 models.
  virtual DType KvCacheDType(DType weight_dtype) const { return DType::kF32; }

  // ---- memory ----
  virtual Result<std::unique_ptr<Buffer>> Allocate(size_t bytes) = 0;
  // Makes a host weight (e.g. in a mapped file) usable by the kernels. The CPU backend returns it
  // unchanged (used in place); a device backend copies it into a Buffer appended to `owned`.
  // host.data == nullptr asks a device backend for random values (dummy weights for benchmarks).
  virtual Result<Weight> PrepareWeight(const Weight& host, std::vector<std::unique_ptr<Buffer>>* owned) = 0;
  virtual void CopyToBackend(void* dst, const void* host_src, size_t bytes) = 0;
  virtual void CopyToHost(void* host_dst, const void* src, size_t bytes) = 0;

  // ---- kernels ----
  // out[i][:] = table row ids[i], converted to F32. Where samples_pipelined(), an id
  // kSampledRow | r stands for row r of the last SampleRows launched before this call (its id
  // need not have reached the host).
  virtual void Embedding(const Weight& table, std::span<const uint32_t> ids, float* out) = 0;
  // out[i] = x[i] / sqrt(mean(x[i]^2) + eps) * weight; out may alias x.
  virtual void RmsNorm(const float* x, const float* weight, int m, int dim, float eps, float* out) = 0;
  // out[m][w.rows] = x[m][w.cols] * w^T. Quantized weights: x rows are quantized to 8-bit blocks
  // and multiplied with integer dot products (as llama.cpp does).
  virtual void MatMul(const float* x, int m, const Weight& w, float* out) = 0;
  // outs[i] = x * ws[i]^T for several weights that share the input (Q/K/V, gate/up): results equal
  // separate MatMul calls; a backend may run them as one parallel job.
  virtual void MatMulShared(const float* x, int m, std::span<const Weight> ws, std::span<float* const> outs) {
    for (size_t i = 0; i < ws.size(); ++i) MatMul(x, m, ws[i], outs[i]);
  }
  // out[i][:] = x[rows[i]][:] for rows of length dim.
  virtual void GatherRows(const float* x, int dim, std::span<const uint32_t> rows, float* out) = 0;
  // x[i][:] += bias for each of the m rows of length n.
  virtual void AddBias(float* x, int m, int n, const float* bias) = 0;
  // x[i] += y[i] for n floats.
  virtual void Add(float* x, const float* y, size_t n) = 0;
  // out[i] = silu(gate[i]) * up[i] for n floats; out may alias gate.
  virtual void SwiGlu(const float* gate, const float* up, size_t n, float* out) = 0;
  // cos_sin[i][j] = (cos, sin)(positions[i] * inv_freq[j]) for j < head_dim / 2, computed in F32
  // like Hugging Face; the table then serves every layer's Rope calls of this step.
  virtual void RopeTable(std::span<const int32_t> positions, std::span<const float> inv_freq, float* cos_sin) = 0;
  // Rotates each head of x[m][heads][head_dim] in place.
  virtual void Rope(float* x, int m, int heads, int head_dim, const float* cos_sin, RopeStyle style) = 0;
  // RMSNorm over each head of x[m][heads][head_dim] in place with weight[head_dim] (Qwen3 q/k norm).
  virtual void HeadRmsNorm(float* x, int m, int heads, int head_dim, const float* weight, float eps) = 0;
  // Writes k/v rows ([rows][kv_heads][head_dim]) of `layer` into their cache slots. The slots a
  // call writes lie in blocks no other sequence of the call reads (only full blocks are shared,
  // through the prefix cache), so a backend may fuse each sequence's write with its attention.
  virtual void WriteKv(float* cache, const KvLayout& layout, int layer, std::span<const AttentionSeq> seqs,
                       const float* k, const float* v) = 0;
  // Causal attention of q ([rows][heads][head_dim]) over each sequence's cached prefix and new
  // rows (already written by WriteKv); GQA maps head h to kv head h / (heads / kv_heads).
  // out: [rows][heads][head_dim].
  virtual void Attention(const float* cache, const KvLayout& layout, int layer, std::span<const AttentionSeq> seqs,
                         const float* q, int num_heads, float scale, float* out) = 0;

  // ---- sampling on the device (optional) ----
  // Whether SampleRows works; the model otherwise copies the logits and the host samples.
  virtual bool samples_on_device() const { return false; }
  // Whether SampleRows also applies SampleCuts (top-k / top-p / min-p).
  virtual bool samples_truncated_on_device() const { return false; }
  // tokens[r] (host) = one token from row r of logits ([rows][vocab], backend memory): argmax
  // (lowest id on ties) where temperature[r] == 0, else the host Sampler's plain-temperature draw
  // at uniform[r] in [0, 1): the first id where the running sum of exp((l - max) / T) passes
  // uniform[r] times the total. Only the ids come back.
  // With `cuts` (one per row, or empty for none) a row with an active cut draws from the host
  // Sampler's kept set (the k best by weight then lowest id; of those the shortest best-first
  // prefix with top_p of their mass; of those w >= min_p), in id order: the same distribution as
  // the host, not the same token for a given uniform.
  virtual void SampleRows(const float* logits, int rows, int vocab, std::span<const float> temperature,
                          std::span<const float> uniform, std::span<const SampleCut> cuts, uint32_t* tokens) {}

  // ---- pipelined sampling (optional): the host launches step N + 1 before step N's ids are back ----
  // Whether SampleRows takes tokens == nullptr: the ids then stay on the device for the next step's
  // Embedding (kSampledRow) and come back in the background; SampleRows returns without waiting.
  virtual bool samples_pipelined() const { return false; }
  // Waits for the oldest pipelined SampleRows not yet taken and writes its ids (one a row) to
  // tokens; returns how many, or -1 when none is outstanding.
  virtual int TakeSampled(uint32_t* tokens) { return -1; }
};

// An Embedding id that names a row of the last device sample (Backend::samples_pipelined).
inline constexpr uint32_t kSampledRow = 0x80000000u;

// The CPU backend: a persistent thread pool of num_threads (0 = hardware threads) threads.
std::unique_ptr<Backend> CreateCpuBackend(int num_threads);
// "cpu", or "cuda" in builds with the CUDA backend (backend/cuda/, GPU 0); other names fail with
// Unsupported.
Result<std::unique_ptr<Backend>> CreateBackend(const std::string& device, int num_threads);
// "cuda" when this build has the CUDA backend and a GPU is visible, else "cpu".
std::string DefaultDevice();

}  // namespace dyn
