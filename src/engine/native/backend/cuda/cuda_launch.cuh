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

__device__ __forceinline__ void WaitForPreviousKernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void LetNextKernelLaunch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// kernel<<<grid, block, smem, stream>>>(args...), with the PDL attribute when enabled.
template <class... P, class... A>
void LaunchKernel(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, A&&... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = ProgrammaticLaunch() ? 1 : 0;
  Check(cudaLaunchKernelEx(&cfg, kernel, std::forward<A>(args)...), "cudaLaunchKernelEx", __FILE__, __LINE__);
}

// LaunchKernel for a grid of thread-block clusters of (1, 1, cluster_z) blocks.
template <class... P, class... A>
void LaunchClusterKernel(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, int cluster_z, A&&... args) {
  cudaLaunchAttribute attr[2];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = 1;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = static_cast<unsigned>(cluster_z);
  attr[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[1].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = ProgrammaticLaunch() ? 2 : 1;
  Check(cudaLaunchKernelEx(&cfg, kernel, std::forward<A>(args)...), "cudaLaunchKernelEx", __FILE__, __LINE__);
}

}  // namespace dyn::cuda
