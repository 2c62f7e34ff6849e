// Token sampling on the GPU (Backend::SampleRows): one block per row of logits, so a decode step
// returns 4 bytes per sequence instead of vocab_size floats (0.5 MB at Llama 3's 128256), and the
// host scans nothing. The plain-temperature draw is the host Sampler's: weights
// w_i = exp((l_i - max) / T) in id order, the first token where the running sum passes u * sum(w).
//
// With top-k / top-p / min-p (SampleCut) the kept set is the host Sampler's: the k best by
// (w, then lowest id), of those the shortest best-first prefix holding top_p of their mass, of
// those the tokens with w >= min_p. It is found without sorting, by radix selection on the bits
// of w (a positive float's bits order like its value): four passes of 8-bit digit histograms find
// the k-th largest w (by count) and then the top-p boundary (by mass). Masses are fixed point
// (w * 2^24, summed in 64-bit integers), so every sum is exact and the selection does not depend on the
// order of the atomic additions. The draw then walks the kept tokens in id order (the host walks
// its candidate list in its own order: the same distribution, not the same token for a given u).
#include <cfloat>
#include <climits>
#include <cstdint>

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

// Inclusive prefix sum of one value per thread over the block (s_warp: kWarps elements).
template <class T>
__device__ T BlockInclusiveScan(T x, T* s_warp) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int o = 1; o < 32; o <<= 1) {
    const T y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) s_warp[warp] = x;
  __syncthreads();
  if (warp == 0) {
    T w = s_warp[lane];
    for (int o = 1; o < 32; o <<= 1) {
      const T y = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += y;
    }
    s_warp[lane] = w;
  }
  __syncthreads();
  return warp > 0 ? x + s_warp[warp - 1] : x;
}

// Fixed-point mass of a weight w in [0, 1] (w * 2^24; weights below 2^-24 of the top weigh 0).
__device__ __forceinline__ unsigned MassOf(float w) { return __float2uint_rz(w * 16777216.0f); }

// The 8-bit digit d (of 256 bins, counted from the top) where the running total of `bins`, taken
// from digit 255 down, first reaches `need`; *above = the total of the digits above d. Warp 0
// only; lane l scans digits 255 - 8l .. 248 - 8l. Returns -1 if the whole total is below need.
template <class T>
__device__ int DigitReaching(const T* bins, T need, T* above) {
  const int lane = threadIdx.x % 32;
  T mine = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) mine += bins[255 - lane * 8 - j];
  T incl = mine;
  for (int o = 1; o < 32; o <<= 1) {
    const T y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += y;
  }
  const unsigned reach = __ballot_sync(0xffffffffu, incl >= need);
  if (reach == 0) return -1;
  const int first = __ffs(reach) - 1;
  T acc = __shfl_sync(0xffffffffu, incl - mine, first);  // the total of the lanes before it
  int digit = -1;
  if (lane == first) {
    for (int j = 0; j < 8; ++j) {
      const int d = 255 - lane * 8 - j;
      if (acc + bins[d] >= need) {
        digit = d;
        break;
      }
      acc += bins[d];
    }
  }
  digit = __shfl_sync(0xffffffffu, digit, first);
  *above = __shfl_sync(0xffffffffu, acc, first);
  return digit;
}

// The kept set of a truncated row: tokens whose key (bits of w) is above `tau`, and the first
// `ties` (lowest ids) of those whose key equals tau; of them those with w >= min_p.
struct KeptSet {
  uint32_t tau;
  int ties;
};
// The fixed-point mass of the set's ties (of key tau).
__device__ __forceinline__ unsigned long long TieMass(const KeptSet& s) {
  return s.ties > 0 ? static_cast<unsigned long long>(s.ties) * MassOf(__uint_as_float(s.tau)) : 0;
}

// Radix selection over the keys of l's weights. `count_mode`: the k-th largest key by count among
// keys in `in` (keys > in.tau, plus in.ties of key in.tau when in.ties > 0) with need = k; else
// the key where the best-first mass of `in` reaches need (fixed point). Returns the boundary and
// how many of its ties are taken; ties = -1 when `in` holds less than need (keep all of `in`).
template <bool kCount>
__device__ KeptSet RadixSelect(const float* l, int vocab, float best, float inv_t, KeptSet in, unsigned long long need,
                               unsigned long long* s_bins, unsigned long long* s_above, uint32_t* s_prefix, int* s_digit) {
  uint32_t prefix = 0, mask = 0;
  const unsigned long long tie_mass = TieMass(in);
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int d = threadIdx.x; d < 256; d += kSampleThreads) s_bins[d] = 0;
    __syncthreads();
    // Every lane runs every iteration (i0 is warp-uniform), so the lanes of a warp that share a
    // digit add their sum with one atomic: most weights share the top digit (sign and exponent).
    for (int i0 = 0; i0 < vocab; i0 += kSampleThreads) {
      const int i = i0 + static_cast<int>(threadIdx.x);
      const float w = i < vocab ? expf((l[i] - best) * inv_t) : 0.0f;
      const uint32_t key = __float_as_uint(w);
      const bool in_bin = key > in.tau && (key & mask) == prefix;
      const unsigned digit = in_bin ? (key >> shift) & 255u : 256u;
      const unsigned peers = __match_any_sync(0xffffffffu, digit);
      const unsigned sum = kCount ? static_cast<unsigned>(__popc(peers)) : __reduce_add_sync(peers, in_bin ? MassOf(w) : 0u);
      if (in_bin && (threadIdx.x % 32) == static_cast<unsigned>(__ffs(peers) - 1)) atomicAdd(&s_bins[digit], static_cast<unsigned long long>(sum));
    }
    if (threadIdx.x == 0 && in.ties > 0 && (in.tau & mask) == prefix) {
      atomicAdd(&s_bins[(in.tau >> shift) & 255u], kCount ? static_cast<unsigned long long>(in.ties) : tie_mass);
    }
    __syncthreads();
    if (threadIdx.x < 32) {
      unsigned long long above = 0;
      const int d = DigitReaching<unsigned long long>(s_bins, need, &above);
      if (threadIdx.x == 0) {
        *s_digit = d;
        if (d >= 0) {
          *s_prefix = prefix | (static_cast<uint32_t>(d) << shift);
          *s_above = need - above;  // still needed from this digit's keys
        }
      }
    }
    __syncthreads();
    if (*s_digit < 0) return KeptSet{in.tau, -1};
    prefix = *s_prefix;
    mask |= 255u << shift;
    need = *s_above;
    __syncthreads();
  }
  // prefix is a key that occurs; need is what is still wanted from its ties (a count, or a mass).
  const unsigned long long per = kCount ? 1ull : MassOf(__uint_as_float(prefix));
  const int ties = static_cast<int>((need + per - 1) / per);
  return KeptSet{prefix, ties};
}

// The truncated draw (top-k / top-p / min-p) of one row; returns the id, or -1 if nothing is kept.
__device__ int SampleTruncated(const float* l, int vocab, float best, float inv_t, int top_k, float top_p, float min_p, float u) {
  __shared__ unsigned long long s_bins[256], s_above, s_scan64[kWarps];
  __shared__ int s_scan32[kWarps], s_digit, s_pick;
  __shared__ uint32_t s_prefix;
  // Every positive weight: keys above 0.
  KeptSet set{0, 0};
  if (top_k > 0 && top_k < vocab) {
    const KeptSet k = RadixSelect<true>(l, vocab, best, inv_t, set, static_cast<unsigned long long>(top_k), s_bins, &s_above, &s_prefix,
                                        &s_digit);
    if (k.ties >= 0) set = k;  // else fewer than k positive weights: all kept
  }
  if (top_p < 1.0f) {
    // The mass of the set so far, exactly: keys above tau, plus its ties.
    unsigned long long mass = 0;
    for (int i = threadIdx.x; i < vocab; i += kSampleThreads) {
      const float w = expf((l[i] - best) * inv_t);
      if (__float_as_uint(w) > set.tau) mass += MassOf(w);
    }
    mass = BlockInclusiveScan<unsigned long long>(mass, s_scan64);
    const unsigned long long total = s_scan64[kWarps - 1] + TieMass(set);
    __syncthreads();
    unsigned long long need = static_cast<unsigned long long>(static_cast<double>(top_p) * static_cast<double>(total));
    if (need == 0) need = 1;
    const KeptSet p = RadixSelect<false>(l, vocab, best, inv_t, set, need, s_bins, &s_above, &s_prefix, &s_digit);
    if (p.ties >= 0) set = p;
  }
  // The draw: each thread owns a contiguous run of ids, so prefix sums follow id order.
  const int chunk = (vocab + kSampleThreads - 1) / kSampleThreads;
  const int begin = min(vocab, static_cast<int>(threadIdx.x) * chunk), end = min(vocab, begin + chunk);
  int my_ties = 0;
  for (int i = begin; i < end; ++i) my_ties += __float_as_uint(expf((l[i] - best) * inv_t)) == set.tau ? 1 : 0;
  const int tie_base = BlockInclusiveScan<int>(my_ties, s_scan32) - my_ties;
  __syncthreads();
  auto kept = [&](float w, int& tie_rank) {
    const uint32_t key = __float_as_uint(w);
    bool in = key > set.tau;
    if (key == set.tau) in = set.tau > 0 && tie_rank++ < set.ties;
    return in && w >= min_p;
  };
  unsigned long long mine = 0;
  int rank = tie_base;
  for (int i = begin; i < end; ++i) {
    const float w = expf((l[i] - best) * inv_t);
    if (kept(w, rank)) mine += MassOf(w);
  }
  const unsigned long long incl = BlockInclusiveScan<unsigned long long>(mine, s_scan64);
  const unsigned long long total = s_scan64[kWarps - 1];
  if (threadIdx.x == 0) s_pick = -1;
  __syncthreads();
  if (total > 0) {
    unsigned long long target = static_cast<unsigned long long>(static_cast<double>(u) * static_cast<double>(total));
    if (target >= total) target = total - 1;
    if (target >= incl - mine && target < incl) {  // exactly one thread: integer sums
      unsigned long long acc = incl - mine;
      rank = tie_base;
      for (int i = begin; i < end; ++i) {
        const float w = expf((l[i] - best) * inv_t);
        if (!kept(w, rank)) continue;
        acc += MassOf(w);
        if (target < acc) {
          s_pick = i;
          break;
        }
      }
    }
  }
  __syncthreads();
  return s_pick;
}

__global__ void __launch_bounds__(kSampleThreads) SampleRowsKernel(const float* logits, int vocab, const float* temperature,
                                                                   const float* uniform, const float* cuts, uint32_t* out) {
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
  if (cuts != nullptr) {  // [top_k][top_p][min_p], rows each
    const int rows = gridDim.x;
    const int top_k = static_cast<int>(cuts[blockIdx.x]);
    const float top_p = cuts[rows + blockIdx.x], min_p = cuts[2 * rows + blockIdx.x];
    if ((top_k > 0 && top_k < vocab) || top_p < 1.0f || min_p > 0.0f) {
      const int pick = SampleTruncated(l, vocab, best, inv_t, top_k, top_p, min_p, uniform[blockIdx.x]);
      if (threadIdx.x == 0) out[blockIdx.x] = static_cast<uint32_t>(pick >= 0 ? pick : best_i);
      return;
    }
  }
  // Each thread owns one contiguous run of ids, so the prefix sums follow id order.
  const int chunk = (vocab + kSampleThreads - 1) / kSampleThreads;
  const int begin = min(vocab, static_cast<int>(threadIdx.x) * chunk), end = min(vocab, begin + chunk);
  double sum = 0;
  for (int i = begin; i < end; ++i) sum += expf((l[i] - best) * inv_t);
  const double inclusive = BlockInclusiveScan<double>(sum, s_scan);
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
                const float* cuts, uint32_t* out) {
  if (rows == 0) return;
  LaunchKernel(SampleRowsKernel, rows, kSampleThreads, 0, stream, logits, vocab, temperature, uniform, cuts, out);
  DYN_CUDA_CHECK_LAUNCH();
}

}  // namespace dyn::cuda
