// Pointer-chase latency on the GPU after a large streaming read: hops within one 2 MB page vs one
// hop per 2 MB page (TLB reach), each chased by one thread; 15 GB streamed before each chase.
//
// Why: decode attention's key loop takes ~3 us more with its K/V loads than without them even when
// they are issued before the kernel's wait (docs/benchmarks/cuda.md, round 17), and the paged KV
// cache puts one sequence's keys of a layer 2 MB apart (a block holds all layers), while a step
// streams 15 GB of weights through the TLBs. If a hop to a fresh page costs much more than a hop
// within one after the stream, a layer-major cache layout is worth its cost. Not yet run.
//
//   nvcc -O2 -arch=sm_90a -o .cudadev/tlb src/engine/native/backend/cuda/scripts/tlb_probe.cu
//   .cudadev/tlb    # on the device machine (carry .cudadev)
#include <cstdio>
#include <cstdint>
#include <cuda_runtime.h>
__global__ void Stream(const uint4* p, size_t n, unsigned* sink) {
  uint32_t acc = 0;
  for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) acc ^= __ldcs(p + i).x;
  if (acc == 0x12345678u) *sink = acc;
}
__global__ void Chase(const uint64_t* base, uint64_t start, int hops, unsigned long long* out) {
  uint64_t at = start;
  const long long t0 = clock64();
  for (int h = 0; h < hops; ++h) at = __ldcg(base + at);
  const long long t1 = clock64();
  out[0] = t1 - t0;
  out[1] = at;
}
int main() {
  const size_t stream_bytes = 15ull << 30, kv_bytes = 4ull << 30;
  uint4* big; uint64_t* kv; unsigned* sink; unsigned long long* out;
  if (cudaMalloc(&big, stream_bytes) || cudaMalloc(&kv, kv_bytes) || cudaMalloc(&sink, 4) || cudaMalloc(&out, 16)) { printf("alloc failed\n"); return 1; }
  cudaMemset(big, 1, stream_bytes);
  const int hops = 64;
  const size_t page = 2ull << 20, words = kv_bytes / 8;
  // Chain A: 64 hops in distinct 2 MB pages (stride 32 MB + 256 B, 2 GB in all); chain B: 64 hops
  // within one page (stride 16 KB + 256 B from 3 GB, ~1 MB in all).
  uint64_t* h = new uint64_t[words]();
  auto build = [&](size_t stride, size_t off0) {
    size_t at = off0;
    for (int i = 0; i < hops; ++i) { size_t next = (off0 + (i + 1) * stride) % kv_bytes; h[at / 8] = next / 8; at = next; }
    return off0 / 8;
  };
  const uint64_t a0 = build(16 * page + 256, 0);
  const uint64_t b0 = build(16384 + 256, 3ull << 30);
  cudaMemcpy(kv, h, kv_bytes, cudaMemcpyHostToDevice);
  delete[] h;
  int sms; cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  // A step streams 15 GB; between two layers' attention ~0.45 GB (one layer's weights), whose
  // 2 MB pages all differ from the cache's (a cache block holds all layers, so each layer's
  // attention touches the same pages of the sequence).
  for (const size_t streamed : {stream_bytes, size_t{450} << 20}) {
    for (int rep = 0; rep < 3; ++rep) {
      for (int which = 0; which < 4; ++which) {
        // 0: pages after the stream, 1: one page after it, 2: pages again (warm), 3: one page again
        if (which == 0 || which == 1) Stream<<<sms * 8, 512>>>(big, streamed / 16, sink);
        Chase<<<1, 1>>>(kv, which % 2 == 0 ? a0 : b0, hops, out);
        unsigned long long r[2];
        cudaMemcpy(r, out, 16, cudaMemcpyDeviceToHost);
        const char* names[] = {"distinct 2MB pages, after the stream", "one page, after the stream", "distinct pages, warm",
                               "one page, warm"};
        printf("stream %5zu MB: %-38s %6.0f cycles/hop\n", streamed >> 20, names[which], double(r[0]) / hops);
      }
    }
  }
  printf("err %s\n", cudaGetErrorString(cudaGetLastError()));
  return 0;
}
