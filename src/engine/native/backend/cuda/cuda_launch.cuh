// Private to the CUDA backend's .cu files: kernel launches with programmatic dependent launch (PDL).
//
// A decode step at batch 1 is ~400 kernels, most of them a few microseconds long, and between two
// dependent kernels the GPU normally drains the first grid before it starts launching the second.
// With PDL (Hopper) a kernel is launched while the one before it still runs: its blocks become
// resident, do what does not depend on the previous kernel (the GEMV streams its first weights),
// then wait in WaitForPreviousKernel() until the previous grid has finished and its writes are
// visible. Rules for every kernel launched through LaunchKernel:
// - call WaitForPreviousKernel() before touching any memory another kernel writes or reads (only
//   constant data such as weights may be read before it), on every path, unconditionally;
// - call LetNextKernelLaunch() (usually first): the next kernel is launched once every block of
//   this grid has called it or exited; it waits for this grid's completion all the same.
// Waiting is transitive (kernel N waits for N-1, which cannot finish before N-2), so a kernel may
// read what any earlier kernel wrote. Library kernels (cuBLAS) might be launched with programmatic
// serialization too, and nothing documents that they wait before reading their inputs, so the
// kernel right before a cuBLAS call never calls LetNextKernelLaunch (F32ToBf16, BeforeLibraryCall):
// cuBLAS then starts only once it has finished. Kernels launched without the attribute
// (DYN_CUDA_PDL=0) still trigger, so this holds in both modes. Weight preparation kernels do not
// trigger either (the GEMV reads weights before it waits).
#pragma once

#include <cuda_runtime.h>

#include <utility>

#include "engine/native/backend/cuda/cuda_kernels.h"

namespace dyn::cuda {

#ifdef DYN_CUDA_BLOCK_TRACE
// A diagnostic build (-DDYN_CUDA_BLOCK_TRACE in CMAKE_CUDA_FLAGS): one block in 8 of every kernel
// records when it became resident, when its wait for the previous kernel returned and the points
// it marks (docs/cuda_backend.md, "Block trace"). Each .cu file has its own copy of the pointer;
// BlockTraceStart and BlockTraceStop set them all.
struct BlockTraceRecord {
  unsigned long long resident_ns, released_ns;
  unsigned grid;       // gridDim.x * gridDim.y * gridDim.z
  unsigned threads;    // blockDim.x * blockDim.y, and the multiprocessor in the high 16 bits
  unsigned long long ended_ns;  // BlockTraceEnd (0: the kernel does not mark its end)
  unsigned long long mark_ns[3];  // BlockTraceMark(k) (0: not marked)
};
struct BlockTrace {
  unsigned* counts;  // one per multiprocessor
  BlockTraceRecord* records;  // kBlockTracePerSm per multiprocessor
  unsigned sms;  // %smid is not promised to be below the count: blocks on others do not record
};
constexpr unsigned kBlockTracePerSm = 1u << 14;
static __device__ BlockTrace* g_block_trace;
int RegisterBlockTraceSetter(void (*set)(BlockTrace*));
static const int g_block_trace_registered = RegisterBlockTraceSetter(
    [](BlockTrace* t) { Check(cudaMemcpyToSymbol(g_block_trace, &t, sizeof t), "cudaMemcpyToSymbol", __FILE__, __LINE__); });
__device__ __forceinline__ unsigned long long GlobalNs() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
// Thread 0's record of this block (null when it does not record), from the wait to the end.
__device__ __forceinline__ BlockTraceRecord*& BlockTraceSlot() {
  __shared__ BlockTraceRecord* slot;
  return slot;
}
#endif

// In a trace build, thread 0 marks point k (0-2) of the block's work.
__device__ __forceinline__ void BlockTraceMark(int k) {
#ifdef DYN_CUDA_BLOCK_TRACE
  if (threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0) {
    if (BlockTraceRecord* r = BlockTraceSlot()) r->mark_ns[k] = GlobalNs();
  }
#endif
}

// In a trace build, thread 0 marks the block's end (call it where the block's last result is written).
__device__ __forceinline__ void BlockTraceEnd() {
#ifdef DYN_CUDA_BLOCK_TRACE
  if (threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0) {
    if (BlockTraceRecord* r = BlockTraceSlot()) r->ended_ns = GlobalNs();
  }
#endif
}

__device__ __forceinline__ void WaitForPreviousKernel() {
#ifdef DYN_CUDA_BLOCK_TRACE
  BlockTrace* trace = g_block_trace;
  const unsigned long long resident = GlobalNs();
#endif
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
#ifdef DYN_CUDA_BLOCK_TRACE
  // One block in 8 (and the last) records, to keep the atomics' delay out of most blocks.
  if (threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0) BlockTraceSlot() = nullptr;
  if (trace != nullptr && threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0 &&
      (blockIdx.x % 8 == 0 || blockIdx.x == gridDim.x - 1)) {
    const unsigned long long released = GlobalNs();
    unsigned sm;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
    const unsigned slot = sm < trace->sms ? atomicAdd(&trace->counts[sm], 1u) : kBlockTracePerSm;
    if (slot < kBlockTracePerSm) {
      BlockTraceRecord& r = trace->records[size_t{sm} * kBlockTracePerSm + slot];
      r.resident_ns = resident;
      r.released_ns = released;
      r.grid = gridDim.x * gridDim.y * gridDim.z;
      r.threads = (blockDim.x * blockDim.y * blockDim.z) | (sm << 16);
      r.ended_ns = 0;
      r.mark_ns[0] = r.mark_ns[1] = r.mark_ns[2] = 0;
      BlockTraceSlot() = &r;
    }
  }
#endif
}

__device__ __forceinline__ void LetNextKernelLaunch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// kernel<<<grid, block, smem, stream>>>(args...), with the PDL attribute when enabled, as a grid
// of thread-block clusters of (1, 1, cluster_z) blocks when cluster_z > 0.
template <class... P, class... A>
void LaunchKernelIn(int cluster_z, void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, A&&... args) {
  cudaLaunchAttribute attr[2];
  int n = 0;
  if (ProgrammaticLaunch()) {
    attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n++].val.programmaticStreamSerializationAllowed = 1;
  }
  if (cluster_z > 0) {
    attr[n].id = cudaLaunchAttributeClusterDimension;
    attr[n].val.clusterDim.x = 1;
    attr[n].val.clusterDim.y = 1;
    attr[n++].val.clusterDim.z = static_cast<unsigned>(cluster_z);
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = static_cast<unsigned>(n);
  Check(cudaLaunchKernelEx(&cfg, kernel, std::forward<A>(args)...), "cudaLaunchKernelEx", __FILE__, __LINE__);
}

template <class... P, class... A>
void LaunchKernel(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, A&&... args) {
  LaunchKernelIn(0, kernel, grid, block, smem, stream, std::forward<A>(args)...);
}

// RMSNorm's scale from the sum of squares of a row of dim (one expression for every kernel that
// normalizes, so they agree bit for bit).
__device__ __forceinline__ float RmsScale(float total, int dim, float eps) { return 1.0f / sqrtf(total / dim + eps); }

// The sum of v over the warp's 32 lanes, in every lane.
__device__ __forceinline__ float WarpSum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The two bf16 values packed in bits (low half first) as floats.
__device__ __forceinline__ void Bf16x2ToFloat(uint32_t bits, float& lo, float& hi) {
  lo = __uint_as_float(bits << 16);
  hi = __uint_as_float(bits & 0xFFFF0000u);
}

// The eight bf16 values of a 16-byte load as floats, in order.
__device__ __forceinline__ void Bf16x8ToFloat(const uint4& v, float (&f)[8]) {
  Bf16x2ToFloat(v.x, f[0], f[1]);
  Bf16x2ToFloat(v.y, f[2], f[3]);
  Bf16x2ToFloat(v.z, f[4], f[5]);
  Bf16x2ToFloat(v.w, f[6], f[7]);
}

// acc[r] += the 8 products of weight chunk wv[r] (bf16) with x's chunk (a, b), in order: the
// m = 1 GEMVs' arithmetic (cuda_gemv.cu, cuda_gemv_staged.cu), one definition so they agree.
template <int R>
__device__ __forceinline__ void FmaChunk(const uint4 (&wv)[R], const float4& a, const float4& b, float (&acc)[R]) {
  const float xs[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
  for (int r = 0; r < R; ++r) {
    float w[8];
    Bf16x8ToFloat(wv[r], w);
#pragma unroll
    for (int k = 0; k < 8; ++k) acc[r] = fmaf(w[k], xs[k], acc[r]);
  }
}

// silu(g) * u, rounded as SwiGluKernel does; the kernels that fuse SwiGLU use it too.
__device__ __forceinline__ float SiluMul(float g, float u) { return __fmul_rn(g / (1.0f + expf(-g)), u); }

// A device load of 16 bytes that is read once (weights): not kept in L1.
__device__ __forceinline__ uint4 LoadStreaming(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// A 4-byte load issued here, in program order with the (volatile) weight loads around it: the
// compiler would otherwise sink a load whose value is used only at the kernel's end down to that
// use, putting its latency on the block's tail.
__device__ __forceinline__ float LoadNow(const float* p) {
  float v;
  asm volatile("ld.global.f32 %0, [%1];" : "=f"(v) : "l"(p));
  return v;
}

// Up to kGemvMaxJobs weights sharing one input (Q/K/V, gate/up), passed by value to the GEMV and
// skinny GEMM kernels; blocks are dealt out over the weights in order.
struct GemvJobs {
  const uint16_t* w[kGemvMaxJobs];
  float* out[kGemvMaxJobs];
  int64_t rows[kGemvMaxJobs];
  unsigned first_block[kGemvMaxJobs];
  float* swiglu_out;  // GemvBf16SwiGlu only
  float* residual;    // GemvBf16Residual only: residual[r] += out[r]
  int count;
};

// The jobs of `count` weights, each given ceil(rows / rows_per_block) blocks; *blocks: the total.
inline GemvJobs MakeGemvJobs(int count, const uint16_t* const* w, const int64_t* rows, float* const* out, int64_t rows_per_block,
                             int64_t* blocks) {
  GemvJobs jobs{};
  jobs.count = count;
  *blocks = 0;
  for (int i = 0; i < count; ++i) {
    jobs.w[i] = w[i];
    jobs.out[i] = out[i];
    jobs.rows[i] = rows[i];
    jobs.first_block[i] = static_cast<unsigned>(*blocks);
    *blocks += (rows[i] + rows_per_block - 1) / rows_per_block;
  }
  return jobs;
}

// The jobs of GemvBf16SwiGlu: gate and up, rows each, and silu(gate) * up into out.
inline GemvJobs GateUpJobs(const uint16_t* w_gate, const uint16_t* w_up, int64_t rows, float* gate, float* up, float* out) {
  GemvJobs jobs{};
  jobs.count = 2;
  jobs.w[0] = w_gate;
  jobs.w[1] = w_up;
  jobs.out[0] = gate;
  jobs.out[1] = up;
  jobs.rows[0] = jobs.rows[1] = rows;
  jobs.swiglu_out = out;
  return jobs;
}

// Block (or row group) b's weight, output and rows, and the weight's first block (constant
// indices only, so the parameter struct is not copied to local memory).
__device__ __forceinline__ void PickJobOf(const GemvJobs& jobs, unsigned b, const uint16_t*& w, float*& out, int64_t& rows,
                                          unsigned& first) {
  w = jobs.w[0];
  out = jobs.out[0];
  rows = jobs.rows[0];
  first = 0;
#pragma unroll
  for (int j = 1; j < kGemvMaxJobs; ++j) {
    if (j < jobs.count && b >= jobs.first_block[j]) {
      w = jobs.w[j];
      out = jobs.out[j];
      rows = jobs.rows[j];
      first = jobs.first_block[j];
    }
  }
}
__device__ __forceinline__ void PickJob(const GemvJobs& jobs, const uint16_t*& w, float*& out, int64_t& rows, unsigned& first) {
  PickJobOf(jobs, blockIdx.x, w, out, rows, first);
}

}  // namespace dyn::cuda
