// CPU backend kernels against scalar references: matmul for every weight type (and its batch
// invariance), RoPE styles, and paged attention against a dense computation.
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <random>
#include <vector>

#include "engine/native/backend/backend.h"
#include "engine/native/backend/cpu/quant_blocks.h"
#include "engine/native/backend/cpu/thread_pool.h"

namespace dyn {
namespace {

std::vector<float> RandomVec(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// Builds weight bytes of the given type from F32 values (simple round-to-nearest quantizers).
std::vector<uint8_t> Encode(DType t, const std::vector<float>& w, int64_t rows, int64_t cols) {
  std::vector<uint8_t> out(rows * DTypeRowBytes(t, cols));
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = w.data() + r * cols;
    uint8_t* dst = out.data() + r * DTypeRowBytes(t, cols);
    for (int64_t b = 0; b < (t == DType::kF32 || t == DType::kF16 || t == DType::kBF16 ? 1 : cols / 32); ++b) {
      const float* xb = x + b * 32;
      float amax = 0, mn = 1e30f, mx = -1e30f;
      for (int j = 0; j < 32 && DTypeIsQuantized(t); ++j) {
        amax = std::max(amax, std::fabs(xb[j]));
        mn = std::min(mn, xb[j]);
        mx = std::max(mx, xb[j]);
      }
      switch (t) {
        case DType::kF32: std::memcpy(dst, x, cols * 4); break;
        case DType::kF16:
          for (int64_t j = 0; j < cols; ++j) reinterpret_cast<uint16_t*>(dst)[j] = F32ToF16(x[j]);
          break;
        case DType::kBF16:
          for (int64_t j = 0; j < cols; ++j) {
            uint32_t bits;
            std::memcpy(&bits, &x[j], 4);
            reinterpret_cast<uint16_t*>(dst)[j] = static_cast<uint16_t>(bits >> 16);
          }
          break;
        case DType::kQ8_0: {
          auto* blk = reinterpret_cast<BlockQ8_0*>(dst) + b;
          const float d = amax / 127;
          blk->d = F32ToF16(d);
          for (int j = 0; j < 32; ++j) blk->qs[j] = static_cast<int8_t>(std::lround(d ? xb[j] / d : 0));
          break;
        }
        case DType::kQ4_0: {
          auto* blk = reinterpret_cast<BlockQ4_0*>(dst) + b;
          const float d = amax / 7;
          blk->d = F32ToF16(d);
          for (int j = 0; j < 16; ++j) {
            auto q = [&](float v) { return static_cast<uint8_t>(std::clamp<long>(std::lround(d ? v / d : 0) + 8, 0, 15)); };
            blk->qs[j] = static_cast<uint8_t>(q(xb[j]) | (q(xb[j + 16]) << 4));
          }
          break;
        }
        case DType::kQ4_1: {
          auto* blk = reinterpret_cast<BlockQ4_1*>(dst) + b;
          const float d = (mx - mn) / 15;
          blk->d = F32ToF16(d);
          blk->m = F32ToF16(mn);
          for (int j = 0; j < 16; ++j) {
            auto q = [&](float v) { return static_cast<uint8_t>(std::clamp<long>(std::lround(d ? (v - mn) / d : 0), 0, 15)); };
            blk->qs[j] = static_cast<uint8_t>(q(xb[j]) | (q(xb[j + 16]) << 4));
          }
          break;
        }
      }
    }
  }
  return out;
}

class MatMulTest : public ::testing::TestWithParam<DType> {};

TEST_P(MatMulTest, MatchesDequantizedReferenceAndIsBatchInvariant) {
  const DType t = GetParam();
  auto backend = CreateCpuBackend(2);
  const int64_t N = 37, K = DTypeIsQuantized(t) ? 96 : 83;
  const int M = 9;
  const std::vector<float> wf = RandomVec(N * K, 1);
  const std::vector<uint8_t> bytes = Encode(t, wf, N, K);
  const Weight w{t, N, K, bytes.data()};
  std::vector<float> deq(N * K);
  for (int64_t r = 0; r < N; ++r) DequantizeRow(t, bytes.data() + r * DTypeRowBytes(t, K), K, deq.data() + r * K);
  const std::vector<float> x = RandomVec(M * K, 2);
  std::vector<float> out(M * N);
  backend->MatMul(x.data(), M, w, out.data());
  double max_rel = 0;
  for (int i = 0; i < M; ++i) {
    for (int64_t n = 0; n < N; ++n) {
      double ref = 0, mag = 0;
      for (int64_t k = 0; k < K; ++k) {
        ref += double(x[i * K + k]) * deq[n * K + k];
        mag += std::fabs(double(x[i * K + k]) * deq[n * K + k]);
      }
      max_rel = std::max(max_rel, std::fabs(out[i * N + n] - ref) / (mag + 1e-6));
    }
  }
  // Quantized activations (8-bit) bound the error by ~1/127 of the magnitude; floats are exact-ish.
  EXPECT_LT(max_rel, DTypeIsQuantized(t) ? 2e-2 : 1e-5) << DTypeName(t);
  if (DTypeIsQuantized(t)) {
    // Exact emulation of the 8-bit activation blocks: the kernel must agree to float rounding.
    double max_emul = 0;
    for (int i = 0; i < M; ++i) {
      std::vector<double> xq(K);
      for (int64_t b = 0; b < K / 32; ++b) {
        float amax = 0;
        for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[i * K + b * 32 + j]));
        const float d = amax / 127.0f, id = d != 0 ? 1.0f / d : 0.0f;
        const float d16 = F16ToF32(F32ToF16(d));
        for (int j = 0; j < 32; ++j) xq[b * 32 + j] = std::nearbyint(x[i * K + b * 32 + j] * id) * double(d16);
      }
      for (int64_t n = 0; n < N; ++n) {
        double ref = 0, mag = 0;
        for (int64_t k = 0; k < K; ++k) {
          ref += xq[k] * deq[n * K + k];
          mag += std::fabs(xq[k] * deq[n * K + k]);
        }
        max_emul = std::max(max_emul, std::fabs(out[i * N + n] - ref) / (mag + 1e-6));
      }
    }
    // Q4_1 adds min * s per block where s = d * sum(q) is stored as f16 (as llama.cpp's Q8_1 does).
    EXPECT_LT(max_emul, t == DType::kQ4_1 ? 2e-3 : 2e-6) << DTypeName(t);
    std::printf("%s: max relative error vs exact activation-quantized reference %g\n", DTypeName(t), max_emul);
  }
  for (int i = 0; i < M; ++i) {
    std::vector<float> one(N);
    backend->MatMul(x.data() + i * K, 1, w, one.data());
    for (int64_t n = 0; n < N; ++n) ASSERT_EQ(one[n], out[i * N + n]) << "row " << i << " col " << n;
  }
}

INSTANTIATE_TEST_SUITE_P(AllTypes, MatMulTest,
                         ::testing::Values(DType::kF32, DType::kF16, DType::kBF16, DType::kQ8_0, DType::kQ4_0, DType::kQ4_1),
                         [](const auto& info) { return std::string(DTypeName(info.param)); });

// Back-to-back jobs whose sizes change: every index of every job runs exactly once, and each
// call returns only once its job is done. A worker still draining one job used to be able to claim
// a stale index of it with the next job's task while Dispatch was writing that job (the new task
// ran before it was published, one index twice, and the done count went one past the job: calls
// that hung or returned early - a segfault and a hang in CPU tests under load).
TEST(ThreadPool, EveryIndexOfEveryJobRunsOnceWhileSizesChange) {
  ThreadPool pool(4);
  constexpr int kMax = 48;
  std::vector<std::atomic<int>> hits(kMax);
  for (int call = 0; call < 200000; ++call) {  // the old pool failed ~2 of 3 runs of 30,000 calls
    const int64_t n = 1 + (call * 7) % kMax;  // grows and shrinks
    for (int64_t i = 0; i < n; ++i) hits[i].store(0, std::memory_order_relaxed);
    std::atomic<int64_t> ran{0};
    pool.ParallelFor(n, [&](int64_t i) {
      hits[i].fetch_add(1, std::memory_order_relaxed);
      ran.fetch_add(1, std::memory_order_release);
    });
    ASSERT_EQ(ran.load(std::memory_order_acquire), n) << "call " << call << " returned before its job was done";
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[i].load(std::memory_order_relaxed), 1) << "call " << call << " index " << i;
  }
}

TEST(CpuBackend, RopeStylesRotatePairs) {
  auto backend = CreateCpuBackend(1);
  const int D = 8;
  std::vector<float> inv = {1.0f, 0.1f, 0.01f, 0.001f};
  std::vector<int32_t> pos = {3};
  std::vector<float> cs(D);
  backend->RopeTable(pos, inv, cs.data());
  std::vector<float> neox = RandomVec(D, 3), inter = neox;
  const std::vector<float> orig = neox;
  backend->Rope(neox.data(), 1, 1, D, cs.data(), RopeStyle::kNeox);
  backend->Rope(inter.data(), 1, 1, D, cs.data(), RopeStyle::kInterleaved);
  for (int j = 0; j < D / 2; ++j) {
    const float c = std::cos(3 * inv[j]), s = std::sin(3 * inv[j]);
    EXPECT_NEAR(neox[j], orig[j] * c - orig[j + D / 2] * s, 1e-5);
    EXPECT_NEAR(neox[j + D / 2], orig[j + D / 2] * c + orig[j] * s, 1e-5);
    EXPECT_NEAR(inter[2 * j], orig[2 * j] * c - orig[2 * j + 1] * s, 1e-5);
    EXPECT_NEAR(inter[2 * j + 1], orig[2 * j + 1] * c + orig[2 * j] * s, 1e-5);
  }
}

TEST(CpuBackend, PagedAttentionMatchesDense) {
  auto backend = CreateCpuBackend(2);
  KvLayout L;
  L.num_layers = 2;
  L.num_kv_heads = 2;
  L.head_dim = 24;
  L.block_size = 4;
  L.num_blocks = 8;
  const int H = 6, T = 11, layer = 1;
  std::vector<float> cache(L.BlockFloats() * L.num_blocks, 0.0f);
  const std::vector<int32_t> table = {6, 2, 7};
  const std::vector<float> q = RandomVec(T * H * L.head_dim, 4), k = RandomVec(T * L.TokenFloats(), 5), v = RandomVec(T * L.TokenFloats(), 6);
  // Prefix of 7 tokens, then a chunk of 4.
  std::vector<float> out(T * H * L.head_dim);
  AttentionSeq first{0, 7, 0, table}, second{7, 4, 7, table};
  backend->WriteKv(cache.data(), L, layer, std::span(&first, 1), k.data(), v.data());
  backend->Attention(cache.data(), L, layer, std::span(&first, 1), q.data(), H, 0.3f, out.data());
  backend->WriteKv(cache.data(), L, layer, std::span(&second, 1), k.data(), v.data());
  backend->Attention(cache.data(), L, layer, std::span(&second, 1), q.data(), H, 0.3f, out.data());
  const int D = L.head_dim, group = H / L.num_kv_heads;
  for (int t = 0; t < T; ++t) {
    for (int h = 0; h < H; ++h) {
      const int kvh = h / group;
      std::vector<double> p(t + 1);
      double mx = -1e30, sum = 0;
      for (int j = 0; j <= t; ++j) {
        double s = 0;
        for (int d = 0; d < D; ++d) s += double(q[(t * H + h) * D + d]) * k[j * L.TokenFloats() + kvh * D + d];
        p[j] = s * 0.3;
        mx = std::max(mx, p[j]);
      }
      for (double& x : p) sum += (x = std::exp(x - mx));
      for (int d = 0; d < D; ++d) {
        double o = 0;
        for (int j = 0; j <= t; ++j) o += p[j] / sum * v[j * L.TokenFloats() + kvh * D + d];
        EXPECT_NEAR(out[(t * H + h) * D + d], o, 1e-5) << "t " << t << " h " << h;
      }
    }
  }
}


// One decode row gives bit-identical output alone (few items: heads split across threads) and in a
// batch with other sequences (grouped heads), for head sizes that use the vector path's full and
// partial column tiles and contexts that are not a multiple of the key tile.
TEST(CpuBackend, AttentionIsBatchInvariant) {
  for (int D : {64, 24}) {
    auto backend = CreateCpuBackend(2);
    KvLayout L;
    L.num_layers = 1;
    L.num_kv_heads = 3;
    L.head_dim = D;
    L.block_size = 16;
    L.num_blocks = 16;
    const int H = 9, ctx = 45;
    std::vector<float> cache(L.BlockFloats() * L.num_blocks, 0.0f);
    const std::vector<int32_t> tables[4] = {{0, 1, 2}, {3, 4, 5}, {6, 7, 8}, {9, 10, 11}};
    const std::vector<float> k = RandomVec(ctx * L.TokenFloats(), 7), v = RandomVec(ctx * L.TokenFloats(), 8);
    for (int s = 0; s < 4; ++s) {
      AttentionSeq fill{0, ctx, 0, tables[s]};
      backend->WriteKv(cache.data(), L, 0, std::span(&fill, 1), k.data(), v.data());
    }
    const std::vector<float> q = RandomVec(4 * H * D, 9);
    std::vector<float> alone(H * D), batch(4 * H * D);
    AttentionSeq one{0, 1, ctx - 1, tables[0]};
    backend->Attention(cache.data(), L, 0, std::span(&one, 1), q.data(), H, 0.125f, alone.data());
    std::vector<AttentionSeq> four;
    for (int s = 0; s < 4; ++s) four.push_back({s, 1, ctx - 1 - 3 * s, tables[s]});
    backend->Attention(cache.data(), L, 0, four, q.data(), H, 0.125f, batch.data());
    for (int i = 0; i < H * D; ++i) ASSERT_EQ(alone[i], batch[i]) << "D " << D << " element " << i;
  }
}

}  // namespace
}  // namespace dyn
