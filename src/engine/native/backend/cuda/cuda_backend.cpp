// The CUDA backend (see cuda_backend.h): device memory, weight preparation, host metadata uploads,
// the dispatch of each Backend kernel to cuda_*.cu or cuBLAS, and CUDA graph replay of repeated
// steps.
//
// Kernel calls are not launched when called: each appends a closure and its arguments (the
// "signature": every pointer and size it passes) to a pending list, and the list runs when the
// host next needs the device (CopyToHost of the logits, any copy, PrepareWeight). A list whose
// signature equals the previous one (a decode step of the same batch shape: same buffers, same
// weights, the per-step values live in device metadata uploaded outside the list) is captured
// into a CUDA graph once and then replayed with one launch, which removes the launch gaps between
// the ~15 small kernels per layer. One-off lists (prefill chunks) run eagerly, so they never pay
// for a capture. Host metadata is uploaded at call time; a second upload into the same device
// array, or a growth that would free it, first runs the pending list, so each pending kernel
// always reads the values it was called with. DYN_CUDA_GRAPHS=0 turns graphs off. The list also
// allows peephole fusions, each bitwise the same as the calls it replaces: a residual Add followed
// by an RmsNorm of the same rows; Rope of q and k followed by the WriteKv of that k; a gate/up
// GEMV followed by SwiGlu of its outputs (DYN_CUDA_FUSE, a mask, picks the last two).
#include "engine/native/backend/cuda/cuda_backend.h"

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "engine/native/backend/cuda/cuda_kernels.h"

namespace dyn {
namespace {

void CheckBlas(cublasStatus_t s, const char* what) {
  if (s == CUBLAS_STATUS_SUCCESS) return;
  std::fprintf(stderr, "cuBLAS error %d in %s\n", static_cast<int>(s), what);
  std::abort();
}

void Untrack(void* p);

class CudaBuffer : public Buffer {
 public:
  CudaBuffer(void* p, size_t n) : p_(p), n_(n) {}
  ~CudaBuffer() override { Untrack(p_), cudaFree(p_); }
  void* data() override { return p_; }
  size_t size() const override { return n_; }

 private:
  void* p_;
  size_t n_;
};

// DYN_CUDA_POISON=<byte>: every new device allocation is filled with that byte, so a kernel that
// reads memory nothing wrote gives results that depend on the byte (a check; off by default).
// DYN_CUDA_POISON_BYTES=min,max limits it to allocations of that size range (bisecting).
int g_poison = -1;
size_t g_poison_min = 0, g_poison_max = SIZE_MAX;
int g_debug_sync = 0;  // DYN_CUDA_SYNC: 1 waits after each run of the pending list, 2 after each launch too
void Poison(void* p, size_t bytes) {
  if (g_poison >= 0 && p != nullptr && bytes >= g_poison_min && bytes <= g_poison_max) {
    // cudaMemset runs on the legacy default stream, unordered with the backend's non-blocking
    // stream: finish it before anything else can write the memory.
    DYN_CUDA_CHECK(cudaMemset(p, g_poison, bytes));
    DYN_CUDA_CHECK(cudaDeviceSynchronize());
  }
}

// DYN_CUDA_SYNC=3: after each launch, a hash of every live allocation's bytes is printed (with
// the launch's op), so two runs can be diffed to find the first kernel whose results differ. The
// registry is touched only then: it is one map for the process, and engines free buffers on their
// own step threads.
struct LiveAlloc {
  uint64_t serial;
  size_t bytes;
};
std::map<void*, LiveAlloc> g_live;
uint64_t g_alloc_serial = 0, g_trace_launch = 0;
void Track(void* p, size_t bytes) {
  if (g_debug_sync >= 3 && p != nullptr) g_live[p] = {g_alloc_serial++, bytes};
}
void Untrack(void* p) {
  if (g_debug_sync >= 3) g_live.erase(p);
}
void TraceMemory(int op) {
  std::vector<std::pair<uint64_t, std::pair<void*, size_t>>> order;
  for (auto& [p, a] : g_live) order.push_back({a.serial, {p, a.bytes}});
  std::sort(order.begin(), order.end());
  std::vector<unsigned char> host;
  std::string line = "trace " + std::to_string(g_trace_launch++) + " op " + std::to_string(op) + ":";
  for (auto& [serial, pb] : order) {
    host.resize(pb.second);
    DYN_CUDA_CHECK(cudaMemcpy(host.data(), pb.first, pb.second, cudaMemcpyDeviceToHost));
    uint64_t h = 1469598103934665603ull;
    for (unsigned char c : host) h = (h ^ c) * 1099511628211ull;
    char buf[48];
    std::snprintf(buf, sizeof buf, " %llu:%04llx", static_cast<unsigned long long>(serial), static_cast<unsigned long long>(h & 0xffff));
    line += buf;
  }
  std::printf("%s\n", line.c_str());
}

// A device array that grows on demand (the old one is freed; cudaFree waits for the device).
struct Scratch {
  ~Scratch() { Untrack(p), cudaFree(p); }
  bool Fits(size_t bytes) const { return bytes <= cap; }
  void* Get(size_t bytes) {
    if (bytes > cap) {
      Untrack(p);
      DYN_CUDA_CHECK(cudaFree(p));
      cap = bytes * 5 / 4 + 256;
      DYN_CUDA_CHECK(cudaMalloc(&p, cap));
      Poison(p, cap);
      Track(p, cap);
    }
    return p;
  }
  void* p = nullptr;
  size_t cap = 0;
  std::vector<unsigned char> uploaded;  // the bytes Upload last copied into it (kept on the device since)
  // A pending kernel reads it: uploaded to, or its device values reused, since the pending list
  // last ran. A new upload then runs the list first.
  bool read_by_pending = false;
};

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Largest m that takes the GEMV kernel rather than cuBLAS. Measured on an H200: at m = 1 the
// GEMV matches cuBLAS on large matrices and is 2.4x faster on the 1024-row K/V projections (and
// fuses Q/K/V and gate/up into one launch); at m = 2 cuBLAS is already faster on the large ones
// (docs/benchmarks/cuda.md).
constexpr int kGemvRows = 1;
constexpr size_t kBlasWorkspace = size_t{32} << 20;  // fixed, so cuBLAS calls can be captured
constexpr size_t kMaxGraphs = 16;  // per part of a step (DYN_CUDA_FLUSH_LAYERS splits a step into several)
// The pending list runs before the Q/K/V of every kFlushLayers-th layer (DYN_CUDA_FLUSH_LAYERS=L or
// F,L: first after F layers, then every L; 0: once a step), so the device starts on a step's first
// layers while the host still builds the rest: the host's ~70-130 us a step then overlap the device
// instead of preceding it (context 512: batch 1 4.61-4.70 -> 4.51-4.57 ms a step, batch 8 and 64
// ~5% faster; docs/benchmarks/cuda.md round 14).
constexpr int kFlushLayers = 4;
constexpr size_t kGraphsPerStepSplit = 4;  // graphs kept: kMaxGraphs x this when steps are split
// Fusions beyond Add + RmsNorm (DYN_CUDA_FUSE, a mask; unset = all): Rope q + Rope k + WriteKv,
// gate/up GEMV + SwiGlu, the split merge inside the attention kernel, decode attention as one
// cluster per (kv head, row) with the RoPE + KV write inside it (cuda::DecodeAttention).
constexpr int kFuseRopeKv = 1, kFuseSwiGlu = 2, kFuseMerge = 4, kFuseDecode = 8, kFuseAll = 15;
// Beyond this many key splits the combine kernel merges them, not the attention kernel's last
// block of each group. Measured on an H200 (8B shape, docs/benchmarks/cuda.md round 5): with 4
// splits (batch 8 and 32 at context 512) the in-kernel merge is 0.2-0.25 ms a step faster; with
// 16-32 (batch 1 at 2048-4096, batch 8 at 4096) the combine kernel is 0.13-0.16 ms faster (its
// 32 blocks a row merge in parallel what 8 last blocks do one after another); at 16 and batch 1
// or 8 at 512-2048 they tie.
constexpr int kMaxSplitsMergedInKernel = 8;  // DYN_CUDA_MERGE_MAX overrides it (comparisons)

enum Op : uint8_t {
  kEmbed, kNorm, kGemv, kGemvMulti, kGemvSwiGlu, kSgemm, kGemm, kGather, kBias, kAdd, kAddNorm, kSwiGlu, kRopeTab, kRope, kWriteKv,
  kRopeWriteKv, kAttn, kDecodeAttn, kSample, kPersistent, kGemvResidual, kGemvStaged, kGemvSwiGluStaged
};

class CudaBackend : public Backend {
 public:
  explicit CudaBackend(int device) : device_(device) {}

  ~CudaBackend() override {
    if (stream_) Flush();
    if (stream_) cudaStreamSynchronize(stream_);
    PrintStepTimes();
    for (cudaEvent_t e : {ev_launch_, ev_done_, ev_prev_done_}) {
      if (e != nullptr) cudaEventDestroy(e);
    }
    auto free_slot = [](SampledSlot& s) {
      cudaEventDestroy(s.done);
      cudaFreeHost(s.host);
    };
    for (SampledSlot& s : sampled_free_) free_slot(s);
    for (SampledSlot& s : sampled_in_flight_) free_slot(s);
    for (auto& [sig, exec] : graphs_) cudaGraphExecDestroy(exec);
    for (auto& [bytes, p] : persist_programs_) cudaFree(p);
    cudaFree(persist_scratch_);
    if (blas_) cublasDestroy(blas_);
    cudaFree(blas_workspace_);
    if (stream_) cudaStreamDestroy(stream_);
    if (copy_stream_) cudaStreamDestroy(copy_stream_);
  }

  Status Init() {
    if (cudaError_t e = cudaSetDevice(device_); e != cudaSuccess) {
      return Status::Unavailable(std::string("cuda: cannot use device ") + std::to_string(device_) + ": " + cudaGetErrorString(e));
    }
    cudaDeviceProp prop;
    DYN_CUDA_CHECK(cudaGetDeviceProperties(&prop, device_));
    cuda::SetMultiprocessorCount(prop.multiProcessorCount);
    DYN_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    if (cublasCreate(&blas_) != CUBLAS_STATUS_SUCCESS) return Status::Unavailable("cuda: cublasCreate failed");
    CheckBlas(cublasSetStream(blas_, stream_), "cublasSetStream");
    DYN_CUDA_CHECK(cudaMalloc(&blas_workspace_, kBlasWorkspace));
    CheckBlas(cublasSetWorkspace(blas_, blas_workspace_, kBlasWorkspace), "cublasSetWorkspace");
    auto env_on = [](const char* name) {
      const char* v = std::getenv(name);
      return v == nullptr || std::string(v) != "0";
    };
    graphs_enabled_ = env_on("DYN_CUDA_GRAPHS");
    skinny_ = env_on("DYN_CUDA_SKINNY");
    const char* persist = std::getenv("DYN_CUDA_PERSIST");
    persistent_ = persist != nullptr && std::string(persist) == "1";
    const char* fuse = std::getenv("DYN_CUDA_FUSE");  // a mask of kFuse* bits; unset: all
    fuse_ = fuse == nullptr ? kFuseAll : std::atoi(fuse) & kFuseAll;
    cuda::SetProgrammaticLaunch(env_on("DYN_CUDA_PDL"));
    if (const char* poison = std::getenv("DYN_CUDA_POISON")) g_poison = std::atoi(poison) & 0xff;
    if (const char* sync = std::getenv("DYN_CUDA_SYNC")) g_debug_sync = std::atoi(sync);
    if (const char* range = std::getenv("DYN_CUDA_POISON_BYTES")) std::sscanf(range, "%zu,%zu", &g_poison_min, &g_poison_max);
    const char* attn = std::getenv("DYN_CUDA_ATTN");
    cuda::SetHalfWarpAttention(attn == nullptr || std::string(attn) != "warp");
    if (const char* late = std::getenv("DYN_CUDA_LATE")) cuda::SetLateTrigger(std::atoi(late));
    if (const char* dw = std::getenv("DYN_CUDA_DECODE_WARPS")) decode_warps_ = std::atoi(dw);
    const char* staged = std::getenv("DYN_CUDA_GEMV_STAGED");  // a mask of kStaged* bits; unset: all
    constexpr int kStagedAll = kStagedNorm | kStagedResidual | kStagedLateScale | kStagedLmHead;
    staged_mask_ = staged == nullptr ? kStagedAll : std::atoi(staged) & kStagedAll;
    const char* dm = std::getenv("DYN_CUDA_DECODE_MERGE");
    const std::string merge = dm == nullptr ? "" : dm;
    decode_merge_ = merge == "smem" ? DecodeMerge::kSmem : merge == "push" ? DecodeMerge::kPush : DecodeMerge::kGlobal;
    if (const char* splits = std::getenv("DYN_CUDA_SPLITS")) cuda::ForceAttentionSplits(std::atoi(splits));
    if (const char* rx = std::getenv("DYN_CUDA_GEMV_ROWS_X")) cuda::SetGemvRowsSharingX(rx);
    if (const char* merge = std::getenv("DYN_CUDA_MERGE_MAX")) max_splits_merged_in_kernel_ = std::atoi(merge);
    const char* weights = std::getenv("DYN_CUDA_WEIGHTS");
    f32_weights_to_bf16_ = weights != nullptr && std::string(weights) == "bf16";
    const char* kv = std::getenv("DYN_CUDA_KV");
    kv_override_ = kv != nullptr ? kv : "";
    if (const char* st = std::getenv("DYN_CUDA_STEP_TIMES"); st != nullptr && std::string(st) == "1") {
      step_times_ = true;
      DYN_CUDA_CHECK(cudaEventCreate(&ev_launch_));
      DYN_CUDA_CHECK(cudaEventCreate(&ev_done_));
      DYN_CUDA_CHECK(cudaEventCreate(&ev_prev_done_));
    }
    if (const char* bt = std::getenv("DYN_CUDA_BLOCK_TRACE")) block_trace_at_ = std::atoi(bt);
    if (const char* fl = std::getenv("DYN_CUDA_FLUSH_LAYERS")) {  // "L" or "F,L"
      int first = 0, every = 0;
      const int n = std::sscanf(fl, "%d,%d", &first, &every);
      flush_layers_ = std::max(0, n == 2 ? every : first);
      flush_first_ = std::max(1, n == 2 ? first : flush_layers_);
    }
    description_ = "cuda (" + std::string(prop.name) + ", sm_" + std::to_string(prop.major) + std::to_string(prop.minor) + ", " +
                   std::to_string(prop.totalGlobalMem >> 30) + " GiB" + (graphs_enabled_ ? ", graphs" : "") +
                   (cuda::ProgrammaticLaunch() ? ", pdl" : "") + (fuse_ == kFuseAll ? ", fused" : ", fuse " + std::to_string(fuse_)) +
                   (skinny_ ? ", skinny" : "") + (persistent_ ? ", persistent" : "") +
                   (flush_layers_ > 0 ? ", flush " + std::to_string(flush_first_) + "," + std::to_string(flush_layers_) : "") + ")";
    return Status::Ok();
  }

  std::string Describe() const override { return description_; }
  bool DeviceMemory(size_t* free_bytes, size_t* total_bytes) const override {
    return cudaMemGetInfo(free_bytes, total_bytes) == cudaSuccess;
  }
  bool PinHostMemory(void* host, size_t bytes) override {
    if (cudaHostRegister(host, bytes, cudaHostRegisterPortable) == cudaSuccess) return true;
    (void)cudaGetLastError();  // not sticky: clear it
    return false;
  }
  void UnpinHostMemory(void* host) override {
    if (cudaHostUnregister(host) != cudaSuccess) (void)cudaGetLastError();
  }
  bool CopyToBackendConcurrently(void* dst, const void* host_src, size_t bytes) override {
    std::lock_guard lock(copy_mu_);
    DYN_CUDA_CHECK(cudaSetDevice(device_));  // the calling thread's current device
    if (copy_stream_ == nullptr) DYN_CUDA_CHECK(cudaStreamCreateWithFlags(&copy_stream_, cudaStreamNonBlocking));
    DYN_CUDA_CHECK(cudaMemcpyAsync(dst, host_src, bytes, cudaMemcpyHostToDevice, copy_stream_));
    DYN_CUDA_CHECK(cudaStreamSynchronize(copy_stream_));
    return true;
  }

  // bf16 K/V for bf16 (and dequantized) models: half the bytes attention reads, and the tensor-core
  // prefill kernel reads it directly. F32 models (tiny reference models) keep an F32 cache.
  // DYN_CUDA_KV=f32 or bf16 overrides the choice (comparisons).
  DType KvCacheDType(DType weight_dtype) const override {
    if (kv_override_ == "f32") return DType::kF32;
    if (kv_override_ == "bf16") return DType::kBF16;
    return weight_dtype == DType::kF32 ? DType::kF32 : DType::kBF16;
  }

  Result<std::unique_ptr<Buffer>> Allocate(size_t bytes) override {
    // A caller growing a buffer frees the old one next (cudaFree waits only for launched work):
    // launch what is pending first, since it may use the old buffer.
    Flush();
    void* p = nullptr;
    if (cudaError_t e = cudaMalloc(&p, bytes == 0 ? 256 : bytes); e != cudaSuccess) {
      cudaGetLastError();  // clear the (non-sticky) allocation error
      return Status::ResourceExhausted("cuda backend: cannot allocate " + std::to_string(bytes) + " bytes: " + cudaGetErrorString(e));
    }
    Poison(p, bytes);
    Track(p, bytes);
    return std::unique_ptr<Buffer>(new CudaBuffer(p, bytes));
  }

  Result<Weight> PrepareWeight(const Weight& host, std::vector<std::unique_ptr<Buffer>>* owned) override;

  void CopyToBackend(void* dst, const void* src, size_t bytes) override {
    Flush();
    DYN_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_));
    DYN_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }
  void CopyToHost(void* dst, const void* src, size_t bytes) override {
    Flush();
    EndStep();
    DYN_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_));
    if (step_times_) DYN_CUDA_CHECK(cudaEventRecord(ev_done_, stream_));
    DYN_CUDA_CHECK(cudaStreamSynchronize(stream_));
    if (step_times_) NoteStepTimes();
    NoteBlockTrace();
  }

  // A step's work is launched: the next calls belong to the next step.
  void EndStep() {
    prev_step_sigs_.swap(step_sigs_);
    step_sigs_.clear();
    layers_in_step_ = 0;
  }

  // DYN_CUDA_BLOCK_TRACE=N in a diagnostic build (cuda_kernels.h): the blocks of the work between
  // the (N-1)-th and N-th host round trip are traced, written to $DYN_CUDA_BLOCK_TRACE_OUT
  // (/tmp/block_trace.csv).
  int block_trace_at_ = 0, round_trips_ = 0;
  void NoteBlockTrace() {
    if (block_trace_at_ <= 0) return;
    ++round_trips_;
    if (round_trips_ == block_trace_at_ - 1 && !cuda::BlockTraceStart()) {
      std::fprintf(stderr, "DYN_CUDA_BLOCK_TRACE: not a trace build (-DDYN_CUDA_BLOCK_TRACE)\n");
      block_trace_at_ = 0;
    } else if (round_trips_ == block_trace_at_) {
      const char* out = std::getenv("DYN_CUDA_BLOCK_TRACE_OUT");
      cuda::BlockTraceStop(out != nullptr ? out : "/tmp/block_trace.csv");
    }
  }

  // DYN_CUDA_STEP_TIMES=1: per host round trip (a CopyToHost), the device's idle time before its
  // first pending list (from the previous round trip's copy: the host's work in between) and the
  // time from that list's start to the copy's end; medians printed when the backend goes.
  bool step_times_ = false;
  bool launched_in_step_ = false, have_prev_done_ = false;
  cudaEvent_t ev_launch_ = nullptr, ev_done_ = nullptr, ev_prev_done_ = nullptr;
  std::vector<float> step_gaps_, step_busy_;
  uint64_t lists_replayed_ = 0, lists_captured_ = 0, lists_eager_ = 0;  // printed with the step times
  void NoteStepTimes() {
    if (launched_in_step_) {
      float busy = 0, gap = 0;
      DYN_CUDA_CHECK(cudaEventElapsedTime(&busy, ev_launch_, ev_done_));
      step_busy_.push_back(busy);
      if (have_prev_done_) {
        DYN_CUDA_CHECK(cudaEventElapsedTime(&gap, ev_prev_done_, ev_launch_));
        step_gaps_.push_back(gap);
      }
    }
    std::swap(ev_done_, ev_prev_done_);
    have_prev_done_ = true;
    launched_in_step_ = false;
  }
  void PrintStepTimes() {
    if (!step_times_) return;
    std::fprintf(stderr, "lists run: %llu graph replays, %llu captures, %llu eager\n", static_cast<unsigned long long>(lists_replayed_),
                 static_cast<unsigned long long>(lists_captured_), static_cast<unsigned long long>(lists_eager_));
    if (step_busy_.empty()) return;
    auto median = [](std::vector<float> v) {
      if (v.empty()) return 0.0f;
      std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
      return v[v.size() / 2];
    };
    std::fprintf(stderr, "step times: %zu round trips, device busy median %.1f us, idle before median %.1f us\n", step_busy_.size(),
                 median(step_busy_) * 1e3f, median(step_gaps_) * 1e3f);
  }

  void Embedding(const Weight& table, std::span<const uint32_t> ids, float* out) override {
    const uint32_t* d_ids = Upload(ids_, ids);
    const int n = static_cast<int>(ids.size());
    // Ids kSampledRow | r read the last sample's output, which no later kernel of the list writes
    // before this one runs (SampleRows comes last in a step).
    const uint32_t* sampled = static_cast<const uint32_t*>(sample_out_.p);
    Defer([=, this] { cuda::Embedding(stream_, table.dtype, table.data, table.cols, d_ids, sampled, n, out); }, kEmbed, table.dtype,
          table.data, table.cols, d_ids, sampled, n, out);
  }

  void RmsNorm(const float* x, const float* weight, int m, int dim, float eps, float* out) override {
    if (last_add_.x != nullptr && last_add_.x == x && last_add_.n == static_cast<size_t>(m) * dim) {
      // The residual add just before (x += y) and this norm become one kernel.
      float* xa = last_add_.x;
      const float* y = last_add_.y;
      pending_.pop_back();
      sig_.resize(last_add_.sig_size);
      Defer([=, this] { cuda::AddRmsNorm(stream_, xa, y, weight, m, dim, eps, out); }, kAddNorm, xa, y, weight, int64_t{m}, dim, eps,
            out);
      if (m == 1) {
        Persists({.kind = cuda::PersistentCall::kAddNorm, .x = xa, .y = y, .norm_w = weight, .dim = dim, .eps = eps, .norm_out = out});
      }
      return;
    }
    const size_t sig_size = sig_.size();
    Defer([=, this] { cuda::RmsNorm(stream_, x, weight, m, dim, eps, out); }, kNorm, x, weight, int64_t{m}, dim, eps, out);
    if (m == 1) {
      last_norm_ = {x, weight, dim, eps, out, sig_size};  // after Defer, which clears it
      Persists({.kind = cuda::PersistentCall::kNorm, .x = const_cast<float*>(x), .norm_w = weight, .dim = dim, .eps = eps,
                .norm_out = out});
    }
  }

  void MatMul(const float* x, int m, const Weight& w, float* out) override;

  // Decode-sized calls on bf16 weights with one shape of input run as one GEMV launch.
  void MatMulShared(const float* x, int m, std::span<const Weight> ws, std::span<float* const> outs) override {
    bool fused = m >= 1 && m <= kGemvRows && !ws.empty() && ws.size() <= cuda::kGemvMaxJobs && Aligned16(x);
    for (const Weight& w : ws) {
      fused = fused && w.dtype == DType::kBF16 && w.cols == ws[0].cols && w.cols % 8 == 0 && Aligned16(w.data);
    }
    // The norm that wrote x joins a staged GEMV (taken off the list before it may run below).
    cuda::GemvStage stage;
    const float* staged_x = x;
    const bool staged = fused && m == 1 && TakeNormFor(x, ws[0].cols, &stage, &staged_x);
    if (ws.size() == 3) {  // a layer's Q/K/V: no fusion is pending across it, so the list may run here
      const int layer = layers_in_step_++;
      // Not while a pipelined step runs: the device is busy, and one list a step is one graph.
      if (flush_layers_ > 0 && sampled_in_flight_.empty() && layer >= flush_first_ && (layer - flush_first_) % flush_layers_ == 0) {
        Flush();
      }
    }
    if (!fused) {
      if (m <= kGemvRows || !BlasBf16(x, m, ws, outs)) {
        for (size_t i = 0; i < ws.size(); ++i) MatMul(x, m, ws[i], outs[i]);
      }
      return;
    }
    const WeightJobs j = JobsOf(ws, outs);
    const int count = static_cast<int>(ws.size());
    const int64_t cols = ws[0].cols;
    const size_t sig_size = sig_.size();
    if (staged) {
      Defer([=, this] { cuda::GemvBf16Staged(stream_, staged_x, stage, count, j.w, j.rows, cols, j.out); }, kGemvStaged, staged_x, stage,
            count, j, cols);
    } else {
      Defer([=, this] { cuda::GemvBf16Multi(stream_, x, m, count, j.w, j.rows, cols, j.out); }, kGemvMulti, x, m, count, j, cols);
      if (m == 1) PersistsGemv(x, count, j, cols, nullptr);
    }
    if ((fuse_ & kFuseSwiGlu) && count == 2 && j.rows[0] == j.rows[1]) {  // gate/up: a following SwiGlu joins this kernel
      gate_up_ = {staged_x, m, j.w[0], j.w[1], j.rows[0], cols, j.out[0], j.out[1], sig_size, staged, stage};
      has_gate_up_ = true;
    }
  }

  void GatherRows(const float* x, int dim, std::span<const uint32_t> rows, float* out) override {
    const uint32_t* d_rows = Upload(gather_rows_, rows);
    const int n = static_cast<int>(rows.size());
    Defer([=, this] { cuda::GatherRows(stream_, x, dim, d_rows, n, out); }, kGather, x, dim, d_rows, n, out);
  }
  void AddBias(float* x, int m, int n, const float* bias) override {
    Defer([=, this] { cuda::AddBias(stream_, x, m, n, bias); }, kBias, x, m, n, bias);
  }
  void Add(float* x, const float* y, size_t n) override {
    if ((staged_mask_ & kStagedResidual) && !persistent_ && last_gemv_.out == y && y != nullptr &&
        static_cast<size_t>(last_gemv_.rows) == n && cuda::GemvResidualApplies()) {
      // The m = 1 GEMV that wrote y adds its rows to x as it writes them.
      const PendingGemv g = last_gemv_;
      pending_.pop_back();
      sig_.resize(g.sig_size);
      Defer([=, this] { cuda::GemvBf16Residual(stream_, g.x, g.w, g.rows, g.cols, g.out, x); }, kGemvResidual, g.x, g.w, g.rows, g.cols,
            g.out, x);
      return;
    }
    const size_t sig_size = sig_.size();
    Defer([=, this] { cuda::Add(stream_, x, y, n); }, kAdd, x, y, n);
    last_add_ = {x, y, n, sig_size};  // after Defer, which clears it
  }
  void SwiGlu(const float* gate, const float* up, size_t n, float* out) override {
    if (has_gate_up_ && gate == gate_up_.gate && up == gate_up_.up && n == static_cast<size_t>(gate_up_.m) * gate_up_.rows) {
      const GateUpCall c = gate_up_;
      pending_.pop_back();
      sig_.resize(c.sig_size);
      if (c.staged) {
        Defer([=, this] { cuda::GemvBf16SwiGluStaged(stream_, c.x, c.stage, c.w_gate, c.w_up, c.rows, c.cols, c.gate, c.up, out); },
              kGemvSwiGluStaged, c.x, c.stage, c.w_gate, c.w_up, c.rows, c.cols, c.gate, c.up, out);
        return;
      }
      Defer([=, this] { cuda::GemvBf16SwiGlu(stream_, c.x, c.m, c.w_gate, c.w_up, c.rows, c.cols, c.gate, c.up, out); }, kGemvSwiGlu,
            c.x, c.m, c.w_gate, c.w_up, c.rows, c.cols, c.gate, c.up, out);
      if (c.m == 1) PersistsGemv(c.x, 2, WeightJobs{{c.w_gate, c.w_up}, {c.rows, c.rows}, {c.gate, c.up}}, c.cols, out);
      return;
    }
    Defer([=, this] { cuda::SwiGlu(stream_, gate, up, n, out); }, kSwiGlu, gate, up, n, out);
  }

  void RopeTable(std::span<const int32_t> positions, std::span<const float> inv_freq, float* cos_sin) override {
    const int32_t* pos = Upload(positions_, positions);
    if (inv_freq_host_.size() != inv_freq.size() ||
        !std::equal(inv_freq.begin(), inv_freq.end(), inv_freq_host_.begin())) {  // constant per model: upload once
      inv_freq_host_.assign(inv_freq.begin(), inv_freq.end());
      inv_freq_dev_ = Upload(inv_freq_, inv_freq);
    }
    ReadByPending(inv_freq_);
    const float* inv = inv_freq_dev_;
    const int m = static_cast<int>(positions.size()), half = static_cast<int>(inv_freq.size());
    Defer([=, this] { cuda::RopeTable(stream_, pos, m, inv, half, cos_sin); }, kRopeTab, pos, m, inv, half, cos_sin);
  }

  void Rope(float* x, int m, int heads, int head_dim, const float* cos_sin, RopeStyle style) override {
    const RopeCall call{x, m, heads, head_dim, cos_sin, style, sig_.size()};
    const int before = num_ropes_;
    const RopeCall prev = ropes_[0];
    Defer([=, this] { cuda::Rope(stream_, x, m, heads, head_dim, cos_sin, style); }, kRope, x, m, heads, head_dim, cos_sin, style);
    if (!(fuse_ & kFuseRopeKv)) return;
    // Rope of q, then of k, then WriteKv of that k: fused into one kernel by WriteKv.
    if (before == 1) {
      ropes_[0] = prev;
      ropes_[1] = call;
      num_ropes_ = 2;
    } else {
      ropes_[0] = call;
      num_ropes_ = 1;
    }
  }
  void HeadRmsNorm(float* x, int m, int heads, int head_dim, const float* weight, float eps) override {
    const int64_t rows = int64_t{m} * heads;
    Defer([=, this] { cuda::RmsNorm(stream_, x, weight, rows, head_dim, eps, x); }, kNorm, x, weight, rows, head_dim, eps, x);
  }

  void WriteKv(float* cache, const KvLayout& layout, int layer, std::span<const AttentionSeq> seqs, const float* k,
               const float* v) override {
    const cuda::AttnRows meta = AttnMeta(layout, seqs);  // may run the pending list (clears ropes_)
    if (num_ropes_ == 2) {
      const RopeCall rq = ropes_[0], rk = ropes_[1];
      if (rk.x == k && rq.x != k && rq.x != v && rq.m == meta.rows && rk.m == meta.rows && rq.head_dim == layout.head_dim &&
          rk.head_dim == layout.head_dim && rk.heads == layout.num_kv_heads && rq.cos_sin == rk.cos_sin && rq.style == rk.style) {
        pending_.pop_back();
        pending_.pop_back();
        sig_.resize(rq.sig_size);
        Defer([=, this] { cuda::RopeWriteKv(stream_, rq.x, rq.heads, rk.x, v, rq.cos_sin, rq.style, cache, layout, layer, meta); },
              kRopeWriteKv, rq.x, rq.heads, k, v, rq.cos_sin, rq.style, cache, layout, layer, meta);
        last_rope_kv_ = {rq.x, rk.x, v, rq.cos_sin, rq.style, cache, layer, rq.sig_size};
        return;
      }
    }
    Defer([=, this] { cuda::WriteKv(stream_, cache, layout, layer, meta, k, v); }, kWriteKv, cache, layout, layer, meta, k, v);
  }
  // The attention splits' results (AttentionPartialFloats; null when there is one split).
  float* SplitScratch(const KvLayout& layout, int num_heads, const cuda::AttnRows& meta, int splits) {
    const size_t part_bytes = cuda::AttentionPartialFloats(layout, num_heads, meta, splits) * sizeof(float);
    if (!pending_.empty() && !attn_partial_.Fits(part_bytes)) Flush();  // growing frees what a pending kernel writes
    return part_bytes > 0 ? static_cast<float*>(attn_partial_.Get(part_bytes)) : nullptr;
  }
  void Attention(const float* cache, const KvLayout& layout, int layer, std::span<const AttentionSeq> seqs, const float* q,
                 int num_heads, float scale, float* out) override {
    const cuda::AttnRows meta = AttnMeta(layout, seqs);
    const int splits = cuda::AttentionSplits(layout, num_heads, meta);
    if ((fuse_ & kFuseDecode) && cuda::DecodeAttentionApplies(layout, num_heads, meta, splits)) {
      // The RopeWriteKv of this q, when it is the last pending call (same cache and layer), joins
      // the kernel.
      const RopeKvCall rk = last_rope_kv_;
      cuda::DecodeRope rope{};  // cos_sin null: no RoPE in the kernel
      if (rk.q == q && rk.cache == cache && rk.layer == layer) {
        pending_.pop_back();
        sig_.resize(rk.sig_size);
        rope = {rk.q, rk.k, rk.v, rk.cos_sin, rk.style == RopeStyle::kNeox};
      }
      const bool global = decode_merge_ == DecodeMerge::kGlobal;
      const cuda::DecodeOptions opt{.warps = decode_warps_,
                                    .partial = global ? SplitScratch(layout, num_heads, meta, splits) : nullptr,
                                    .push = decode_merge_ == DecodeMerge::kPush};
      Defer(
          [=, this] {
            cuda::DecodeAttention(stream_, const_cast<float*>(cache), layout, layer, meta, q, num_heads, scale, splits, rope, opt, out);
          },
          kDecodeAttn, cache, layout, layer, meta, q, num_heads, scale, splits, rope.k, rope.v, rope.cos_sin, rope.neox, opt.warps, opt.partial, opt.push, out);
      Persists({.kind = cuda::PersistentCall::kDecodeAttention, .cache = const_cast<float*>(cache), .layout = layout, .layer = layer,
                .meta = meta, .q = q, .num_heads = num_heads, .scale = scale, .rope = rope, .attn_out = out});
      return;
    }
    float* partial = SplitScratch(layout, num_heads, meta, splits);
    int* counters = nullptr;  // the last block of each split group merges the splits (no combine launch)
    if (splits > 1 && splits <= max_splits_merged_in_kernel_ && (fuse_ & kFuseMerge)) {
      const size_t count_bytes = cuda::AttentionCounters(layout, num_heads, meta) * sizeof(int);
      if (!attn_counters_.Fits(count_bytes)) {
        if (!pending_.empty()) Flush();  // growing frees what a pending kernel uses
        void* p = attn_counters_.Get(count_bytes);
        DYN_CUDA_CHECK(cudaMemsetAsync(p, 0, attn_counters_.cap, stream_));  // the kernels leave them zero
      }
      counters = static_cast<int*>(attn_counters_.Get(count_bytes));
    }
    Defer([=, this] { cuda::Attention(stream_, cache, layout, layer, meta, q, num_heads, scale, splits, partial, counters, out); },
          kAttn, cache, layout, layer, meta, q, num_heads, scale, splits, partial, counters, out);
  }

  bool samples_on_device() const override { return true; }
  bool samples_truncated_on_device() const override { return true; }
  // The sampling kernel joins the step's pending list (and its graph); its per-row parameters are
  // metadata uploaded like token ids, and only rows x 4 bytes of ids come back.
  void SampleRows(const float* logits, int rows, int vocab, std::span<const float> temperature, std::span<const float> uniform,
                  std::span<const SampleCut> cuts, uint32_t* tokens) override {
    if (rows == 0) return;
    // [temperature][uniform], then with cuts [top_k][top_p][min_p], rows floats each.
    sample_params_host_.assign(temperature.begin(), temperature.begin() + rows);
    sample_params_host_.insert(sample_params_host_.end(), uniform.begin(), uniform.begin() + rows);
    const bool with_cuts = !cuts.empty();
    if (with_cuts) {
      for (int r = 0; r < rows; ++r) sample_params_host_.push_back(static_cast<float>(cuts[r].top_k));
      for (int r = 0; r < rows; ++r) sample_params_host_.push_back(cuts[r].top_p);
      for (int r = 0; r < rows; ++r) sample_params_host_.push_back(cuts[r].min_p);
    }
    const float* params = Upload(sample_params_, std::span<const float>(sample_params_host_));
    const float* cut_params = with_cuts ? params + 2 * rows : nullptr;
    const size_t out_bytes = static_cast<size_t>(rows) * sizeof(uint32_t);
    if (!pending_.empty() && !sample_out_.Fits(out_bytes)) Flush();  // growing frees what a pending kernel writes
    uint32_t* out = static_cast<uint32_t*>(sample_out_.Get(out_bytes));
    Defer([=, this] { cuda::SampleRows(stream_, logits, rows, vocab, params, params + rows, cut_params, out); }, kSample, logits, rows,
          vocab, params, cut_params, out);
    if (tokens != nullptr) {
      CopyToHost(tokens, out, out_bytes);
      return;
    }
    // Pipelined: the ids go to pinned host memory behind the step, and the host goes on to build
    // the next step (its Embedding reads `out` on the device) without waiting.
    Flush();
    EndStep();
    launched_in_step_ = false;  // DYN_CUDA_STEP_TIMES measures host round trips only
    SampledSlot s;
    if (!sampled_free_.empty()) {
      s = sampled_free_.back();
      sampled_free_.pop_back();
    } else {
      DYN_CUDA_CHECK(cudaEventCreateWithFlags(&s.done, cudaEventDisableTiming));
    }
    if (s.capacity < rows) {
      if (s.host != nullptr) DYN_CUDA_CHECK(cudaFreeHost(s.host));
      s.capacity = std::max(rows, 64);
      DYN_CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&s.host), static_cast<size_t>(s.capacity) * sizeof(uint32_t)));
    }
    DYN_CUDA_CHECK(cudaMemcpyAsync(s.host, out, out_bytes, cudaMemcpyDeviceToHost, stream_));
    DYN_CUDA_CHECK(cudaEventRecord(s.done, stream_));
    s.rows = rows;
    sampled_in_flight_.push_back(s);
  }
  bool samples_pipelined() const override { return true; }
  int TakeSampled(uint32_t* tokens) override {
    if (sampled_in_flight_.empty()) return -1;
    const SampledSlot s = sampled_in_flight_.front();
    sampled_in_flight_.pop_front();
    DYN_CUDA_CHECK(cudaEventSynchronize(s.done));
    std::memcpy(tokens, s.host, static_cast<size_t>(s.rows) * sizeof(uint32_t));
    sampled_free_.push_back(s);
    return s.rows;
  }

 private:
  // Appends a kernel call to the pending list; `args` (trivially copyable values) make up its
  // part of the list's signature.
  template <class F, class... A>
  void Defer(F&& launch, Op op, const A&... args) {
    ClearFusable();
    sig_.push_back(static_cast<char>(op));
    (AppendBytes(args), ...);
    pending_.push_back({op, std::forward<F>(launch), {}});
  }
  template <class T>
  void AppendBytes(const T& v) {
    // No padding bytes (their values are unspecified), so equal arguments give equal signatures.
    static_assert(std::has_unique_object_representations_v<T> || std::is_floating_point_v<T>);
    sig_.append(reinterpret_cast<const char*>(&v), sizeof(T));
  }
  void AppendBytes(const cuda::AttnRows& m) {
    AppendBytes(m.pos);
    AppendBytes(m.table_offset);
    AppendBytes(m.tables);
    AppendBytes(m.tiles);
    AppendBytes(m.rowwise);
    AppendBytes(m.rows);
    AppendBytes(m.num_tiles);
    AppendBytes(m.decode);
    AppendBytes(m.num_rowwise);  // not max_len: it grows every decode step; the split count it sets is appended
  }
  // What a peephole fusion needs of the trailing pending calls; any new call or a run of the list
  // forgets it.
  void ClearFusable() {
    last_gemv_ = {};
    last_norm_ = {};
    last_add_ = {};
    num_ropes_ = 0;
    has_gate_up_ = false;
    last_rope_kv_ = {};
  }
  void AppendBytes(const KvLayout& l) {
    AppendBytes(l.num_layers);
    AppendBytes(l.num_kv_heads);
    AppendBytes(l.head_dim);
    AppendBytes(l.block_size);
    AppendBytes(l.num_blocks);
    AppendBytes(l.dtype);
  }

  // Up to kGemvMaxJobs bf16 weights that share one input, as the GEMV and GEMM launchers take them.
  struct WeightJobs {
    const uint16_t* w[cuda::kGemvMaxJobs];
    int64_t rows[cuda::kGemvMaxJobs];
    float* out[cuda::kGemvMaxJobs];
  };
  static WeightJobs JobsOf(std::span<const Weight> ws, std::span<float* const> outs) {
    WeightJobs j{};
    for (size_t i = 0; i < ws.size(); ++i) {
      j.w[i] = static_cast<const uint16_t*>(ws[i].data);
      j.rows[i] = ws[i].rows;
      j.out[i] = outs[i];
    }
    return j;
  }
  // The last pending call as the persistent kernel's planner sees it (recorded only when the
  // planner runs: DYN_CUDA_PERSIST=1).
  void Persists(const cuda::PersistentCall& c) {
    if (persistent_) pending_.back().persist = c;
  }
  void PersistsGemv(const float* x, int count, const WeightJobs& j, int64_t cols, float* swiglu_out) {
    if (!persistent_) return;
    cuda::PersistentCall c{.kind = cuda::PersistentCall::kGemv, .in = x, .count = count, .cols = cols, .swiglu_out = swiglu_out};
    for (int i = 0; i < count; ++i) {
      c.w[i] = j.w[i];
      c.rows[i] = j.rows[i];
      c.out[i] = j.out[i];
    }
    Persists(c);
  }
  // out[i] = x * ws[i]^T on cuBLAS for bf16 weights of one width (up to kGemvMaxJobs): x is
  // converted to bf16 once for all of them. False (nothing queued) when the weights do not qualify.
  bool BlasBf16(const float* x, int m, std::span<const Weight> ws, std::span<float* const> outs);

  // Runs the pending list: replays its graph, captures one for a list seen twice in a row, or
  // launches it eagerly.
  void Flush();

  // Copies small host metadata into `s` (stream-ordered; the host array may be reused at once:
  // a copy from pageable memory is staged before cudaMemcpyAsync returns).
  // Values equal to the scratch's last upload are not copied again (a pipelined decode step's
  // token ids and greedy sampling parameters are the same every step): one copy fewer between two
  // steps on the device.
  template <class T>
  const T* Upload(Scratch& s, std::span<const T> host) {
    const auto* bytes = reinterpret_cast<const unsigned char*>(host.data());
    if (s.p != nullptr && s.uploaded.size() == host.size_bytes() && std::equal(s.uploaded.begin(), s.uploaded.end(), bytes)) {
      ReadByPending(s);
      return static_cast<const T*>(s.p);
    }
    if (!pending_.empty() && (s.read_by_pending || !s.Fits(host.size_bytes()))) Flush();  // pending kernels read the old values
    void* p = s.Get(host.size_bytes());
    if (!host.empty()) DYN_CUDA_CHECK(cudaMemcpyAsync(p, host.data(), host.size_bytes(), cudaMemcpyHostToDevice, stream_));
    s.uploaded.assign(bytes, bytes + host.size_bytes());
    ReadByPending(s);
    return static_cast<const T*>(p);
  }
  // Marks `s` as read by the call about to be deferred. Every call that passes a scratch's device
  // values (uploaded now or earlier) must, or a later upload could overwrite them before a pending
  // kernel reads them: the list can run in parts (a growing buffer runs it), after which values
  // uploaded before the run are still read by calls deferred after it.
  void ReadByPending(Scratch& s) {
    if (s.read_by_pending) return;
    s.read_by_pending = true;
    read_by_pending_.push_back(&s);
  }

  // Per-row positions and block tables of a step (see cuda::AttnRows); copied only when they
  // differ from the last upload (Upload), since every layer of a step passes the same sequences.
  cuda::AttnRows AttnMeta(const KvLayout& layout, std::span<const AttentionSeq> seqs);

  int device_;
  std::string description_;
  cudaStream_t stream_ = nullptr;
  std::mutex copy_mu_;                   // CopyToBackendConcurrently: any thread
  cudaStream_t copy_stream_ = nullptr;   // its stream, made at first use
  cublasHandle_t blas_ = nullptr;
  void* blas_workspace_ = nullptr;
  Scratch ids_, gather_rows_, positions_, inv_freq_, attn_meta_, attn_partial_, attn_counters_, x_bf16_, sample_params_, sample_out_;
  int fuse_ = kFuseAll;               // DYN_CUDA_FUSE: which fusions run (0: none)
  bool skinny_ = true;                // DYN_CUDA_SKINNY=0: batches of 2-8 rows on cuBLAS instead of SkinnyGemmBf16
  int max_splits_merged_in_kernel_ = kMaxSplitsMergedInKernel;
  int decode_warps_ = 8;               // DYN_CUDA_DECODE_WARPS=4: decode attention's clusters as before round 17
  // How decode attention's clusters merge their splits (DYN_CUDA_DECODE_MERGE, cuda::DecodeOptions):
  // through global scratch (default), distributed shared memory (smem), or pushed warp states (push).
  enum class DecodeMerge { kGlobal, kSmem, kPush } decode_merge_ = DecodeMerge::kGlobal;
  bool f32_weights_to_bf16_ = false;  // DYN_CUDA_WEIGHTS=bf16: F32 weights become bf16 too (checks of the bf16 paths)
  std::string kv_override_;  // DYN_CUDA_KV
  std::vector<float> sample_params_host_;
  // Pipelined samples' ids on their way to the host: pinned slots, one per launched step not yet
  // taken (oldest first), and the taken ones kept for reuse.
  struct SampledSlot {
    uint32_t* host = nullptr;
    int capacity = 0, rows = 0;
    cudaEvent_t done = nullptr;
  };
  std::deque<SampledSlot> sampled_in_flight_;
  std::vector<SampledSlot> sampled_free_;
  std::vector<Scratch*> read_by_pending_;
  std::vector<float> inv_freq_host_;
  const float* inv_freq_dev_ = nullptr;
  std::vector<int32_t> attn_meta_host_, attn_tiles_, attn_rowwise_, attn_tables_;
  // Host weights already prepared, so a tied embedding/output table is uploaded once (keyed by
  // the host address: host weights must outlive the backend, as mapped model files do).
  std::map<std::tuple<const void*, DType, int64_t, int64_t>, Weight> prepared_;
  uint64_t dummy_seed_ = 1;
  // Deferred launches and CUDA graphs.
  bool graphs_enabled_ = true;
  struct Pending {
    Op op;
    std::function<void()> launch;
    cuda::PersistentCall persist;  // what the persistent kernel's planner sees of it (kNone: not one it takes)
  };
  std::vector<Pending> pending_;
  bool persistent_ = false;  // DYN_CUDA_PERSIST=1: batch-1 runs of calls as one persistent kernel
  void* persist_scratch_ = nullptr;
  // Uploaded programs by their bytes, kept while a graph may use them.
  std::map<std::string, void*> persist_programs_;
  // Replaces each run of pending calls the persistent kernel can take by one launch of it.
  void PlanPersistentRuns();
  // DYN_CUDA_GEMV_STAGED's mask (default all): a one-row norm joins the m = 1 GEMV after it
  // (kStagedNorm, cuda::GemvBf16Staged), a residual Add joins the m = 1 GEMV before it
  // (kStagedResidual, cuda::GemvBf16Residual), and the staged GEMV scales each row's sum by 1 / rms
  // at the end rather than normalizing x first (kStagedLateScale: one barrier instead of three;
  // without it the outputs are the separate kernels' bit for bit). Batch 1 of the 8B shape on an
  // H200, context 512: 4.00-4.05 ms a step with all, 4.03-4.09 without the late scale, 4.21-4.22
  // with none (4096: 4.37, 4.46, 4.58), the same greedy tokens (docs/benchmarks/cuda.md, round 18).
  // kStagedLmHead lets the final norm join the LM head too (without it: a norm kernel, then the GEMV).
  static constexpr int kStagedNorm = 1, kStagedResidual = 2, kStagedLateScale = 4, kStagedLmHead = 8;
  int staged_mask_ = 0;
  struct PendingGemv {  // the last pending call, when it is a one-weight m = 1 GEMV (joined by an Add)
    const float* x = nullptr;
    const uint16_t* w = nullptr;
    int64_t rows = 0, cols = 0;
    float* out = nullptr;
    size_t sig_size = 0;
  } last_gemv_;
  struct PendingNorm {  // the last pending call, when it is a one-row RmsNorm (joined by a staged GEMV)
    const float* x = nullptr;
    const float* w = nullptr;
    int dim = 0;
    float eps = 0.0f;
    float* out = nullptr;
    size_t sig_size = 0;
  } last_norm_;
  // The pending norm whose output is x (cols wide) taken off the list as the stage of a GEMV on x,
  // or false (nothing changes) when there is none or it does not apply.
  bool TakeNormFor(const float* x, int64_t cols, cuda::GemvStage* st, const float** raw_x) {
    if (!(staged_mask_ & kStagedNorm) || persistent_ || last_norm_.out != x || last_norm_.dim != cols) return false;
    cuda::GemvStage s{.norm_w = last_norm_.w, .eps = last_norm_.eps, .norm_out = last_norm_.out,
                      .norm_threads = cuda::RmsNormThreads(last_norm_.dim), .late_scale = (staged_mask_ & kStagedLateScale) != 0};
    if (!cuda::GemvStagedApplies(cols, s)) return false;
    pending_.pop_back();
    sig_.resize(last_norm_.sig_size);
    *st = s;
    *raw_x = last_norm_.x;
    last_norm_ = {};
    return true;
  }
  void AppendBytes(const cuda::GemvStage& st) {
    AppendBytes(st.late_scale);
    AppendBytes(st.norm_w);
    AppendBytes(st.eps);
    AppendBytes(st.norm_out);
    AppendBytes(st.norm_threads);
  }
  struct PendingAdd {  // the last pending call, when it is an Add (fused with a following RmsNorm)
    float* x = nullptr;
    const float* y = nullptr;
    size_t n = 0;
    size_t sig_size = 0;  // signature length before it
  } last_add_;
  struct RopeCall {  // a pending Rope (q, then k), fused with the WriteKv that follows them
    float* x = nullptr;
    int m = 0, heads = 0, head_dim = 0;
    const float* cos_sin = nullptr;
    RopeStyle style = RopeStyle::kNeox;
    size_t sig_size = 0;
  } ropes_[2];
  int num_ropes_ = 0;
  struct RopeKvCall {  // the last pending call, when it is a RopeWriteKv (fused into decode attention)
    float* q = nullptr;
    float* k = nullptr;
    const float* v = nullptr;
    const float* cos_sin = nullptr;
    RopeStyle style = RopeStyle::kNeox;
    const float* cache = nullptr;
    int layer = -1;
    size_t sig_size = 0;
  } last_rope_kv_;
  struct GateUpCall {  // the last pending call, when it is a two-weight GEMV (gate/up), fused with SwiGlu
    const float* x = nullptr;
    int m = 0;
    const uint16_t *w_gate = nullptr, *w_up = nullptr;
    int64_t rows = 0, cols = 0;
    float *gate = nullptr, *up = nullptr;
    size_t sig_size = 0;
    bool staged = false;  // GemvBf16Staged with `stage` (x is the norm's input then)
    cuda::GemvStage stage;
  } gate_up_;
  bool has_gate_up_ = false;
  std::string sig_, last_sig_;
  // DYN_CUDA_FLUSH_LAYERS=F,L: the pending list runs before the Q/K/V of layer F, F + L, ... (a step
  // is then several lists, each its own graph). The hashes of the signatures of this step's and the
  // previous step's lists (between two CopyToHost), so each part is captured the second time it is
  // seen (a collision only costs a capture: graphs are keyed by the whole signature).
  int flush_layers_ = kFlushLayers, flush_first_ = kFlushLayers, layers_in_step_ = 0;
  std::vector<size_t> step_sigs_, prev_step_sigs_;
  std::unordered_map<std::string, cudaGraphExec_t> graphs_;
};

void CudaBackend::Flush() {
  if (pending_.empty()) return;
  auto it = graphs_.find(sig_);
  const size_t sig_hash = flush_layers_ > 0 ? std::hash<std::string>{}(sig_) : 0;  // only split steps use it
  if (it == graphs_.end() && persistent_) PlanPersistentRuns();
  if (step_times_ && !launched_in_step_) {
    DYN_CUDA_CHECK(cudaEventRecord(ev_launch_, stream_));
    launched_in_step_ = true;
  }
  if (it != graphs_.end()) {
    ++lists_replayed_;
    DYN_CUDA_CHECK(cudaGraphLaunch(it->second, stream_));
  } else if (graphs_enabled_ &&
             (sig_ == last_sig_ || std::find(prev_step_sigs_.begin(), prev_step_sigs_.end(), sig_hash) != prev_step_sigs_.end())) {
    if (graphs_.size() >= kMaxGraphs * (flush_layers_ > 0 ? kGraphsPerStepSplit : 1)) {
      DYN_CUDA_CHECK(cudaStreamSynchronize(stream_));
      for (auto& [s, exec] : graphs_) cudaGraphExecDestroy(exec);
      graphs_.clear();
    }
    cudaGraph_t graph;
    DYN_CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
    for (auto& p : pending_) p.launch();
    DYN_CUDA_CHECK(cudaStreamEndCapture(stream_, &graph));
    cudaGraphExec_t exec;
    DYN_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    DYN_CUDA_CHECK(cudaGraphDestroy(graph));
    DYN_CUDA_CHECK(cudaGraphLaunch(exec, stream_));
    graphs_.emplace(sig_, exec);
    ++lists_captured_;
  } else {
    ++lists_eager_;
    for (auto& [op, launch, persist] : pending_) {
      launch();
      if (g_debug_sync >= 2) DYN_CUDA_CHECK(cudaStreamSynchronize(stream_));
      if (g_debug_sync >= 3) TraceMemory(op);
    }
  }
  if (g_debug_sync >= 1) DYN_CUDA_CHECK(cudaStreamSynchronize(stream_));
  pending_.clear();
  ClearFusable();
  if (flush_layers_ > 0) step_sigs_.push_back(sig_hash);
  last_sig_.swap(sig_);
  sig_.clear();
  for (Scratch* s : read_by_pending_) s->read_by_pending = false;
  read_by_pending_.clear();
}

void CudaBackend::PlanPersistentRuns() {
  std::vector<cuda::PersistentCall> calls(pending_.size());
  for (size_t i = 0; i < pending_.size(); ++i) calls[i] = pending_[i].persist;
  std::vector<Pending> planned;
  std::vector<unsigned char> program;
  for (size_t i = 0; i < pending_.size();) {
    const int taken =
        calls[i].kind == cuda::PersistentCall::kNone ? 0 : cuda::PlanPersistent(std::span(calls).subspan(i), &program);
    if (taken == 0) {
      planned.push_back(std::move(pending_[i++]));
      continue;
    }
    if (persist_scratch_ == nullptr) {
      DYN_CUDA_CHECK(cudaMalloc(&persist_scratch_, cuda::PersistentScratchBytes()));
      DYN_CUDA_CHECK(cudaMemset(persist_scratch_, 0, cuda::PersistentScratchBytes()));
    }
    void*& dev = persist_programs_[std::string(program.begin(), program.end())];
    if (dev == nullptr) {
      DYN_CUDA_CHECK(cudaMalloc(&dev, program.size()));
      DYN_CUDA_CHECK(cudaMemcpy(dev, program.data(), program.size(), cudaMemcpyHostToDevice));
    }
    const void* prog = dev;
    void* scratch = persist_scratch_;
    planned.push_back({kPersistent, [=, this] { cuda::LaunchPersistent(stream_, prog, scratch); }, {}});
    i += static_cast<size_t>(taken);
  }
  pending_.swap(planned);
}

Result<Weight> CudaBackend::PrepareWeight(const Weight& host, std::vector<std::unique_ptr<Buffer>>* owned) {
  Flush();
  const auto key = std::make_tuple(host.data, host.dtype, host.rows, host.cols);
  if (host.data != nullptr) {
    if (auto it = prepared_.find(key); it != prepared_.end()) return it->second;
  }
  Weight dev = host;
  const size_t n = static_cast<size_t>(host.rows) * host.cols;
  if (host.data == nullptr) {
    // Dummy load format: uniform random bf16 of variance 1/cols, so activations keep their scale.
    dev.dtype = DType::kBF16;
    DYN_ASSIGN_OR_RETURN(auto buf, Allocate(n * 2));
    cuda::FillRandomBf16(stream_, static_cast<uint16_t*>(buf->data()), n, dummy_seed_++ * 0x51ED27ull,
                         std::sqrt(3.0f / static_cast<float>(host.cols)));
    // The GEMV reads weights before it waits for the kernel before it (programmatic launch).
    DYN_CUDA_CHECK(cudaStreamSynchronize(stream_));
    dev.data = buf->data();
    owned->push_back(std::move(buf));
    return dev;
  }
  if ((host.dtype == DType::kF32 && !f32_weights_to_bf16_) || host.dtype == DType::kBF16) {
    DYN_ASSIGN_OR_RETURN(auto buf, Allocate(host.bytes()));
    CopyToBackend(buf->data(), host.data, host.bytes());
    dev.data = buf->data();
    owned->push_back(std::move(buf));
  } else {
    DYN_ASSIGN_OR_RETURN(auto raw, Allocate(host.bytes()));
    CopyToBackend(raw->data(), host.data, host.bytes());
    DYN_ASSIGN_OR_RETURN(auto buf, Allocate(n * 2));
    cuda::ConvertToBf16(stream_, host.dtype, raw->data(), host.rows, host.cols, static_cast<uint16_t*>(buf->data()));
    DYN_CUDA_CHECK(cudaStreamSynchronize(stream_));  // before `raw` is freed
    dev.dtype = DType::kBF16;
    dev.data = buf->data();
    owned->push_back(std::move(buf));
  }
  prepared_[key] = dev;
  return dev;
}

void CudaBackend::MatMul(const float* x, int m, const Weight& w, float* out) {
  if (m == 0 || w.rows == 0) return;
  const int N = static_cast<int>(w.rows), K = static_cast<int>(w.cols);
  // Row-major out[m][N] = x[m][K] * w[N][K]^T is column-major out^T (N x m) = w^T' * x^T, with w
  // seen as a column-major K x N matrix (transposed) and x as K x m.
  if (w.dtype == DType::kF32) {
    const float* wf = static_cast<const float*>(w.data);
    Defer(
        [=, this] {
          cuda::BeforeLibraryCall(stream_);
          const float one = 1.0f, zero = 0.0f;
          CheckBlas(cublasSgemm(blas_, CUBLAS_OP_T, CUBLAS_OP_N, N, m, K, &one, wf, K, x, K, &zero, out, N), "cublasSgemm");
        },
        kSgemm, x, m, wf, N, K, out);
    return;
  }
  if (w.dtype != DType::kBF16) {
    std::fprintf(stderr, "cuda MatMul: weight of type %s was not prepared by PrepareWeight\n", DTypeName(w.dtype));
    std::abort();
  }
  const uint16_t* wb = static_cast<const uint16_t*>(w.data);
  if (m <= kGemvRows && K % 8 == 0 && Aligned16(x) && Aligned16(wb)) {
    if (m == 1) {
      cuda::GemvStage st;
      const float* in = x;
      const int64_t rows = N;
      if ((staged_mask_ & kStagedLmHead) && TakeNormFor(x, K, &st, &in)) {  // the LM head after the final norm
        Defer([=, this] { cuda::GemvBf16Staged(stream_, in, st, 1, &wb, &rows, K, &out); }, kGemvStaged, in, st, wb, rows, int64_t{K},
              out);
        return;
      }
    }
    const size_t sig_size = sig_.size();
    Defer([=, this] { cuda::GemvBf16(stream_, x, m, wb, N, K, out); }, kGemv, x, m, wb, int64_t{N}, int64_t{K}, out);
    if (m == 1) {
      PersistsGemv(x, 1, WeightJobs{{wb}, {N}, {out}}, K, nullptr);
      last_gemv_ = {x, wb, N, K, out, sig_size};  // after Defer, which clears it
    }
    return;
  }
  BlasBf16(x, m, std::span<const Weight>(&w, 1), std::span<float* const>(&out, 1));
}

bool CudaBackend::BlasBf16(const float* x, int m, std::span<const Weight> ws, std::span<float* const> outs) {
  if (ws.empty() || ws.size() > cuda::kGemvMaxJobs) return false;
  for (const Weight& w : ws) {
    if (w.dtype != DType::kBF16 || w.cols != ws[0].cols || w.rows == 0) return false;
  }
  const WeightJobs j = JobsOf(ws, outs);
  const int count = static_cast<int>(ws.size()), K = static_cast<int>(ws[0].cols);
  const bool skinny = skinny_ && cuda::SkinnyGemmApplies(m, K);
  // The bf16 copy of x: growing the scratch would free memory a pending conversion writes.
  const size_t xb_bytes = static_cast<size_t>(m) * K * 2;
  if (!pending_.empty() && !x_bf16_.Fits(xb_bytes)) Flush();
  uint16_t* xb = static_cast<uint16_t*>(x_bf16_.Get(xb_bytes));
  Defer(
      [=, this] {
        cuda::F32ToBf16(stream_, x, static_cast<size_t>(m) * K, xb, skinny);
        if (skinny) {
          cuda::SkinnyGemmBf16(stream_, xb, m, count, j.w, j.rows, K, j.out);
          return;
        }
        const float one = 1.0f, zero = 0.0f;
        for (int i = 0; i < count; ++i) {
          const int rows = static_cast<int>(j.rows[i]);
          CheckBlas(cublasGemmEx(blas_, CUBLAS_OP_T, CUBLAS_OP_N, rows, m, K, &one, j.w[i], CUDA_R_16BF, K, xb, CUDA_R_16BF, K, &zero,
                                 j.out[i], CUDA_R_32F, rows, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                    "cublasGemmEx");
        }
      },
      kGemm, x, m, count, j, K, xb);
  return true;
}

cuda::AttnRows CudaBackend::AttnMeta(const KvLayout& layout, std::span<const AttentionSeq> seqs) {
  // Sequences with at least kMinTileRows new rows (prefill chunks) go to the tensor-core kernel in
  // tiles of up to 64 rows where the layout has one; the rest to the row-wise kernel.
  constexpr int kMinTileRows = 16;
  const bool tiles_ok = cuda::AttentionHasTileKernel(layout);
  int rows = 0, max_len = 0;
  bool decode = true;
  for (const AttentionSeq& s : seqs) {
    rows += s.num_rows;
    decode = decode && s.num_rows == 1;
  }
  // [pos][table offsets][tiles][row-wise rows][tables]: the tables go last, so a table growing by
  // a block (every block_size decode steps) moves no pointer, and a step's signature (and graph)
  // stays the same.
  attn_tiles_.clear();
  attn_rowwise_.clear();
  attn_tables_.clear();
  std::vector<int32_t>& h = attn_meta_host_;
  h.assign(2 * static_cast<size_t>(rows), 0);
  int r = 0, table_off = 0;
  for (const AttentionSeq& s : seqs) {
    const int blocks = (s.start_pos + s.num_rows + layout.block_size - 1) / layout.block_size;
    const bool tiled = tiles_ok && s.num_rows >= kMinTileRows;
    for (int i = 0; i < s.num_rows; ++i, ++r) {
      h[r] = s.start_pos + i;
      h[rows + r] = table_off;
      if (tiled && i % cuda::kAttnTileRows == 0) {
        attn_tiles_.push_back(r);
        attn_tiles_.push_back(std::min(cuda::kAttnTileRows, s.num_rows - i));
      } else if (!tiled) {
        attn_rowwise_.push_back(r);
        max_len = std::max(max_len, s.start_pos + i + 1);
      }
    }
    attn_tables_.insert(attn_tables_.end(), s.block_table.begin(), s.block_table.begin() + blocks);
    table_off += blocks;
  }
  h.insert(h.end(), attn_tiles_.begin(), attn_tiles_.end());
  h.insert(h.end(), attn_rowwise_.begin(), attn_rowwise_.end());
  const size_t tables_begin = h.size();
  h.insert(h.end(), attn_tables_.begin(), attn_tables_.end());
  // Copied only when it differs from the last upload (Upload), i.e. once a step for all layers.
  const int32_t* dev = Upload(attn_meta_, std::span<const int32_t>(h));
  const int num_tiles = static_cast<int>(attn_tiles_.size() / 2), num_rowwise = static_cast<int>(attn_rowwise_.size());
  return {dev, dev + rows, dev + tables_begin, dev + 2 * rows, dev + 2 * rows + 2 * num_tiles, rows, num_tiles, num_rowwise, max_len, decode};
}

}  // namespace

int CudaDeviceCount() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

Result<std::unique_ptr<Backend>> CreateCudaBackend(int device) {
  const int count = CudaDeviceCount();
  if (device < 0 || device >= count) {
    return Status::Unavailable("cuda backend: device " + std::to_string(device) + " not present (" + std::to_string(count) +
                               " visible)");
  }
  auto backend = std::make_unique<CudaBackend>(device);
  DYN_RETURN_IF_ERROR(backend->Init());
  return std::unique_ptr<Backend>(std::move(backend));
}

}  // namespace dyn
