// The CUDA backend of the native engine: the Backend interface (backend.h) on one NVIDIA GPU.
//
// Memory is device memory (cudaMalloc); kernels run on one stream owned by the backend, and only
// the copies wait for it. Kernel calls are collected until the host needs the device; a list of
// calls that repeats (a decode step) is replayed as a CUDA graph. Weights: F32 stays F32 (cuBLAS
// SGEMM, for small reference models); F16, BF16 and the GGUF block types become bf16 at
// PrepareWeight (quantized blocks are dequantized on the GPU) and are multiplied by cublasGemmEx
// (activations rounded to bf16, F32 accumulation and output) or, for one row (batch-1 decode),
// by a bandwidth-bound GEMV kernel that keeps the activations in F32. Activations and the paged
// KV cache are F32, as on the CPU.
// Built only when CMake finds nvcc (option DYN_CUDA); see docs/cuda_backend.md.
#pragma once

#include <memory>

#include "base/status.h"
#include "engine/native/backend/backend.h"

namespace dyn {

// Number of visible CUDA devices (0 when there is no driver or no GPU).
int CudaDeviceCount();

// The CUDA backend on `device` (an index below CudaDeviceCount()).
Result<std::unique_ptr<Backend>> CreateCudaBackend(int device);

}  // namespace dyn
