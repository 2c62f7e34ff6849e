// Private to cuda_persistent.cu (the kernel) and cuda_persistent_plan.cu (its planner): the program
// the planner builds from a run of calls and the kernel executes, phase by phase.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "engine/native/backend/cuda/cuda_attention.cuh"
#include "engine/native/backend/cuda/cuda_kernels.h"

namespace dyn::cuda::persist {

constexpr int kTileBytes = 512;  // a warp's tile: 16 bytes (8 bf16) a lane
constexpr int kTileCols = kTileBytes / 2;
constexpr int kStageFloats = 16384;  // the widest input row a GEMV phase stages, and its row sums
constexpr int kChunkBytes = 8192;    // a slot of the weight ring: up to 16 tiles of one row
constexpr int kMinGrid = 64;         // multiprocessors the planner assumes at least (row sums' space)
// Rows longer than a ring slot leave, per row a block takes, beside the staged input: each chunk's
// (gate, up) sums, a count of the row's chunks done and its residual element (GemvPhase; the
// planner's room rule).
__host__ __device__ constexpr int UnitSumsFloats(int row_chunks) { return 2 * row_chunks + 2; }
constexpr int kHeadDim = 128, kGroup = 4;
constexpr int kMaxSplits = 16;
constexpr int kMaxKvHeads = 16;
// The kernel's scratch: kSyncWords counters (the exit count, the launch count that stamps this
// launch's hand-offs), then kLlEntries hand-off entries. Blocks meet through no grid barrier: every
// value one block hands another (a GEMV's output row, attention's output and its splits' partial
// results) is written as an 8-byte entry (the float's bits, this launch's stamp) and read by polling
// until the stamp is this launch's, so a phase waits only for the values it reads and no write needs
// a fence (the fence of a barrier waited for the weight stream, 1-2.6 us: docs/benchmarks/cuda.md,
// round 10). Each phase's entries have their own place (the planner's offsets), so a launch never
// reads an entry before it is written.
constexpr int kSyncWords = 4;
constexpr int kExitWord = 0, kLaunchWord = 1;
constexpr size_t kLlOffset = 16;  // bytes: the entries after the counters, 16-byte aligned
constexpr size_t kLlEntries = size_t{4} << 20;  // 32 MB: the 8B shape's 32 layers take 3.2 M
constexpr int kPartEntries = kGroup * (kHeadDim + 2);  // a (kv head, split)'s outputs [4][128], then (max, sum) [4]
constexpr int kMinGemvPhases = 8;  // shorter runs stay separate kernels
constexpr size_t kMaxPhases = 1024;  // sizes the trace buffer
// A traced launch's buffer: [2][kMaxPhases][grid] phase start/end times, then per block
// kAttnMarks words: the attention task's kAttnSteps step times summed over the launch, then how
// many of its tasks merged splits and how many it ran.
// kAttnKeyProbeMark: ns one load of the task's first key took, summed over its tasks.
constexpr int kAttnSteps = 6, kAttnMergesMark = kAttnSteps, kAttnTasksMark = kAttnSteps + 1, kAttnKeyProbeMark = kAttnSteps + 2,
              kAttnMarks = kAttnSteps + 3;
__host__ __device__ constexpr size_t TraceMarksOffset(int grid) { return 2 * kMaxPhases * static_cast<size_t>(grid); }
// Then per (phase, block) kGemvMarks words, indexed by PhaseMark. Every phase: the ns one L2 load
// took at its start and at its end (the latency its steps see behind the weight stream). GEMV
// phases also: the input staged (ns after the phase's start), chunks found already landed when
// their warp came to them, chunks taken, the ns the warps waited for chunks and the ns they spent
// on them (products, sums, epilogue), each summed over the warps (tells whether the ring's
// prefetch reaches the consumers), and the global timer when the last warp was done with its chunks.
enum PhaseMark : int {
  kMarkStaged,
  kMarkLanded,
  kMarkTaken,
  kMarkWaitNs,
  kMarkProbeStart,
  kMarkWorkNs,
  kMarkChunksDone,
  kMarkProbeEnd,
  kMarkStageLoaded,  // the block's input entries all there (its last thread's), ns after the phase's start
  kMarkStageNormed,  // the norm's scale known (thread 0), ns after the phase's start
  kGemvMarks
};
__host__ __device__ constexpr size_t TraceGemvOffset(int grid) { return TraceMarksOffset(grid) + static_cast<size_t>(kAttnMarks) * grid; }
// Then per block the multiprocessor it ran on (%smid), for DYN_CUDA_PERSIST_TRACE_FILE's dump.
__host__ __device__ constexpr size_t TraceSmidOffset(int grid) { return TraceGemvOffset(grid) + kMaxPhases * static_cast<size_t>(grid) * kGemvMarks; }
constexpr size_t TraceWords(int grid) { return TraceSmidOffset(grid) + static_cast<size_t>(grid); }

enum PhaseKind : int32_t { kGemvPhase, kAttentionPhase };

struct Phase {
  int32_t kind;
  // kGemvPhase: out[j] = input * w[j]^T; units are rows over the jobs in order, or (gate, up) row
  // pairs with SwiGLU.
  int32_t count, swiglu, tiles, cols;
  int64_t units;
  int64_t rows[kGemvMaxJobs];
  const uint16_t* w[kGemvMaxJobs];
  float* out[kGemvMaxJobs];
  float* swiglu_out;
  const float* in;      // the input row
  const float* norm_w;  // non-null: the input is RmsNorm(in) with this weight
  float eps;
  float* norm_out;  // with norm_w: block 0 also writes the normalized row here
  float* residual;  // non-null: residual[u] += out[0][u] (the Add after this GEMV; then count is 1)
  // Hand-off entries (offsets into the scratch's entries; -1: none). ll_in: the input row's (-1: the
  // input was written before the launch, read plainly); ll_res: the residual row's before this
  // phase's add; ll_out: what the phase hands on: the SwiGLU row, else the residual row, else the
  // units' outputs in order (attention: its output row).
  int64_t ll_in, ll_res, ll_out;
  // kAttentionPhase: q, k and v rows' entries (the Q/K/V phase's) and the splits' partial results'.
  int64_t ll_q, ll_k, ll_v, ll_part;
  // kAttentionPhase (one row)
  __nv_bfloat16* cache;
  CacheGeometry g;
  AttnRows meta;
  float* q;
  float* k;
  const float* v;
  const float* cos_sin;
  int32_t neox, num_heads, kv_heads;
  float scale;
  float* attn_out;
};

struct Program {
  int32_t num_phases;
  int32_t pad_;
  Phase phases[1];  // num_phases of them
};

// The per-phase times of a traced launch on stderr (DYN_CUDA_PERSIST_TRACE=1; waits for it).
void PrintPersistentTrace(cudaStream_t stream, const void* program, const unsigned long long* trace, int grid);

}  // namespace dyn::cuda::persist
