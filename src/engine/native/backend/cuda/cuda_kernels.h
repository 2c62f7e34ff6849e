// Private: host-side launchers of the CUDA backend's kernels (cuda_kernels.cu, cuda_attention.cu,
// cuda_gemv.cu). All pointers are device pointers unless a name says otherwise; every launcher
// enqueues on `stream` and returns at once. bf16 values travel as uint16_t so this header needs
// no CUDA C++ types.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "engine/native/backend/backend.h"

namespace dyn::cuda {

// Aborts with the file, line and CUDA error text when `err` is not cudaSuccess: a failed launch or
// copy inside a void kernel call is a programming error the caller cannot handle.
void Check(cudaError_t err, const char* what, const char* file, int line);
#define DYN_CUDA_CHECK(expr) ::dyn::cuda::Check((expr), #expr, __FILE__, __LINE__)
// Programmatic dependent launch for every kernel (cuda_launch.cuh): on by default; set once by the
// backend (DYN_CUDA_PDL=0 turns it off).
void SetProgrammaticLaunch(bool on);
bool ProgrammaticLaunch();
// Checks the last launch's configuration error.
#define DYN_CUDA_CHECK_LAUNCH() ::dyn::cuda::Check(cudaGetLastError(), "kernel launch", __FILE__, __LINE__)

// out[i][:] = row ids[i] of `table` (any DType, [rows][cols]) as F32; an id with the top bit set
// (kSampledRow | r) is sampled[r] instead (the last device sample, Backend::samples_pipelined).
void Embedding(cudaStream_t stream, DType dtype, const void* table, int64_t cols, const uint32_t* ids, const uint32_t* sampled, int n,
               float* out);
// dst = src ([rows][cols] of `dtype`) converted to bf16, rounding to nearest even.
void ConvertToBf16(cudaStream_t stream, DType dtype, const void* src, int64_t rows, int64_t cols, uint16_t* dst);
// dst[i] = bf16 of uniform(-scale, scale) from a counter-based hash of (seed, i).
void FillRandomBf16(cudaStream_t stream, uint16_t* dst, size_t n, uint64_t seed, float scale);
// Reads `bytes` (a multiple of 16) at p once with 16-byte streaming loads, `blocks` blocks of
// `threads` walking the buffer; the XOR of what was read lands in *sink (almost never stored).
// A benchmark probe: the device's read-only bandwidth, the physical floor of a decode step.
void ReadOnce(cudaStream_t stream, const void* p, size_t bytes, unsigned blocks, int threads, unsigned* sink);
// The block trace of a diagnostic build (-DDYN_CUDA_BLOCK_TRACE for nvcc; docs/cuda_backend.md,
// "Block trace"): BlockTraceStart clears the records and has one block in 8 of every kernel record
// when it became resident, when its wait for the previous kernel returned and the points it marks;
// BlockTraceStop writes them to `path` as CSV (sorted by release) and stops. Both return false in
// a normal build. The multiprocessor count is SetMultiprocessorCount's.
bool BlockTraceStart();
bool BlockTraceStop(const char* path);
// out[i] = bf16(x[i]). Like BeforeLibraryCall, lets the next kernel (cuBLAS) start only once done,
// unless next_early (the next kernel is one of ours, which waits before reading).
void F32ToBf16(cudaStream_t stream, const float* x, size_t n, uint16_t* out, bool next_early = false);
// A one-block kernel to put before a library call (cuBLAS) that does not follow F32ToBf16, so the
// library's kernels cannot start before the previous kernel has finished (cuda_launch.cuh).
void BeforeLibraryCall(cudaStream_t stream);

// RMSNorm of `rows` rows of length dim: out = x / sqrt(mean(x^2) + eps) * w; out may alias x.
void RmsNorm(cudaStream_t stream, const float* x, const float* w, int64_t rows, int dim, float eps, float* out);
// x += y over rows x dim, then out = RmsNorm(x) as above: the residual add and the next norm in one
// pass (bitwise the same as Add then RmsNorm).
void AddRmsNorm(cudaStream_t stream, float* x, const float* y, const float* w, int64_t rows, int dim, float eps, float* out);
void GatherRows(cudaStream_t stream, const float* x, int dim, const uint32_t* rows, int n, float* out);
void AddBias(cudaStream_t stream, float* x, int m, int n, const float* bias);
void Add(cudaStream_t stream, float* x, const float* y, size_t n);
void SwiGlu(cudaStream_t stream, const float* gate, const float* up, size_t n, float* out);
// cos_sin[i][j] = (cos, sin)(positions[i] * inv_freq[j]), j < half.
void RopeTable(cudaStream_t stream, const int32_t* positions, int m, const float* inv_freq, int half, float* cos_sin);
void Rope(cudaStream_t stream, float* x, int m, int heads, int head_dim, const float* cos_sin, RopeStyle style);

// Per-row metadata of one step's attention, packed in one device array of int32:
// [pos of row r: rows][offset of row r's block table in `tables`: rows]
// [query tiles: 2 x num_tiles][rows of the row-wise kernel: num_rowwise][tables...].
// A query tile is (first row, row count <= kAttnTileRows) of consecutive rows of one sequence, run
// by the tensor-core kernel; the other rows (decode rows, short chunks) by the row-wise kernel.
struct AttnRows {
  const int32_t* pos = nullptr;
  const int32_t* table_offset = nullptr;
  const int32_t* tables = nullptr;
  const int32_t* tiles = nullptr;
  const int32_t* rowwise = nullptr;
  int rows = 0;
  int num_tiles = 0;
  int num_rowwise = 0;
  int max_len = 0;  // longest causal range of a row-wise row (key count), sizes the split
  bool decode = false;  // every sequence has one new row (all rows row-wise): DecodeAttention applies
};
constexpr int kAttnTileRows = 64;
// Whether query tiles of `layout` can run on the tensor-core kernel (bf16 cache, head_dim 64 or 128).
bool AttentionHasTileKernel(const KvLayout& layout);

// Copies each row's k/v ([rows][kv_heads * head_dim], F32) into its cache slot of `layer`,
// rounded to bf16 (nearest even) when layout.dtype is kBF16.
void WriteKv(cudaStream_t stream, void* cache, const KvLayout& layout, int layer, const AttnRows& meta, const float* k,
             const float* v);
// Rope of q ([rows][num_heads][head_dim]) and k ([rows][kv_heads][head_dim]) in place, then WriteKv
// of the rotated k and of v: the three calls in one kernel, with the same arithmetic (bitwise the
// same results).
void RopeWriteKv(cudaStream_t stream, float* q, int num_heads, float* k, const float* v, const float* cos_sin, RopeStyle style,
                 void* cache, const KvLayout& layout, int layer, const AttnRows& meta);
// Decode attention (meta.decode) on a bf16 cache, head_dim 64 or 128, GQA groups up to 4 and at
// most kMaxClusterSplits key splits (cuda_attention_decode.cu): the splits of a (kv head, row) run
// as one thread-block cluster and merge through distributed shared memory, so there is no partial
// buffer, arrival counter or combine kernel. With `rope` the kernel first does RopeWriteKv's work
// for its row (q heads rotated in shared memory, the new token's k rotated and written to the
// cache with its v by the block whose split holds it; q and k are rotated in place as
// RopeWriteKv leaves them), one kernel boundary fewer per layer; same arithmetic, same bits.
constexpr int kMaxClusterSplits = 16;
struct DecodeRope {  // cos_sin null: no RoPE (q and the cache are ready)
  float* q;  // the call's q (rotated in place)
  float* k;  // [rows][kv_heads * head_dim], rotated in place
  const float* v;
  const float* cos_sin;
  bool neox;
};
struct DecodeOptions {
  // A block's warps where the grid has at most one block per multiprocessor: 8, or 4 as before
  // round 17 (DYN_CUDA_DECODE_WARPS).
  int warps = 8;
  // AttentionPartialFloats of scratch: the splits' results go through global memory, one cluster
  // barrier, every lane of the cluster merging one split of an output (the default: 0.6-1% faster a
  // batch-1 step than null, round 17). Null: through distributed shared memory, with a second
  // barrier so that no block leaves while a peer reads it (DYN_CUDA_DECODE_MERGE=smem).
  float* partial = nullptr;
  // Each warp's state pushed into the shared memory of the blocks that merge its dims, one cluster
  // barrier, no warps' merge and no global memory (DYN_CUDA_DECODE_MERGE=push, partial null; a split
  // count that is not a power of two merges through distributed shared memory instead).
  bool push = false;
};
bool DecodeAttentionApplies(const KvLayout& layout, int num_heads, const AttnRows& meta, int splits);
void DecodeAttention(cudaStream_t stream, void* cache, const KvLayout& layout, int layer, const AttnRows& meta, const float* q,
                     int num_heads, float scale, int splits, const DecodeRope& rope, const DecodeOptions& opt, float* out);

// The GPU's multiprocessor count, which sizes the attention grid; set once by the backend
// (device queries are kept out of kernel calls, which may run inside a graph capture).
void SetMultiprocessorCount(int n);
int MultiprocessorCount();
// Decode rows of a bf16 cache with head_dim 64 or 128 (GQA groups up to 4) on the half-warp-per-key
// kernel (default; false: the warp-per-key kernel, for comparisons: DYN_CUDA_ATTN=warp).
void SetHalfWarpAttention(bool on);
// Where the latency-bound kernels let the next kernel launch (DYN_CUDA_LATE, a mask, default 3;
// 0: at their start as every other kernel): 1: RMSNorm loads its weight before the wait, keeps its
// row in registers and triggers once the row is loaded; 2: decode attention triggers after its
// key loop. An early trigger lets the next GEMV's early weight loads queue ahead of these kernels'.
void SetLateTrigger(int mask);
int LateTrigger();
// Key-range splits of the row-wise kernel for a call (flash-decoding): 1 when (kv heads x rows)
// already fill the GPU twice, else more, by the longest row (the rule and its measurements are in
// cuda_attention.cu); a power of two, so a growing decode context changes it, and the step's
// graph, rarely.
int AttentionSplits(const KvLayout& layout, int num_heads, const AttnRows& meta);
// A fixed split count for every call (comparisons: DYN_CUDA_SPLITS); 0 restores the rule.
void ForceAttentionSplits(int splits);
// Floats of the partial-result scratch Attention needs for `splits` > 1.
size_t AttentionPartialFloats(const KvLayout& layout, int num_heads, const AttnRows& meta, int splits);
// Arrival counters the split merge needs (ints; zero before the first call, left zero after each).
size_t AttentionCounters(const KvLayout& layout, int num_heads, const AttnRows& meta);
// Causal paged attention (see Backend::Attention). head_dim <= 256 and a multiple of 8.
// partial: device scratch of AttentionPartialFloats floats (unused when splits == 1). counters:
// AttentionCounters zeroed ints, with which the last block of each split group merges the splits;
// null: a separate combine kernel does.
void Attention(cudaStream_t stream, const void* cache, const KvLayout& layout, int layer, const AttnRows& meta,
               const float* q, int num_heads, float scale, int splits, float* partial, int* counters, float* out);
// The tensor-core part (cuda_attention_mma.cu): meta.tiles only.
void AttentionTiles(cudaStream_t stream, const void* cache, const KvLayout& layout, int layer, const AttnRows& meta,
                    const float* q, int num_heads, float scale, float* out);

// out[m][rows] = x[m][cols] * w^T for bf16 w, F32 x and out, m <= kGemvMaxRows, cols % 8 == 0
// and 16-byte aligned w. A bandwidth-bound kernel for decode steps (cuBLAS is slower at m = 1).
// Each activation row adds L1 traffic (2 x 16-byte loads per 16-byte weight load), so from m = 2
// on cuBLAS is faster on an H200 and the backend uses it only at m = 1 (docs/benchmarks/cuda.md).
constexpr int kGemvMaxRows = 8;
// m = 1: the rows a 4-warp block takes, each x chunk loaded once for all of them (2, the default,
// or 4; 0: one row a group of 4 warps, 8 warps a gate/up pair), for plain GEMVs and gate/up + SwiGLU
// (gate and up rows counted; DYN_CUDA_GEMV_ROWS_X="rows[,swiglu_rows]"). The same bits either way.
void SetGemvRowsSharingX(int rows, int swiglu_rows);
void SetGemvRowsSharingX(const char* spec);  // "rows[,swiglu_rows]", as DYN_CUDA_GEMV_ROWS_X
void GemvBf16(cudaStream_t stream, const float* x, int m, const uint16_t* w, int64_t rows, int64_t cols, float* out);
// m = 1: out = x * w^T and residual += out in one kernel (GemvBf16 then Add, bitwise), where
// GemvResidualApplies (the rows-sharing-x kernel is on).
bool GemvResidualApplies();
void GemvBf16Residual(cudaStream_t stream, const float* x, const uint16_t* w, int64_t rows, int64_t cols, float* out, float* residual);
// Several weights with the same cols and input x in one launch: out[i] = x * w[i]^T.
constexpr int kGemvMaxJobs = 4;
void GemvBf16Multi(cudaStream_t stream, const float* x, int m, int count, const uint16_t* const* w, const int64_t* rows,
                   int64_t cols, float* const* out);

// m = 1 GEMVs with the RMSNorm before them inside (cuda_gemv_staged.cu): one block of 4 groups
// of 4 warps a multiprocessor walks the row groups grid-stride; each block computes RmsNorm(x) *
// norm_w once into shared memory (bitwise the norm kernel's output, which block 0 also writes to
// norm_out), so the norm kernel and its hand-offs go. Outputs bitwise those of RmsNorm followed by
// GemvBf16Multi / GemvBf16SwiGlu (with late_scale, within rounding of them).
struct GemvStage {
  const float* norm_w = nullptr;
  float eps = 0.0f;
  float* norm_out = nullptr;
  int norm_threads = 0;  // RmsNormThreads(cols): the norm kernel's summation order
  // x * norm_w staged and each row's sum scaled by 1 / rms at the end (one barrier instead of
  // three before the products; not bitwise the separate kernels: DYN_CUDA_GEMV_STAGED bit 4).
  bool late_scale = false;
};
bool GemvStagedApplies(int64_t cols, const GemvStage& st);
void GemvBf16Staged(cudaStream_t stream, const float* x, const GemvStage& st, int count, const uint16_t* const* w,
                    const int64_t* rows, int64_t cols, float* const* out);
void GemvBf16SwiGluStaged(cudaStream_t stream, const float* x, const GemvStage& st, const uint16_t* w_gate, const uint16_t* w_up,
                          int64_t rows, int64_t cols, float* gate, float* up, float* out);
// Threads of the RMSNorm kernel's block for rows of dim (its summation order depends on it).
int RmsNormThreads(int dim);

// out[i][m][rows] = x[m][cols] * w[i]^T for bf16 x and w, 1 <= m <= kSkinnyMaxRows, cols % 32 == 0,
// 16-byte aligned x and w, F32 out (cuda_gemm_skinny.cu): small decode batches on the tensor
// cores, each weight read once for all m rows. Up to kGemvMaxJobs weights sharing x in one launch.
constexpr int kSkinnyMaxRows = 8;
bool SkinnyGemmApplies(int m, int64_t cols);
void SkinnyGemmBf16(cudaStream_t stream, const uint16_t* x, int m, int count, const uint16_t* const* w, const int64_t* rows,
                    int64_t cols, float* const* out);

// gate = x * w_gate^T and up = x * w_up^T (both [m][rows]) as GemvBf16Multi, and out = SwiGlu(gate,
// up) in the same kernel (one block computes row r of both, so the product needs no second pass;
// the same arithmetic as SwiGlu). out may alias gate.
void GemvBf16SwiGlu(cudaStream_t stream, const float* x, int m, const uint16_t* w_gate, const uint16_t* w_up, int64_t rows,
                    int64_t cols, float* gate, float* up, float* out);

// ---- batch-1 decode as one persistent kernel (cuda_persistent.cu) ----
// One pending call as the persistent kernel's planner sees it; kNone: any call it cannot take.
struct PersistentCall {
  enum Kind : uint8_t { kNone, kNorm, kAddNorm, kGemv, kDecodeAttention } kind = kNone;
  // kNorm: norm_out = RmsNorm(x) with norm_w over dim; kAddNorm: x += y first (one row).
  float* x = nullptr;
  const float* y = nullptr;
  const float* norm_w = nullptr;
  int dim = 0;
  float eps = 0.0f;
  float* norm_out = nullptr;
  // kGemv (one row, bf16 weights): out[j] = in * w[j]^T; with swiglu_out (count 2: gate, up) also
  // swiglu_out = silu(out[0]) * out[1].
  const float* in = nullptr;
  int count = 0;
  const uint16_t* w[kGemvMaxJobs] = {};
  int64_t rows[kGemvMaxJobs] = {};
  int64_t cols = 0;
  float* out[kGemvMaxJobs] = {};
  float* swiglu_out = nullptr;
  // kDecodeAttention: DecodeAttention's arguments (with its RoPE + KV write).
  void* cache = nullptr;
  KvLayout layout{};
  int layer = 0;
  AttnRows meta{};
  const float* q = nullptr;
  int num_heads = 0;
  float scale = 0.0f;
  DecodeRope rope{};
  float* attn_out = nullptr;
};
// How many calls from calls[0] one persistent kernel runs (0: none, or too few to pay), and its
// program (device bytes to upload once, then pass to LaunchPersistent). It takes one-row RMSNorms
// (folded into the next GEMV's input), residual adds (into the GEMV before), bf16 GEMVs of up to
// 16384 columns (a multiple of 256) with SwiGLU, and decode attention with RoPE on a bf16 cache of
// head_dim 128 with GQA groups of 4.
int PlanPersistent(std::span<const PersistentCall> calls, std::vector<unsigned char>* program);
// Device scratch the kernel needs (zeroed once before the first launch; launches leave it so).
size_t PersistentScratchBytes();
void LaunchPersistent(cudaStream_t stream, const void* program, void* scratch);
// Host calls of LaunchPersistent so far (tests: the kernel ran; graph replays do not count).
int PersistentLaunches();

// One token per row of logits ([rows][vocab]): argmax (lowest id on ties) where temperature[r]
// <= 0, else the first id where the running sum of exp((l - max) / T) passes uniform[r] * total.
// temperature, uniform: device arrays of rows floats; out: device array of rows ids.
// cuts (null: none): [top_k][top_p][min_p], rows floats each (see Backend::SampleRows).
void SampleRows(cudaStream_t stream, const float* logits, int rows, int vocab, const float* temperature, const float* uniform,
                const float* cuts, uint32_t* out);

}  // namespace dyn::cuda
