// Token sampling on the GPU (Backend::SampleRows): one block per row of logits, so a decode step
// returns 4 bytes per sequence instead of vocab_size floats (0.5 MB at Llama 3's 128256), and the
// host scans nothing. The draw is the host Sampler's plain-temperature path: weights
// w_i = exp((l_i - max) / T) in id order, the first token where the running sum passes u * sum(w).
#include <cfloat>
#include <climits>

#include "engine/native/backend/cuda/cuda_kernels.h"
#include "engine/native/backend/cuda/cuda_launch.cuh"

namespace dyn::cuda {
namespace {

constexpr int kSampleThreads = 1024;
constexpr int kWarps = kSampleThreads / 32;

// Block-wide (max value, lowest index holding it).
__device__ void BlockArgMax(float& v, int& i, float* s_v, int* s_i) {
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int oi = __shfl_xor_sync(0xffffffffu, i, o);
    if (ov > v || (ov == v && oi < i)) v = ov, i = oi;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) s_v[warp] = v, s_i[warp] = i;
  __syncthreads();
  if (warp == 0) {
    v = s_v[lane];
    i = s_i[lane];
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, v, o);
      const int oi = __shfl_xor_sync(0xffffffffu, i, o);
      if (ov > v || (ov == v && oi < i)) v = ov, i = oi;
    }
    if (lane == 0) s_v[0] = v, s_i[0] = i;
  }
  __syncthreads();
  v = s_v[0];
  i = s_i[0];
}

// Inclusive prefix sum of one double per thread over the block.
__device__ double BlockInclusiveScan(double x, double* s_warp) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int o = 1; o < 32; o <<= 1) {
    const double y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) s_warp[warp] = x;
  __syncthreads();
  if (warp == 0) {
    double w = s_warp[lane];
    for (int o = 1; o < 32; o <<= 1) {
      const double y = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += y;
    }
    s_warp[lane] = w;
  }
  __syncthreads();
  return warp > 0 ? x + s_warp[warp - 1] : x;
}

__global__ void __launch_bounds__(kSampleThreads) SampleRowsKernel(const float* logits, int vocab, const float* temperature,
                                                                   const float* uniform, uint32_t* out) {
  __shared__ float s_v[kWarps];
  __shared__ int s_i[kWarps];
  __shared__ double s_scan[kWarps];
  __shared__ int s_pick;
  LetNextKernelLaunch();
  WaitForPreviousKernel();
  const float* l = logits + static_cast<size_t>(blockIdx.x) * vocab;
  float best = -FLT_MAX;
  int best_i = INT_MAX;
  for (int i = threadIdx.x; i < vocab; i += kSampleThreads) {
    const float v = l[i];
    if (v > best || (v == best && i < best_i)) best = v, best_i = i;
  }
  BlockArgMax(best, best_i, s_v, s_i);
  if (best_i == INT_MAX) best_i = 0;  // only NaNs (or -inf everywhere... -FLT_MAX keeps -inf out)
  const float t = temperature[blockIdx.x];
  if (t <= 0.0f) {
    if (threadIdx.x == 0) out[blockIdx.x] = static_cast<uint32_t>(best_i);
    return;
  }
  const float inv_t = 1.0f / t;
  // Each thread owns one contiguous run of ids, so the prefix sums follow id order.
  const int chunk = (vocab + kSampleThreads - 1) / kSampleThreads;
  const int begin = min(vocab, static_cast<int>(threadIdx.x) * chunk), end = min(vocab, begin + chunk);
  double sum = 0;
  for (int i = begin; i < end; ++i) sum += expf((l[i] - best) * inv_t);
  const double inclusive = BlockInclusiveScan(sum, s_scan);
  const double total = s_scan[kWarps - 1];
  if (threadIdx.x == 0) s_pick = INT_MAX;
  __syncthreads();
  double u = static_cast<double>(uniform[blockIdx.x]) * total;
  if (u >= inclusive - sum && u < inclusive) {
    u -= inclusive - sum;
    for (int i = begin; i < end; ++i) {
      const float w = expf((l[i] - best) * inv_t);
      u -= w;
      if (u < 0 && w > 0) {
        atomicMin(&s_pick, i);  // rounding can let two neighbouring runs claim u; the lower id wins
        break;
      }
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) out[blockIdx.x] = static_cast<uint32_t>(s_pick != INT_MAX ? s_pick : best_i);
}

}  // namespace

void SampleRows(cudaStream_t stream, const float* logits, int rows, int vocab, const float* temperature, const float* uniform,
                uint32_t* out) {
  if (rows == 0) return;
  LaunchKernel(SampleRowsKernel, rows, kSampleThreads, 0, stream, logits, vocab, temperature, uniform, out);
  DYN_CUDA_CHECK_LAUNCH();
}

}  // namespace dyn::cuda
