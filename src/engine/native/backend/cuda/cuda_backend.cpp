// The CUDA backend (see cuda_backend.h): device memory, weight preparation, host metadata uploads
// and the dispatch of each Backend kernel to cuda_*.cu or cuBLAS.
#include "engine/native/backend/cuda/cuda_backend.h"

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <tuple>
#include <vector>

#include "engine/native/backend/cuda/cuda_kernels.h"

namespace dyn {
namespace {

void CheckBlas(cublasStatus_t s, const char* what) {
  if (s == CUBLAS_STATUS_SUCCESS) return;
  std::fprintf(stderr, "cuBLAS error %d in %s\n", static_cast<int>(s), what);
  std::abort();
}

class CudaBuffer : public Buffer {
 public:
  CudaBuffer(void* p, size_t n) : p_(p), n_(n) {}
  ~CudaBuffer() override { cudaFree(p_); }
  void* data() override { return p_; }
  size_t size() const override { return n_; }

 private:
  void* p_;
  size_t n_;
};

// A device array that grows on demand (the old one is freed; cudaFree waits for the device).
class Scratch {
 public:
  ~Scratch() { cudaFree(p_); }
  void* Get(size_t bytes) {
    if (bytes > cap_) {
      DYN_CUDA_CHECK(cudaFree(p_));
      cap_ = bytes * 5 / 4 + 256;
      DYN_CUDA_CHECK(cudaMalloc(&p_, cap_));
    }
    return p_;
  }

 private:
  void* p_ = nullptr;
  size_t cap_ = 0;
};

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

class CudaBackend : public Backend {
 public:
  explicit CudaBackend(int device) : device_(device) {}

  ~CudaBackend() override {
    cudaStreamSynchronize(stream_);
    if (blas_) cublasDestroy(blas_);
    if (stream_) cudaStreamDestroy(stream_);
  }

  Status Init() {
    if (cudaError_t e = cudaSetDevice(device_); e != cudaSuccess) {
      return Status::Unavailable(std::string("cuda: cannot use device ") + std::to_string(device_) + ": " + cudaGetErrorString(e));
    }
    cudaDeviceProp prop;
    DYN_CUDA_CHECK(cudaGetDeviceProperties(&prop, device_));
    DYN_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    if (cublasCreate(&blas_) != CUBLAS_STATUS_SUCCESS) return Status::Unavailable("cuda: cublasCreate failed");
    CheckBlas(cublasSetStream(blas_, stream_), "cublasSetStream");
    description_ = "cuda (" + std::string(prop.name) + ", sm_" + std::to_string(prop.major) + std::to_string(prop.minor) + ", " +
                   std::to_string(prop.totalGlobalMem >> 30) + " GiB)";
    return Status::Ok();
  }

  std::string Describe() const override { return description_; }

  Result<std::unique_ptr<Buffer>> Allocate(size_t bytes) override {
    void* p = nullptr;
    if (cudaError_t e = cudaMalloc(&p, bytes == 0 ? 256 : bytes); e != cudaSuccess) {
      cudaGetLastError();  // clear the sticky-free allocation error
      return Status::ResourceExhausted("cuda backend: cannot allocate " + std::to_string(bytes) + " bytes: " + cudaGetErrorString(e));
    }
    return std::unique_ptr<Buffer>(new CudaBuffer(p, bytes));
  }

  Result<Weight> PrepareWeight(const Weight& host, std::vector<std::unique_ptr<Buffer>>* owned) override;

  void CopyToBackend(void* dst, const void* src, size_t bytes) override {
    DYN_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_));
    DYN_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }
  void CopyToHost(void* dst, const void* src, size_t bytes) override {
    DYN_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_));
    DYN_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }

  void Embedding(const Weight& table, std::span<const uint32_t> ids, float* out) override {
    cuda::Embedding(stream_, table.dtype, table.data, table.cols, Upload(ids_, ids), static_cast<int>(ids.size()), out);
  }

  void RmsNorm(const float* x, const float* weight, int m, int dim, float eps, float* out) override {
    cuda::RmsNorm(stream_, x, weight, m, dim, eps, out);
  }

  void MatMul(const float* x, int m, const Weight& w, float* out) override;

  void GatherRows(const float* x, int dim, std::span<const uint32_t> rows, float* out) override {
    cuda::GatherRows(stream_, x, dim, Upload(gather_rows_, rows), static_cast<int>(rows.size()), out);
  }
  void AddBias(float* x, int m, int n, const float* bias) override { cuda::AddBias(stream_, x, m, n, bias); }
  void Add(float* x, const float* y, size_t n) override { cuda::Add(stream_, x, y, n); }
  void SwiGlu(const float* gate, const float* up, size_t n, float* out) override { cuda::SwiGlu(stream_, gate, up, n, out); }

  void RopeTable(std::span<const int32_t> positions, std::span<const float> inv_freq, float* cos_sin) override {
    const int32_t* pos = Upload(positions_, positions);
    if (inv_freq_host_.size() != inv_freq.size() ||
        !std::equal(inv_freq.begin(), inv_freq.end(), inv_freq_host_.begin())) {  // constant per model: upload once
      inv_freq_host_.assign(inv_freq.begin(), inv_freq.end());
      inv_freq_dev_ = Upload(inv_freq_, inv_freq);
    }
    cuda::RopeTable(stream_, pos, static_cast<int>(positions.size()), inv_freq_dev_, static_cast<int>(inv_freq.size()), cos_sin);
  }

  void Rope(float* x, int m, int heads, int head_dim, const float* cos_sin, RopeStyle style) override {
    cuda::Rope(stream_, x, m, heads, head_dim, cos_sin, style);
  }
  void HeadRmsNorm(float* x, int m, int heads, int head_dim, const float* weight, float eps) override {
    cuda::RmsNorm(stream_, x, weight, int64_t{m} * heads, head_dim, eps, x);
  }

  void WriteKv(float* cache, const KvLayout& layout, int layer, std::span<const AttentionSeq> seqs, const float* k,
               const float* v) override {
    cuda::WriteKv(stream_, cache, layout, layer, AttnMeta(layout, seqs), k, v);
  }
  void Attention(const float* cache, const KvLayout& layout, int layer, std::span<const AttentionSeq> seqs, const float* q,
                 int num_heads, float scale, float* out) override {
    cuda::Attention(stream_, cache, layout, layer, AttnMeta(layout, seqs), q, num_heads, scale, out);
  }

 private:
  // Copies small host metadata into `s` (stream-ordered; the host array may be reused at once:
  // a copy from pageable memory is staged before cudaMemcpyAsync returns).
  template <class T>
  const T* Upload(Scratch& s, std::span<const T> host) {
    void* p = s.Get(host.size_bytes());
    if (!host.empty()) DYN_CUDA_CHECK(cudaMemcpyAsync(p, host.data(), host.size_bytes(), cudaMemcpyHostToDevice, stream_));
    return static_cast<const T*>(p);
  }

  // Per-row positions and block tables of a step (see cuda::AttnRows); uploaded only when they
  // differ from the last call's, since every layer of a step passes the same sequences.
  cuda::AttnRows AttnMeta(const KvLayout& layout, std::span<const AttentionSeq> seqs);

  const void* ToBf16Input(const float* x, size_t n);

  int device_;
  std::string description_;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t blas_ = nullptr;
  Scratch ids_, gather_rows_, positions_, inv_freq_, attn_meta_, x_bf16_;
  std::vector<float> inv_freq_host_;
  const float* inv_freq_dev_ = nullptr;
  std::vector<int32_t> attn_meta_host_, attn_meta_last_;
  cuda::AttnRows attn_rows_;
  // Host weights already prepared, so a tied embedding/output table is uploaded once (keyed by
  // the host address: host weights must outlive the backend, as mapped model files do).
  std::map<std::tuple<const void*, DType, int64_t, int64_t>, Weight> prepared_;
  uint64_t dummy_seed_ = 1;
};

Result<Weight> CudaBackend::PrepareWeight(const Weight& host, std::vector<std::unique_ptr<Buffer>>* owned) {
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
    dev.data = buf->data();
    owned->push_back(std::move(buf));
    return dev;
  }
  if (host.dtype == DType::kF32 || host.dtype == DType::kBF16) {
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

const void* CudaBackend::ToBf16Input(const float* x, size_t n) {
  void* p = x_bf16_.Get(n * 2);
  cuda::F32ToBf16(stream_, x, n, static_cast<uint16_t*>(p));
  return p;
}

void CudaBackend::MatMul(const float* x, int m, const Weight& w, float* out) {
  if (m == 0 || w.rows == 0) return;
  const int N = static_cast<int>(w.rows), K = static_cast<int>(w.cols);
  const float one = 1.0f, zero = 0.0f;
  // Row-major out[m][N] = x[m][K] * w[N][K]^T is column-major out^T (N x m) = w^T' * x^T, with w
  // seen as a column-major K x N matrix (transposed) and x as K x m.
  if (w.dtype == DType::kF32) {
    CheckBlas(cublasSgemm(blas_, CUBLAS_OP_T, CUBLAS_OP_N, N, m, K, &one, static_cast<const float*>(w.data), K, x, K, &zero,
                          out, N),
              "cublasSgemm");
    return;
  }
  if (w.dtype != DType::kBF16) {
    std::fprintf(stderr, "cuda MatMul: weight of type %s was not prepared by PrepareWeight\n", DTypeName(w.dtype));
    std::abort();
  }
  if (m <= cuda::kGemvMaxRows && K % 8 == 0 && Aligned16(x) && Aligned16(w.data)) {
    cuda::GemvBf16(stream_, x, m, static_cast<const uint16_t*>(w.data), N, K, out);
    return;
  }
  const void* xb = ToBf16Input(x, static_cast<size_t>(m) * K);
  CheckBlas(cublasGemmEx(blas_, CUBLAS_OP_T, CUBLAS_OP_N, N, m, K, &one, w.data, CUDA_R_16BF, K, xb, CUDA_R_16BF, K, &zero, out,
                         CUDA_R_32F, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
            "cublasGemmEx");
}

cuda::AttnRows CudaBackend::AttnMeta(const KvLayout& layout, std::span<const AttentionSeq> seqs) {
  int rows = 0;
  for (const AttentionSeq& s : seqs) rows += s.num_rows;
  std::vector<int32_t>& h = attn_meta_host_;
  h.assign(2 * static_cast<size_t>(rows), 0);
  int r = 0;
  for (const AttentionSeq& s : seqs) {
    const int table_off = static_cast<int>(h.size()) - 2 * rows;
    const int blocks = (s.start_pos + s.num_rows + layout.block_size - 1) / layout.block_size;
    h.insert(h.end(), s.block_table.begin(), s.block_table.begin() + blocks);
    for (int i = 0; i < s.num_rows; ++i, ++r) {
      h[r] = s.start_pos + i;
      h[rows + r] = table_off;
    }
  }
  if (h != attn_meta_last_ || attn_rows_.rows != rows) {
    const int32_t* dev = Upload(attn_meta_, std::span<const int32_t>(h));
    attn_rows_ = {dev, dev + rows, dev + 2 * rows, rows};
    attn_meta_last_ = h;
  }
  return attn_rows_;
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
