// CUDA backend kernels against the CPU backend (the reference semantics) on random inputs, and
// matmuls against a double-precision product of the dequantized weights. Every device output
// starts as NaN, so an element a kernel forgets to write fails the comparison. Skips without a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "engine/native/backend/backend.h"
#include "engine/native/backend/cpu/quant_blocks.h"
#include "engine/native/backend/cuda/cuda_backend.h"
#include "engine/native/backend/cuda/cuda_kernels.h"
#include "engine/native/backend/cuda/cuda_test_util.h"

namespace dyn {
namespace {

// A second CUDA backend made with one setting of the environment (read when it is created).
std::unique_ptr<Backend> CudaBackendWith(const char* name, const char* value) {
  setenv(name, value, 1);
  auto b = CreateCudaBackend(0);
  unsetenv(name);
  return b.ok() ? std::move(b).value() : nullptr;
}

class CudaBackendTest : public ::testing::Test {
 public:  // also used by CheckAttention
  void SetUp() override {
    if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device visible";
    auto b = CreateCudaBackend(0);
    ASSERT_TRUE(b.ok()) << b.status().ToString();
    gpu_ = std::move(b).value();
    cpu_ = CreateCpuBackend(2);
  }

  float* Up(const std::vector<float>& v) {
    auto buf = gpu_->Allocate(v.size() * sizeof(float));
    EXPECT_TRUE(buf.ok());
    float* p = (*buf)->f32();
    gpu_->CopyToBackend(p, v.data(), v.size() * sizeof(float));
    bufs_.push_back(std::move(buf).value());
    return p;
  }
  float* Poisoned(size_t n) { return Up(std::vector<float>(n, std::numeric_limits<float>::quiet_NaN())); }
  std::vector<float> Down(const float* p, size_t n) {
    std::vector<float> v(n);
    gpu_->CopyToHost(v.data(), p, n * sizeof(float));
    return v;
  }

  std::unique_ptr<Backend> gpu_, cpu_;
  std::vector<std::unique_ptr<Buffer>> bufs_;
};

// Which decode steps take the cluster attention kernel (host logic; needs no GPU). The 8B shape's
// KV layout (8 kv heads x 128, GQA 4) on a 132-multiprocessor GPU, as the backend sets it.
TEST(CudaKernelRulesTest, DecodeAttentionAppliesToSmallDecodeGrids) {
  cuda::SetMultiprocessorCount(132);
  const KvLayout bf16 = TestKvLayout(32, 8, 128, 16, 1024, DType::kBF16);
  auto decode = [](int rows, int len) {
    cuda::AttnRows m;
    m.rows = m.num_rowwise = rows;
    m.max_len = len;
    m.decode = true;
    return m;
  };
  auto applies = [&](const KvLayout& l, const cuda::AttnRows& m) {
    return cuda::DecodeAttentionApplies(l, 32, m, cuda::AttentionSplits(l, 32, m));
  };
  EXPECT_EQ(cuda::AttentionSplits(bf16, 32, decode(1, 512)), 16);
  EXPECT_TRUE(applies(bf16, decode(1, 512)));    // 16 splits: 128 blocks
  EXPECT_EQ(cuda::AttentionSplits(bf16, 32, decode(1, 4096)), 32);
  EXPECT_TRUE(applies(bf16, decode(1, 4096)));   // 32 splits as 16 blocks of 8 warps
  EXPECT_FALSE(applies(bf16, decode(1, 8192)));  // 64 splits
  EXPECT_TRUE(applies(bf16, decode(8, 512)));    // 4 splits: 256 blocks
  EXPECT_FALSE(applies(bf16, decode(2, 4096)));  // 32 splits of 8-warp blocks: 512 4-warp blocks
  EXPECT_FALSE(applies(bf16, decode(8, 4096)));  // 16 splits: 1024 blocks
  cuda::AttnRows chunk = decode(1, 512);
  chunk.decode = false;  // a prefill chunk's rows read each other's new keys
  EXPECT_FALSE(applies(bf16, chunk));
  EXPECT_FALSE(applies(TestKvLayout(32, 8, 128, 16, 1024, DType::kF32), decode(1, 512)));
  EXPECT_FALSE(applies(TestKvLayout(32, 8, 96, 16, 1024, DType::kBF16), decode(1, 512)));
  EXPECT_FALSE(cuda::DecodeAttentionApplies(bf16, 64, decode(1, 512), 16));  // GQA 8
}

TEST(CudaKernelRulesTest, SkinnyGemmTakesUpToEightRowsOfAlignedWidth) {
  EXPECT_TRUE(cuda::SkinnyGemmApplies(2, 4096));
  EXPECT_TRUE(cuda::SkinnyGemmApplies(8, 14336));
  EXPECT_FALSE(cuda::SkinnyGemmApplies(9, 4096));
  EXPECT_FALSE(cuda::SkinnyGemmApplies(4, 4100));
  EXPECT_FALSE(cuda::SkinnyGemmApplies(0, 4096));
}

// Which runs of a batch-1 step the persistent kernel's planner takes (host logic; needs no GPU):
// the model's calls for a Llama-style stack (GQA 4, head_dim 128, bf16 cache), as the backend
// records them.
TEST(CudaKernelRulesTest, PersistentPlannerTakesWholeDecodeLayers) {
  using Call = cuda::PersistentCall;
  auto addr = [](int i) { return reinterpret_cast<float*>(uintptr_t{0x100000} + uintptr_t(i) * 0x10000); };
  float *x = addr(1), *h = addr(2), *q = addr(3), *k = addr(4), *v = addr(5), *attn = addr(6), *gate = addr(7), *up = addr(8),
        *logits = addr(9), *norm_w = addr(10), *cos_sin = addr(11);
  auto w = [](int i) { return reinterpret_cast<const uint16_t*>(uintptr_t{0x8000000} + uintptr_t(i) * 0x100000); };
  constexpr int kHidden = 256, kFfn = 512, kKvHeads = 2, kHeads = 8;
  const KvLayout kv = TestKvLayout(4, kKvHeads, 128, 16, 8, DType::kBF16);
  cuda::AttnRows meta;
  meta.rows = meta.num_rowwise = 1;
  meta.decode = true;
  auto gemv = [&](const float* in, std::initializer_list<std::pair<const uint16_t*, int64_t>> ws, std::initializer_list<float*> outs,
                  int64_t cols, float* swiglu_out = nullptr) {
    Call c{.kind = Call::kGemv, .in = in, .count = static_cast<int>(ws.size()), .cols = cols, .swiglu_out = swiglu_out};
    int j = 0;
    for (auto [wp, rows] : ws) c.w[j] = wp, c.rows[j++] = rows;
    j = 0;
    for (float* o : outs) c.out[j++] = o;
    return c;
  };
  auto layer = [&](std::vector<Call>& calls, int l, int head_dim) {
    const Call norm = l == 0 ? Call{.kind = Call::kNorm, .x = x, .norm_w = norm_w, .dim = kHidden, .eps = 1e-5f, .norm_out = h}
                             : Call{.kind = Call::kAddNorm, .x = x, .y = h, .norm_w = norm_w, .dim = kHidden, .eps = 1e-5f, .norm_out = h};
    calls.push_back(norm);
    calls.push_back(gemv(h, {{w(l * 8), kHeads * 128}, {w(l * 8 + 1), kKvHeads * 128}, {w(l * 8 + 2), kKvHeads * 128}}, {q, k, v}, kHidden));
    KvLayout layout = kv;
    layout.head_dim = head_dim;
    calls.push_back(Call{.kind = Call::kDecodeAttention, .cache = addr(12), .layout = layout, .layer = l, .meta = meta, .q = q,
                         .num_heads = kHeads, .scale = 0.088f, .rope = {q, k, v, cos_sin, true}, .attn_out = attn});
    calls.push_back(gemv(attn, {{w(l * 8 + 3), kHidden}}, {h}, kHeads * 128));
    calls.push_back(Call{.kind = Call::kAddNorm, .x = x, .y = h, .norm_w = norm_w, .dim = kHidden, .eps = 1e-5f, .norm_out = h});
    calls.push_back(gemv(h, {{w(l * 8 + 4), kFfn}, {w(l * 8 + 5), kFfn}}, {gate, up}, kHidden, gate));
    calls.push_back(gemv(gate, {{w(l * 8 + 6), kHidden}}, {h}, kFfn));
  };
  auto phases = [](const std::vector<unsigned char>& program) {
    int32_t n = 0;
    std::memcpy(&n, program.data(), sizeof(n));
    return n;
  };
  std::vector<unsigned char> program;
  {  // two layers, the final norm and the LM head, then the sampler: all but the sampler
    std::vector<Call> calls;
    layer(calls, 0, 128);
    layer(calls, 1, 128);
    calls.push_back(Call{.kind = Call::kAddNorm, .x = x, .y = h, .norm_w = norm_w, .dim = kHidden, .eps = 1e-5f, .norm_out = h});
    calls.push_back(gemv(h, {{w(99), 1000}}, {logits}, kHidden));
    calls.push_back(Call{});  // the sampler
    EXPECT_EQ(cuda::PlanPersistent(calls, &program), static_cast<int>(calls.size()) - 1);
    EXPECT_EQ(phases(program), 2 * 5 + 1);  // per layer Q/K/V, attention, o, gate/up, down; the LM head
    EXPECT_EQ(cuda::PlanPersistent(std::span(calls).last(1), &program), 0);
  }
  {  // one layer: too short to pay
    std::vector<Call> calls;
    layer(calls, 0, 128);
    EXPECT_EQ(cuda::PlanPersistent(calls, &program), 0);
  }
  {  // the third layer's attention (head_dim 64) ends the run before it; a run ending on a norm
     // leaves the norm (and the residual add it would fold into the GEMV before) out
    std::vector<Call> calls;
    layer(calls, 0, 128);
    layer(calls, 1, 128);
    layer(calls, 2, 64);
    EXPECT_EQ(cuda::PlanPersistent(calls, &program), 2 * 7 + 2);
    EXPECT_EQ(phases(program), 2 * 5 + 1);
    calls.resize(2 * 7 + 1);  // ... down projection of layer 1, AddNorm of layer 2
    calls.push_back(Call{});
    EXPECT_EQ(cuda::PlanPersistent(calls, &program), 2 * 7);
    EXPECT_EQ(phases(program), 2 * 5);
  }
  // Rows longer than a ring slot (14336 columns: 4 chunks) leave each chunk's sums, the row's count
  // of chunks done and its residual beside the staged input, 10 floats for every row a block may
  // get (a grid of at least 64): 204 rows a block fit in the 2048 floats after the input, so 13056
  // rows fit and one more does not, and the run ends before that GEMV.
  for (const auto& [rows, taken] : {std::pair<int64_t, bool>{13056, true}, std::pair<int64_t, bool>{13057, false}}) {
    std::vector<Call> calls;
    layer(calls, 0, 128);
    layer(calls, 1, 128);
    calls.push_back(gemv(addr(13), {{w(98), rows}}, {logits}, 14336));  // an input written before the launch
    calls.push_back(Call{});
    EXPECT_EQ(cuda::PlanPersistent(calls, &program), 2 * 7 + (taken ? 1 : 0)) << rows << " rows";
  }
  // Phases hand rows on through stamped entries, so a phase may read only rows an earlier phase
  // handed on or rows no phase writes: the up projection's output (consumed by SwiGLU, written
  // plainly) or part of a handed-on row refuse the plan.
  for (const auto& [in, cols] : {std::pair<const float*, int64_t>{up, kFfn}, std::pair<const float*, int64_t>{gate, 2 * kFfn}}) {
    std::vector<Call> calls;
    layer(calls, 0, 128);
    layer(calls, 1, 128);
    calls.push_back(gemv(in, {{w(98), 64}}, {logits}, cols));
    calls.push_back(Call{});
    EXPECT_EQ(cuda::PlanPersistent(calls, &program), 0) << cols << " columns";
  }
}

// `rows` rows of logits for 4 tokens of probability 0.1, 0.2, 0.3, 0.4.
std::vector<float> FourTokenLogits(int rows) {
  std::vector<float> logits;
  for (int r = 0; r < rows; ++r)
    for (float p : {0.1f, 0.2f, 0.3f, 0.4f}) logits.push_back(std::log(p));
  return logits;
}

constexpr DType kAllTypes[] = {DType::kF32, DType::kF16, DType::kBF16, DType::kQ8_0, DType::kQ4_0, DType::kQ4_1};

TEST_F(CudaBackendTest, EmbeddingEveryType) {
  const int64_t rows = 50, cols = 96;
  const std::vector<uint32_t> ids = {3, 0, 49, 3, 17};
  for (DType t : kAllTypes) {
    const std::vector<uint8_t> bytes = RandomWeightBytes(t, rows, cols, 11);
    const Weight host{t, rows, cols, bytes.data()};
    std::vector<float> want(ids.size() * cols);
    cpu_->Embedding(host, ids, want.data());
    std::vector<std::unique_ptr<Buffer>> owned;
    auto dev = gpu_->PrepareWeight(host, &owned);
    ASSERT_TRUE(dev.ok());
    float* out = Poisoned(want.size());
    gpu_->Embedding(*dev, ids, out);
    // F32 and BF16 tables are exact; the others were rounded to bf16 at PrepareWeight.
    const double tol = (t == DType::kF32 || t == DType::kBF16) ? 0.0 : 4e-3;
    EXPECT_LE(RelErr(Down(out, want.size()), want), tol) << DTypeName(t);
  }
}

// Metadata equal to a scratch's last upload is not copied again: the kernels must still read the
// right ids in any order of equal and different uploads, with and without the pending list running
// in between, and after the scratch grew.
TEST_F(CudaBackendTest, RepeatedUploadsReadTheRightValues) {
  const int64_t rows = 300, cols = 64;
  const std::vector<float> table = RandomVec(rows * cols, 5);
  const Weight host{DType::kF32, rows, cols, table.data()};
  std::vector<std::unique_ptr<Buffer>> owned;
  auto dev = gpu_->PrepareWeight(host, &owned);
  ASSERT_TRUE(dev.ok());
  std::vector<uint32_t> many(120);
  for (size_t i = 0; i < many.size(); ++i) many[i] = static_cast<uint32_t>((i * 37) % rows);
  const std::vector<std::vector<uint32_t>> calls = {{5}, {5}, {7}, {5}, {5}, many, {5}, {9, 5}, {9, 5}, {5, 9}, many};
  for (bool run_between : {false, true}) {
    std::vector<float*> outs;
    for (const auto& ids : calls) {
      outs.push_back(Poisoned(ids.size() * cols));
      gpu_->Embedding(*dev, ids, outs.back());
      if (run_between) Down(outs.back(), 1);
    }
    for (size_t c = 0; c < calls.size(); ++c) {
      const std::vector<float> got = Down(outs[c], calls[c].size() * cols);
      for (size_t i = 0; i < calls[c].size(); ++i) {
        const std::vector<float> want(table.begin() + calls[c][i] * cols, table.begin() + (calls[c][i] + 1) * cols);
        ASSERT_EQ(std::vector<float>(got.begin() + i * cols, got.begin() + (i + 1) * cols), want)
            << "call " << c << " row " << i << (run_between ? " (list run between calls)" : "");
      }
    }
  }
}

TEST_F(CudaBackendTest, MatMulEveryTypeAndBatch) {
  const int64_t N = 301, K = 256;  // odd N: the GEMV's last block is partial
  for (DType t : kAllTypes) {
    const std::vector<uint8_t> bytes = RandomWeightBytes(t, N, K, 5);
    std::vector<float> wf(N * K);
    for (int64_t r = 0; r < N; ++r) DequantizeRow(t, bytes.data() + r * DTypeRowBytes(t, K), K, wf.data() + r * K);
    std::vector<std::unique_ptr<Buffer>> owned;
    auto dev = gpu_->PrepareWeight(Weight{t, N, K, bytes.data()}, &owned);
    ASSERT_TRUE(dev.ok());
    for (int m : {1, 3, 8, 9, 40}) {
      const std::vector<float> x = RandomVec(m * K, 100 + m);
      std::vector<float> want(m * N);
      for (int i = 0; i < m; ++i)
        for (int64_t n = 0; n < N; ++n) {
          double s = 0;
          for (int64_t k = 0; k < K; ++k) s += static_cast<double>(x[i * K + k]) * wf[n * K + k];
          want[i * N + n] = static_cast<float>(s);
        }
      float* out = Poisoned(want.size());
      gpu_->MatMul(Up(x), m, *dev, out);
      const double err = RelErr(Down(out, want.size()), want);
      // F32 stays F32 (SGEMM); the rest is bf16 weights (and bf16 activations for m > 8).
      EXPECT_LE(err, t == DType::kF32 ? 1e-5 : 1e-2) << DTypeName(t) << " m=" << m;
    }
  }
}

// The m = 1 GEMV and the m = 5 skinny GEMM at the widths of real models (2048 to 14336 columns; the
// tests above use 256-512): one weight, three sharing one launch (Q/K/V) and the fused gate/up +
// SwiGLU, against a double product of the same bf16 values.
TEST_F(CudaBackendTest, GemvWideRowsMatchDoubleProduct) {
  auto product = [](const std::vector<uint8_t>& bytes, int64_t N, int64_t K, const std::vector<float>& x) {
    std::vector<float> want(N), w(K);
    for (int64_t n = 0; n < N; ++n) {
      DequantizeRow(DType::kBF16, bytes.data() + n * DTypeRowBytes(DType::kBF16, K), K, w.data());
      double s = 0;
      for (int64_t k = 0; k < K; ++k) s += static_cast<double>(x[k]) * w[k];
      want[n] = static_cast<float>(s);
    }
    return want;
  };
  std::vector<std::unique_ptr<Buffer>> owned;
  for (const int64_t K : {2048, 14336}) {
    for (const int64_t N : {37, 1001}) {
      const std::vector<uint8_t> bytes = RandomWeightBytes(DType::kBF16, N, K, 90 + N);
      auto dev = gpu_->PrepareWeight(Weight{DType::kBF16, N, K, bytes.data()}, &owned);
      ASSERT_TRUE(dev.ok());
      // m = 1: the GEMV (F32 x); m = 5: the skinny tensor-core GEMM, whose x is bf16 (so is the
      // reference's here: the products are then exact and only the F32 sums differ).
      for (const int m : {1, 5}) {
        std::vector<float> x = RandomVec(m * K, 91);
        if (m > 1) {
          for (float& f : x) f = BF16ToF32(F32ToBF16(f));
        }
        std::vector<float> want;
        for (int i = 0; i < m; ++i) {
          const std::vector<float> xi(x.begin() + i * K, x.begin() + (i + 1) * K);
          const std::vector<float> row = product(bytes, N, K, xi);
          want.insert(want.end(), row.begin(), row.end());
        }
        float* out = Poisoned(m * N);
        gpu_->MatMul(Up(x), m, *dev, out);
        EXPECT_LE(RelErr(Down(out, m * N), want), 1e-5) << "N=" << N << " K=" << K << " m=" << m;
      }
    }
  }
  {  // Q/K/V-like: three weights in one launch
    const int64_t K = 4096, rows[3] = {1000, 333, 333};
    std::vector<std::vector<uint8_t>> bytes;
    std::vector<Weight> ws;
    for (int i = 0; i < 3; ++i) {
      bytes.push_back(RandomWeightBytes(DType::kBF16, rows[i], K, 95 + i));
      auto w = gpu_->PrepareWeight(Weight{DType::kBF16, rows[i], K, bytes.back().data()}, &owned);
      ASSERT_TRUE(w.ok());
      ws.push_back(*w);
    }
    const std::vector<float> x = RandomVec(K, 98);
    float* outs[3];
    for (int i = 0; i < 3; ++i) outs[i] = Poisoned(rows[i]);
    gpu_->MatMulShared(Up(x), 1, ws, outs);
    for (int i = 0; i < 3; ++i) EXPECT_LE(RelErr(Down(outs[i], rows[i]), product(bytes[i], rows[i], K, x)), 1e-5) << "weight " << i;
  }
  {  // gate/up + SwiGLU (fused on the pending list), the output aliasing gate as the model does
    const int64_t K = 2048, N = 999;
    const std::vector<uint8_t> wg = RandomWeightBytes(DType::kBF16, N, K, 99), wu = RandomWeightBytes(DType::kBF16, N, K, 100);
    auto g = gpu_->PrepareWeight(Weight{DType::kBF16, N, K, wg.data()}, &owned);
    auto u = gpu_->PrepareWeight(Weight{DType::kBF16, N, K, wu.data()}, &owned);
    ASSERT_TRUE(g.ok() && u.ok());
    const std::vector<float> x = RandomVec(K, 101);
    std::vector<float> want_gate = product(wg, N, K, x);
    const std::vector<float> want_up = product(wu, N, K, x);
    cpu_->SwiGlu(want_gate.data(), want_up.data(), N, want_gate.data());
    float* gate = Poisoned(N);
    float* upo = Poisoned(N);
    const Weight ws[2] = {*g, *u};
    float* const outs[2] = {gate, upo};
    gpu_->MatMulShared(Up(x), 1, ws, outs);
    gpu_->SwiGlu(gate, upo, N, gate);
    EXPECT_LE(RelErr(Down(upo, N), want_up), 1e-5);
    EXPECT_LE(RelErr(Down(gate, N), want_gate), 1e-5);
  }
}

// The m = 1 GEMVs with 2 or 4 rows a 4-warp block sharing x (gate and up pairs, or rows of one
// weight) keep the per-row chunk order and reductions of the kernels with a row a group of 4
// warps: the same bits.
TEST_F(CudaBackendTest, PairBlocksEqualOneRowBlocks) {
  std::vector<std::unique_ptr<Buffer>> owned;
  // run(r): the outputs with r rows a block (0: the kernels with a row a group of 4 warps).
  auto expect_same_bits = [](auto run, const std::string& what) {
    const std::vector<float> one = run(0);
    for (const int r : {2, 4}) {
      const std::vector<float> shared = run(r);
      EXPECT_EQ(0, std::memcmp(one.data(), shared.data(), one.size() * sizeof(float))) << what << ", rows " << r;
    }
  };
  auto prepare = [&](int64_t rows, int64_t cols, const std::vector<uint8_t>& bytes) {
    auto w = gpu_->PrepareWeight(Weight{DType::kBF16, rows, cols, bytes.data()}, &owned);
    EXPECT_TRUE(w.ok()) << w.status().ToString();
    return w.ok() ? *w : Weight{};
  };
  for (const int64_t K : {4096, 2048, 1000}) {
    const int64_t N = 999;  // odd: the last block of 2 pairs has one
    const std::vector<uint8_t> wg = RandomWeightBytes(DType::kBF16, N, K, 150), wu = RandomWeightBytes(DType::kBF16, N, K, 151);
    const Weight ws[2] = {prepare(N, K, wg), prepare(N, K, wu)};
    const float* dx = Up(RandomVec(K, 152));
    expect_same_bits(
        [&](int r) {
          cuda::SetGemvRowsSharingX(0, r);
          float* const outs[2] = {Poisoned(N), Poisoned(N)};
          gpu_->MatMulShared(dx, 1, ws, outs);
          gpu_->SwiGlu(outs[0], outs[1], N, outs[0]);
          std::vector<float> a = Down(outs[0], N), b = Down(outs[1], N);
          a.insert(a.end(), b.begin(), b.end());
          return a;
        },
        "gate/up + SwiGLU, K=" + std::to_string(K));
  }
  // Without SwiGLU: Q/K/V-like jobs with odd row counts (a last row alone).
  for (const int64_t K : {4096, 14336, 1000}) {
    const int64_t rows[3] = {1001, 333, 64};
    std::vector<std::vector<uint8_t>> bytes;
    std::vector<Weight> ws;
    for (int i = 0; i < 3; ++i) {
      bytes.push_back(RandomWeightBytes(DType::kBF16, rows[i], K, 160 + i));
      ws.push_back(prepare(rows[i], K, bytes.back()));
    }
    const float* dx = Up(RandomVec(K, 165));
    expect_same_bits(
        [&](int r) {
          cuda::SetGemvRowsSharingX(r, 0);
          float* outs[3];
          for (int i = 0; i < 3; ++i) outs[i] = Poisoned(rows[i]);
          gpu_->MatMulShared(dx, 1, ws, outs);
          std::vector<float> all;
          for (int i = 0; i < 3; ++i) {
            const std::vector<float> o = Down(outs[i], rows[i]);
            all.insert(all.end(), o.begin(), o.end());
          }
          return all;
        },
        "three weights, K=" + std::to_string(K));
  }
  cuda::SetGemvRowsSharingX(2, 2);
}

TEST_F(CudaBackendTest, MatMulSharedEqualsSeparateCalls) {
  const int64_t K = 512;
  const int64_t rows[3] = {256, 64, 64};  // Q/K/V-like
  std::vector<std::vector<uint8_t>> bytes;
  std::vector<Weight> ws;
  std::vector<std::unique_ptr<Buffer>> owned;
  for (int i = 0; i < 3; ++i) {
    bytes.push_back(RandomWeightBytes(DType::kBF16, rows[i], K, 40 + i));
    auto w = gpu_->PrepareWeight(Weight{DType::kBF16, rows[i], K, bytes.back().data()}, &owned);
    ASSERT_TRUE(w.ok());
    ws.push_back(*w);
  }
  for (int m : {1, 2, 3, 12}) {
    float* x = Up(RandomVec(m * K, 50 + m));
    float* shared[3];
    for (int i = 0; i < 3; ++i) shared[i] = Poisoned(m * rows[i]);
    gpu_->MatMulShared(x, m, ws, shared);
    for (int i = 0; i < 3; ++i) {
      float* alone = Poisoned(m * rows[i]);
      gpu_->MatMul(x, m, ws[i], alone);
      const std::vector<float> a = Down(alone, m * rows[i]), b = Down(shared[i], m * rows[i]);
      EXPECT_EQ(a, b) << "weight " << i << " m=" << m;
      EXPECT_LT(RelErr(b, a), 1e-6);  // and no NaN
    }
  }
}

// A repeated list of calls (same buffers, new token ids each time) is captured into a CUDA graph
// on its second run and replayed from the third on; every run must still see its own ids.
TEST_F(CudaBackendTest, RepeatedStepsReplayedAsGraphStayCorrect) {
  const int64_t vocab = 64, dim = 128;
  const std::vector<uint8_t> table = RandomWeightBytes(DType::kBF16, vocab, dim, 60);
  const std::vector<uint8_t> proj = RandomWeightBytes(DType::kBF16, 96, dim, 61);
  std::vector<std::unique_ptr<Buffer>> owned;
  auto dt = gpu_->PrepareWeight(Weight{DType::kBF16, vocab, dim, table.data()}, &owned);
  auto dp = gpu_->PrepareWeight(Weight{DType::kBF16, 96, dim, proj.data()}, &owned);
  ASSERT_TRUE(dt.ok() && dp.ok());
  const std::vector<float> norm = RandomVec(dim, 62);
  float* dnorm = Up(norm);
  float* x = Poisoned(dim);
  float* out = Poisoned(96);
  for (uint32_t step = 0; step < 6; ++step) {
    const std::vector<uint32_t> ids = {static_cast<uint32_t>((step * 13 + 5) % vocab)};
    std::vector<float> hx(dim), want(96);
    cpu_->Embedding(Weight{DType::kBF16, vocab, dim, table.data()}, ids, hx.data());
    cpu_->RmsNorm(hx.data(), norm.data(), 1, dim, 1e-5f, hx.data());
    cpu_->MatMul(hx.data(), 1, Weight{DType::kBF16, 96, dim, proj.data()}, want.data());
    gpu_->Embedding(*dt, ids, x);
    gpu_->RmsNorm(x, dnorm, 1, dim, 1e-5f, x);
    gpu_->MatMul(x, 1, *dp, out);
    EXPECT_LE(RelErr(Down(out, 96), want), 1e-5) << "step " << step;
  }
}

// The host Sampler's greedy and plain-temperature draw (sampler.cpp), in double for the running sum.
uint32_t ReferenceSample(const float* l, int vocab, float temperature, float uniform) {
  const float max = *std::max_element(l, l + vocab);
  const uint32_t argmax = static_cast<uint32_t>(std::find(l, l + vocab, max) - l);
  if (temperature <= 0) return argmax;
  std::vector<double> w(vocab);
  double sum = 0;
  for (int i = 0; i < vocab; ++i) sum += (w[i] = std::exp(static_cast<double>((l[i] - max) * (1.0f / temperature))));
  double u = static_cast<double>(uniform) * sum;
  for (int i = 0; i < vocab; ++i) {
    u -= w[i];
    if (u < 0 && w[i] > 0) return static_cast<uint32_t>(i);
  }
  return argmax;
}

TEST_F(CudaBackendTest, SampleRowsMatchesHostSampler) {
  ASSERT_TRUE(gpu_->samples_on_device());
  std::mt19937 rng(71);
  std::uniform_real_distribution<float> u01(0.0f, 1.0f);
  for (int vocab : {7, 1000, 128256}) {
    const int rows = 12;
    std::vector<float> logits = RandomVec(static_cast<size_t>(rows) * vocab, 70 + vocab, 2.0f);
    logits[3] = logits[5] = 50.0f;  // row 0: a tie for the maximum goes to the lower id
    const float* d = Up(logits);
    const std::vector<float> temperature = {0, 0, 0.5f, 1.0f, 1.0f, 1.3f, 2.0f, 0, 1.0f, 0.8f, 1.0f, 1.0f};
    for (int round = 0; round < 3; ++round) {  // same call shape: captured as a graph, then replayed with new draws
      std::vector<float> uniform(rows);
      for (float& x : uniform) x = u01(rng);
      std::vector<uint32_t> got(rows, 0xFFFFFFFFu);
      gpu_->SampleRows(d, rows, vocab, temperature, uniform, {}, got.data());
      for (int r = 0; r < rows; ++r) {
        EXPECT_EQ(got[r], ReferenceSample(logits.data() + static_cast<size_t>(r) * vocab, vocab, temperature[r], uniform[r]))
            << "vocab " << vocab << " row " << r << " round " << round;
      }
      if (vocab == 7) {
        EXPECT_EQ(got[0], 3u);
      }
    }
  }
  // A draw follows the distribution: 4 tokens with probabilities 0.1, 0.2, 0.3, 0.4.
  const int rows = 4000;
  const float* d = Up(FourTokenLogits(rows));
  std::vector<float> temperature(rows, 1.0f), uniform(rows);
  for (float& x : uniform) x = u01(rng);
  std::vector<uint32_t> got(rows);
  gpu_->SampleRows(d, rows, 4, temperature, uniform, {}, got.data());
  int count[4] = {};
  for (uint32_t t : got) {
    ASSERT_LT(t, 4u);
    ++count[t];
  }
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(count[i] / double(rows), 0.1 * (i + 1), 0.03) << "token " << i;
}

// The host Sampler's kept set under a cut (weights in double): the k best by (weight, lowest
// id), the shortest best-first prefix holding top_p of their mass, then w >= min_p; by id.
std::vector<std::pair<uint32_t, double>> ReferenceKept(const float* l, int vocab, float t, const SampleCut& c) {
  const float mx = *std::max_element(l, l + vocab);
  std::vector<std::pair<uint32_t, double>> v;
  for (int i = 0; i < vocab; ++i) {
    const double w = std::exp((static_cast<double>(l[i]) - mx) / t);
    if (w > 0) v.push_back({static_cast<uint32_t>(i), w});
  }
  std::sort(v.begin(), v.end(), [](const auto& a, const auto& b) { return a.second > b.second || (a.second == b.second && a.first < b.first); });
  if (c.top_k > 0 && c.top_k < static_cast<int>(v.size())) v.resize(c.top_k);
  if (c.top_p < 1.0f) {
    double total = 0, cum = 0;
    for (auto& e : v) total += e.second;
    size_t keep = v.size();
    for (size_t i = 0; i < v.size(); ++i) {
      cum += v[i].second;
      if (cum >= c.top_p * total) {
        keep = i + 1;
        break;
      }
    }
    v.resize(keep);
  }
  std::erase_if(v, [&](const auto& e) { return e.second < c.min_p; });
  std::sort(v.begin(), v.end());
  return v;
}

// Truncated draws: every token is in the host Sampler's kept set (up to ties within float
// rounding at its edge), and at a given uniform it is the id-order draw over that set (up to
// draws within 1e-4 of the boundary between two tokens, where rounding may pick either).
TEST_F(CudaBackendTest, SampleRowsTruncatedKeepsTheHostSamplersSet) {
  ASSERT_TRUE(gpu_->samples_truncated_on_device());
  std::mt19937 rng(72);
  std::uniform_real_distribution<float> u01(0.0f, 1.0f);
  const std::vector<SampleCut> kinds = {{1, 1.0f, 0.0f},    {5, 1.0f, 0.0f},   {50, 1.0f, 0.0f}, {0, 0.9f, 0.0f},  {0, 0.5f, 0.0f},
                                        {0, 1.0f, 0.05f},   {40, 0.8f, 0.0f},  {0, 0.95f, 0.1f}, {7, 0.9f, 0.02f}, {0, 1.0f, 0.0f},
                                        {100000, 0.99f, 0.0f}, {3, 0.01f, 0.0f}};
  for (int vocab : {64, 1000, 128256}) {
    const int rows = static_cast<int>(kinds.size()) * 2;
    std::vector<float> logits = RandomVec(static_cast<size_t>(rows) * vocab, 90 + vocab, 2.0f);
    for (int i = 10; i < 20 && i < vocab; ++i) logits[i] = logits[9];  // row 0: ties at the top
    const float* d = Up(logits);
    std::vector<float> temperature(rows), uniform(rows);
    std::vector<SampleCut> cuts(rows);
    for (int r = 0; r < rows; ++r) {
      temperature[r] = r % 2 ? 0.7f : 1.3f;
      cuts[r] = kinds[r / 2];
      uniform[r] = u01(rng);
    }
    std::vector<uint32_t> got(rows, 0xFFFFFFFFu);
    gpu_->SampleRows(d, rows, vocab, temperature, uniform, cuts, got.data());
    for (int r = 0; r < rows; ++r) {
      const float* l = logits.data() + static_cast<size_t>(r) * vocab;
      const auto kept = ReferenceKept(l, vocab, temperature[r], cuts[r]);
      ASSERT_FALSE(kept.empty());
      double sum = 0;
      for (auto& e : kept) sum += e.second;
      const double target = uniform[r] * sum;
      uint32_t want = kept.back().first;
      double cum = 0, near = 1e300;
      for (auto& e : kept) {
        cum += e.second;
        near = std::min(near, std::abs(cum - target));
        if (target < cum) {
          want = e.first;
          break;
        }
      }
      const bool in_set = std::any_of(kept.begin(), kept.end(), [&](const auto& e) { return e.first == got[r]; });
      const std::string what = "vocab " + std::to_string(vocab) + " row " + std::to_string(r) + " top_k " + std::to_string(cuts[r].top_k) +
                               " top_p " + std::to_string(cuts[r].top_p) + " min_p " + std::to_string(cuts[r].min_p);
      ASSERT_LT(got[r], static_cast<uint32_t>(vocab)) << what;
      if (!in_set) {  // only a token whose weight ties the set's edge within float rounding
        const double w = std::exp((static_cast<double>(l[got[r]]) - *std::max_element(l, l + vocab)) / temperature[r]);
        double edge = 1e300;
        for (auto& e : kept) edge = std::min(edge, e.second);
        EXPECT_NEAR(w, edge, 1e-5 * edge) << "token outside the kept set, " << what;
      } else if (got[r] != want) {
        EXPECT_LT(near, 1e-4 * sum) << "draw " << got[r] << " instead of " << want << ", " << what;
      }
    }
  }
  // Distributions: 4 tokens of probability 0.1, 0.2, 0.3, 0.4.
  const int rows = 4000;
  const float* d = Up(FourTokenLogits(rows));
  std::vector<float> temperature(rows, 1.0f), uniform(rows);
  for (float& x : uniform) x = u01(rng);
  struct Case {
    SampleCut cut;
    double p[4];
  } cases[] = {{{1, 1.0f, 0.0f}, {0, 0, 0, 1}},                         // top-k 1: the best
               {{0, 0.6f, 0.0f}, {0, 0, 3.0 / 7, 4.0 / 7}},             // 0.4 + 0.3 reach 0.6
               {{0, 1.0f, 0.45f}, {0, 2.0 / 9, 3.0 / 9, 4.0 / 9}},      // w = p / 0.4 >= 0.45 (0.5 would tie the edge)
               {{3, 0.5f, 0.0f}, {0, 0, 3.0 / 7, 4.0 / 7}}};            // of the best 3 (0.9), half is 0.45
  for (const Case& c : cases) {
    std::vector<uint32_t> got(rows);
    gpu_->SampleRows(d, rows, 4, temperature, uniform, std::vector<SampleCut>(rows, c.cut), got.data());
    int count[4] = {};
    for (uint32_t t : got) {
      ASSERT_LT(t, 4u);
      ++count[t];
    }
    for (int i = 0; i < 4; ++i) {
      EXPECT_NEAR(count[i] / double(rows), c.p[i], 0.03) << "token " << i << " top_k " << c.cut.top_k << " top_p " << c.cut.top_p;
    }
  }
}

TEST_F(CudaBackendTest, TiedWeightIsUploadedOnce) {
  const std::vector<uint8_t> bytes = RandomWeightBytes(DType::kQ4_1, 64, 64, 3);
  std::vector<std::unique_ptr<Buffer>> owned;
  auto a = gpu_->PrepareWeight(Weight{DType::kQ4_1, 64, 64, bytes.data()}, &owned);
  auto b = gpu_->PrepareWeight(Weight{DType::kQ4_1, 64, 64, bytes.data()}, &owned);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->data, b->data);
  EXPECT_EQ(a->dtype, DType::kBF16);
  EXPECT_EQ(owned.size(), 1u);
}

TEST_F(CudaBackendTest, NormsAndElementWise) {
  for (int dim : {8, 100, 576, 4096}) {
    const int m = 7;
    const std::vector<float> x = RandomVec(m * dim, dim), w = RandomVec(dim, dim + 1);
    std::vector<float> want(m * dim);
    cpu_->RmsNorm(x.data(), w.data(), m, dim, 1e-5f, want.data());
    float* out = Poisoned(want.size());
    gpu_->RmsNorm(Up(x), Up(w), m, dim, 1e-5f, out);
    EXPECT_LE(RelErr(Down(out, want.size()), want), 1e-6) << "RmsNorm dim " << dim;
  }
  {
    const int m = 5, heads = 6, hd = 64;
    std::vector<float> x = RandomVec(m * heads * hd, 1), w = RandomVec(hd, 2);
    float* dx = Up(x);
    cpu_->HeadRmsNorm(x.data(), m, heads, hd, w.data(), 1e-6f);
    gpu_->HeadRmsNorm(dx, m, heads, hd, Up(w), 1e-6f);
    EXPECT_LE(RelErr(Down(dx, x.size()), x), 1e-6) << "HeadRmsNorm";
  }
  {
    const int dim = 40;
    const std::vector<float> x = RandomVec(10 * dim, 3);
    const std::vector<uint32_t> rows = {9, 0, 4};
    std::vector<float> want(rows.size() * dim);
    cpu_->GatherRows(x.data(), dim, rows, want.data());
    float* out = Poisoned(want.size());
    gpu_->GatherRows(Up(x), dim, rows, out);
    EXPECT_EQ(Down(out, want.size()), want) << "GatherRows";
  }
  {
    const int m = 3, n = 70;
    std::vector<float> x = RandomVec(m * n, 4), y = RandomVec(m * n, 5), bias = RandomVec(n, 6);
    float* dx = Up(x);
    float* dy = Up(y);
    cpu_->AddBias(x.data(), m, n, bias.data());
    gpu_->AddBias(dx, m, n, Up(bias));
    cpu_->Add(x.data(), y.data(), x.size());
    gpu_->Add(dx, dy, x.size());
    EXPECT_EQ(Down(dx, x.size()), x) << "AddBias + Add";
    std::vector<float> want(x.size());
    cpu_->SwiGlu(x.data(), y.data(), x.size(), want.data());
    float* out = Poisoned(want.size());
    gpu_->SwiGlu(dx, dy, x.size(), out);
    EXPECT_LE(RelErr(Down(out, want.size()), want), 1e-6) << "SwiGlu";
    gpu_->SwiGlu(dx, dy, x.size(), dx);  // in place (out aliases gate)
    EXPECT_LE(RelErr(Down(dx, want.size()), want), 1e-6) << "SwiGlu in place";
  }
}

// Add followed by RmsNorm of the same rows is fused into one kernel; results must not change.
TEST_F(CudaBackendTest, ResidualAddThenNormIsFusedExactly) {
  const int m = 3, dim = 4096;
  std::vector<float> x = RandomVec(m * dim, 70), y = RandomVec(m * dim, 71), w = RandomVec(dim, 72);
  float* dx = Up(x);
  float* dy = Up(y);
  float* dw = Up(w);
  float* fused = Poisoned(m * dim);
  gpu_->Add(dx, dy, x.size());
  gpu_->RmsNorm(dx, dw, m, dim, 1e-5f, fused);
  const std::vector<float> fused_x = Down(dx, x.size()), fused_out = Down(fused, x.size());
  float* dx2 = Up(x);
  float* unfused = Poisoned(m * dim);
  gpu_->Add(dx2, dy, x.size());
  Down(dx2, 1);  // runs the Add alone
  gpu_->RmsNorm(dx2, dw, m, dim, 1e-5f, unfused);
  EXPECT_EQ(Down(dx2, x.size()), fused_x);
  EXPECT_EQ(Down(unfused, x.size()), fused_out);
  std::vector<float> want(m * dim);
  cpu_->Add(x.data(), y.data(), x.size());
  cpu_->RmsNorm(x.data(), w.data(), m, dim, 1e-5f, want.data());
  EXPECT_EQ(fused_x, x);
  EXPECT_LE(RelErr(fused_out, want), 1e-6);
}

// A decode layer's one-row chain (o projection, residual add, norm, Q/K/V; again with gate/up +
// SwiGLU and down; the final norm and an LM head) with the staged GEMVs (the norm inside the next
// GEMV, the residual add inside the GEMV before it) gives every output bit for bit as the separate
// kernels do (DYN_CUDA_GEMV_STAGED=0), and with the default's late scale within rounding.
TEST_F(CudaBackendTest, StagedGemvsEqualNormThenGemv) {
  std::vector<std::unique_ptr<Buffer>> owned;
  auto prepare = [&](int64_t rows, int64_t cols, uint32_t seed) {
    const std::vector<uint8_t> bytes = RandomWeightBytes(DType::kBF16, rows, cols, seed);
    auto w = gpu_->PrepareWeight(Weight{DType::kBF16, rows, cols, bytes.data()}, &owned);
    EXPECT_TRUE(w.ok()) << w.status().ToString();
    return w.ok() ? *w : Weight{};
  };
  for (const int64_t H : {4096, 1000, 576}) {
    const int64_t F = 2 * H + 8, V = 3001, KV = H / 4;
    const Weight wo = prepare(H, H, 300), wq = prepare(H, H, 301), wk = prepare(KV, H, 302), wv = prepare(KV, H, 303);
    const Weight wg = prepare(F, H, 304), wu = prepare(F, H, 305), wd = prepare(H, F, 306), wlm = prepare(V, H, 307);
    const std::vector<float> x0 = RandomVec(H, 310), a0 = RandomVec(H, 311);
    const float* norm_w[3] = {Up(RandomVec(H, 312)), Up(RandomVec(H, 313)), Up(RandomVec(H, 314))};
    // Every output of the chain on backend b, in one vector.
    auto run = [&](Backend* b) {
      float* x = Up(x0);
      const float* a = Up(a0);
      float *y1 = Poisoned(H), *y2 = Poisoned(H), *y3 = Poisoned(H), *xn1 = Poisoned(H), *xn2 = Poisoned(H), *xn3 = Poisoned(H);
      float *q = Poisoned(H), *k = Poisoned(KV), *v = Poisoned(KV), *g = Poisoned(F), *u = Poisoned(F), *logits = Poisoned(V);
      const float eps = 1e-5f;
      b->MatMul(a, 1, wo, y1);
      b->Add(x, y1, H);
      b->RmsNorm(x, norm_w[0], 1, static_cast<int>(H), eps, xn1);
      const Weight qkv[3] = {wq, wk, wv};
      float* const qkv_out[3] = {q, k, v};
      b->MatMulShared(xn1, 1, qkv, qkv_out);
      b->MatMul(q, 1, wo, y2);
      b->Add(x, y2, H);
      b->RmsNorm(x, norm_w[1], 1, static_cast<int>(H), eps, xn2);
      const Weight gu[2] = {wg, wu};
      float* const gu_out[2] = {g, u};
      b->MatMulShared(xn2, 1, gu, gu_out);
      b->SwiGlu(g, u, F, g);
      b->MatMul(g, 1, wd, y3);
      b->Add(x, y3, H);
      b->RmsNorm(x, norm_w[2], 1, static_cast<int>(H), eps, xn3);
      b->MatMul(xn3, 1, wlm, logits);
      std::vector<float> all;
      for (auto [p, n] : {std::pair<float*, int64_t>{x, H}, {y1, H}, {y2, H}, {y3, H}, {xn1, H}, {xn2, H}, {xn3, H}, {q, H}, {k, KV},
                          {v, KV}, {g, F}, {u, F}, {logits, V}}) {
        std::vector<float> o(n);
        b->CopyToHost(o.data(), p, n * sizeof(float));  // b's stream: runs b's pending list first
        all.insert(all.end(), o.begin(), o.end());
      }
      return all;
    };
    auto plain = CudaBackendWith("DYN_CUDA_GEMV_STAGED", "0");
    ASSERT_NE(plain, nullptr);
    const std::vector<float> want = run(plain.get());
    // Bitwise: the norms (1), the residual adds (2), both (3).
    for (const char* setting : {"1", "2", "3"}) {
      auto staged = CudaBackendWith("DYN_CUDA_GEMV_STAGED", setting);
      ASSERT_NE(staged, nullptr);
      const std::vector<float> got = run(staged.get());
      ASSERT_EQ(got.size(), want.size());
      EXPECT_EQ(0, std::memcmp(got.data(), want.data(), want.size() * sizeof(float))) << "H=" << H << ", staged " << setting;
    }
    // The default adds the late scale (4: 1 / rms applied to each row's sum), which rounds
    // differently: close, and no NaN (RelErr is infinite for one); not bit for bit, which shows
    // that the staged kernels ran (the bitwise settings above cannot tell).
    const std::vector<float> by_default = run(gpu_.get());
    EXPECT_LT(RelErr(by_default, want), 1e-5) << "H=" << H << ", default";
    EXPECT_NE(0, std::memcmp(by_default.data(), want.data(), want.size() * sizeof(float))) << "H=" << H << ", default not staged";
  }
}

TEST_F(CudaBackendTest, RopeBothStyles) {
  const int m = 4, heads = 3, hd = 64, half = hd / 2;
  const std::vector<int32_t> positions = {0, 1, 517, 8000};
  std::vector<float> inv(half);
  for (int j = 0; j < half; ++j) inv[j] = 1.0f / std::pow(500000.0f, 2.0f * j / hd);
  std::vector<float> table(m * hd);
  cpu_->RopeTable(positions, inv, table.data());
  float* dtable = Poisoned(table.size());
  gpu_->RopeTable(positions, inv, dtable);
  const std::vector<float> got_table = Down(dtable, table.size());
  EXPECT_LE(RelErr(got_table, table), 1e-6) << "RopeTable";
  for (RopeStyle style : {RopeStyle::kNeox, RopeStyle::kInterleaved}) {
    std::vector<float> x = RandomVec(m * heads * hd, 9);
    float* dx = Up(x);
    cpu_->Rope(x.data(), m, heads, hd, table.data(), style);
    gpu_->Rope(dx, m, heads, hd, Up(table), style);  // same table on both sides: only Rope differs
    EXPECT_LE(RelErr(Down(dx, x.size()), x), 1e-7) << "Rope style " << static_cast<int>(style);
  }
}

std::vector<float> RoundBf16(std::vector<float> v) {
  for (float& x : v) x = BF16ToF32(F32ToBF16(x));
  return v;
}

// Four sequences in one call over scattered blocks, GQA with 2 query heads per kv head: a prefill
// from 0 (prefill_rows), a chunk after a cached prefix of 9 (chunk_rows), a decode row at 33 and
// one at 399 (long enough for the row-wise kernel to split its keys). With a bf16 cache the CPU
// reference runs on the same bf16-rounded values in F32; chunks of >= 16 rows of head_dim 64/128
// then take the tensor-core kernel (bf16 q and P: a looser tolerance).
void CheckAttention(CudaBackendTest& t, Backend& cpu, Backend& gpu, int head_dim, int prefill_rows, int chunk_rows, DType kv) {
  const KvLayout layout = TestKvLayout(2, 2, head_dim, 4, 200);
  const int heads = 4, layer = 1;
  const bool bf16 = kv == DType::kBF16;
  std::vector<float> cache = RandomVec(layout.BlockFloats() * layout.num_blocks, 21);
  if (bf16) cache = RoundBf16(cache);
  std::vector<int32_t> table_a, table_d;
  for (int b = 0; b < 20; ++b) table_a.push_back(47 - b);
  for (int b = 0; b < 100; ++b) table_d.push_back(100 + (b * 37) % 100);
  const std::vector<int32_t> table_b = {5, 11, 0, 7, 2, 14, 15, 16}, table_c = {1, 3, 4, 6, 8, 9, 10, 12, 13};
  const int p = prefill_rows, c = chunk_rows;
  std::vector<AttentionSeq> seqs(4);
  seqs[0] = {0, p, 0, table_a};            // rows [0, p): positions [0, p)
  seqs[1] = {p, c, 9, table_b};            // c rows at positions 9.. after a cached prefix of 9
  seqs[2] = {p + c, 1, 33, table_c};       // one decode row at position 33
  seqs[3] = {p + c + 1, 1, 399, table_d};  // one at 399
  const int rows = p + c + 2;
  const size_t tf = layout.TokenFloats();
  const std::vector<float> q = RandomVec(rows * heads * head_dim, 22), k = RandomVec(rows * tf, 23), v = RandomVec(rows * tf, 24);
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  KvLayout gpu_layout = layout;
  gpu_layout.dtype = kv;
  float* dcache = nullptr;
  if (bf16) {
    std::vector<uint16_t> bits(cache.size());
    for (size_t i = 0; i < cache.size(); ++i) bits[i] = F32ToBF16(cache[i]);
    auto buf = gpu.Allocate(bits.size() * 2);
    ASSERT_TRUE(buf.ok());
    dcache = (*buf)->f32();
    gpu.CopyToBackend(dcache, bits.data(), bits.size() * 2);
    t.bufs_.push_back(std::move(buf).value());
    cpu.WriteKv(cache.data(), layout, layer, seqs, RoundBf16(k).data(), RoundBf16(v).data());
  } else {
    dcache = t.Up(cache);
    cpu.WriteKv(cache.data(), layout, layer, seqs, k.data(), v.data());
  }
  gpu.WriteKv(dcache, gpu_layout, layer, seqs, t.Up(k), t.Up(v));
  std::vector<float> got_cache;
  if (bf16) {
    std::vector<uint16_t> bits(cache.size());
    gpu.CopyToHost(bits.data(), dcache, bits.size() * 2);
    for (uint16_t b : bits) got_cache.push_back(BF16ToF32(b));
  } else {
    got_cache = t.Down(dcache, cache.size());
  }
  EXPECT_EQ(got_cache, cache) << "WriteKv head_dim " << head_dim << " " << DTypeName(kv);
  std::vector<float> want(rows * heads * head_dim);
  cpu.Attention(cache.data(), layout, layer, seqs, q.data(), heads, scale, want.data());
  float* out = t.Poisoned(want.size());
  gpu.Attention(dcache, gpu_layout, layer, seqs, t.Up(q), heads, scale, out);
  const std::vector<float> got = t.Down(out, want.size());
  // Rows of the tensor-core kernel (the first p + c rows when tiled) and the row-wise rest.
  const bool tiled = bf16 && (head_dim == 64 || head_dim == 128);
  const size_t row = static_cast<size_t>(heads) * head_dim;
  const size_t tiled_end = tiled && p >= 16 && c >= 16 ? (p + c) * row : 0;  // the test's cases: both or neither
  if (tiled_end > 0) {
    EXPECT_LE(RelErr({got.begin(), got.begin() + tiled_end}, {want.begin(), want.begin() + tiled_end}), 1e-2)
        << "tile attention head_dim " << head_dim << " rows " << p << "+" << c;
  }
  EXPECT_LE(RelErr({got.begin() + tiled_end, got.end()}, {want.begin() + tiled_end, want.end()}), 1e-5)
      << "row attention head_dim " << head_dim << " " << DTypeName(kv) << " rows " << p << "+" << c;
}

TEST_F(CudaBackendTest, PagedAttentionMatchesCpu) {
  // 5 prefill rows and a 3-row chunk: few rows, the row-wise kernel with key splits; 70 + 20 rows
  // with a bf16 cache: tiles of the tensor-core kernel (a full and a partial tile, and a chunk
  // after a cached prefix).
  for (DType kv : {DType::kF32, DType::kBF16})
    for (auto [p, c] : {std::pair{5, 3}, std::pair{70, 20}})
      for (int hd : {8, 64, 128, 256}) CheckAttention(*this, *cpu_, *gpu_, hd, p, c, kv);
}

// A step's attention metadata is uploaded once and reused by every layer. When the pending list
// runs in parts (here: an Allocate between the calls, as a growing buffer does mid-step), a call
// deferred after that run still reads the uploaded values, so the next step's upload must not
// overwrite them before it runs (it did: the cause of greedy output that changed from run to run
// after a prefill that returned no logits).
TEST_F(CudaBackendTest, NextStepsMetadataWaitsForPendingReaders) {
  const KvLayout layout = TestKvLayout(1, 2, 64, 16, 16);
  const int heads = 4, rows = 40;
  std::vector<int32_t> table_a = {3, 9, 4}, table_b = {12, 13, 14};
  const std::vector<AttentionSeq> step_a = {{0, rows, 0, table_a}}, step_b = {{0, 1, 7, table_b}};
  const size_t tf = layout.TokenFloats();
  const std::vector<float> q = RandomVec(rows * heads * 64, 31), k = RandomVec(rows * tf, 32), v = RandomVec(rows * tf, 33);
  const float scale = 0.125f;
  auto run = [&](bool flush_before_next_step) {
    float* cache = Up(std::vector<float>(layout.BlockFloats() * layout.num_blocks, 0.0f));
    float *dq = Up(q), *dk = Up(k), *dv = Up(v), *out = Poisoned(rows * heads * 64), *out_b = Poisoned(heads * 64);
    gpu_->WriteKv(cache, layout, 0, step_a, dk, dv);  // uploads step a's metadata
    auto extra = gpu_->Allocate(256);                 // runs the pending list
    gpu_->Attention(cache, layout, 0, step_a, dq, heads, scale, out);  // reuses the uploaded metadata
    if (flush_before_next_step) Down(out, 1);
    gpu_->WriteKv(cache, layout, 0, step_b, dk, dv);  // the next step: new metadata
    gpu_->Attention(cache, layout, 0, step_b, dq, heads, scale, out_b);
    return Down(out, rows * heads * 64);
  };
  const std::vector<float> want = run(true), got = run(false);
  for (float x : want) ASSERT_TRUE(std::isfinite(x));
  EXPECT_EQ(got, want);
}

// The peephole fusions (gate/up GEMV + SwiGlu, Rope of q and k + WriteKv, the split merge inside
// the attention kernel) give the same bits as the separate kernels of a backend made with
// DYN_CUDA_FUSE=0, on the call sequence the model issues at decode.
TEST_F(CudaBackendTest, FusedKernelsEqualSeparateKernels) {
  std::unique_ptr<Backend> plain = CudaBackendWith("DYN_CUDA_FUSE", "0");
  ASSERT_NE(plain, nullptr);
  Backend* both[2] = {gpu_.get(), plain.get()};
  std::vector<std::unique_ptr<Buffer>> keep;
  auto up = [&](Backend& b, const void* data, size_t bytes) {
    auto buf = b.Allocate(bytes);
    EXPECT_TRUE(buf.ok());
    float* p = (*buf)->f32();
    b.CopyToBackend(p, data, bytes);
    keep.push_back(std::move(buf).value());
    return p;
  };
  auto down = [](Backend& b, const float* p, size_t n) {
    std::vector<float> v(n);
    b.CopyToHost(v.data(), p, n * sizeof(float));
    return v;
  };
  {  // gate/up + SwiGlu at m = 1 and 2 (GEMV at 1, cuBLAS at 2), out aliasing gate as the model does
    const int64_t K = 256, N = 201;
    const std::vector<uint8_t> wg = RandomWeightBytes(DType::kBF16, N, K, 70), wu = RandomWeightBytes(DType::kBF16, N, K, 71);
    // Prepared once per backend: a backend keeps prepared host weights by address (tied-weight
    // dedup), so their device buffers must live as long as the backend uses them.
    std::vector<std::unique_ptr<Buffer>> owned;
    Weight dev_w[2][2];
    for (int i = 0; i < 2; ++i) {
      auto g = both[i]->PrepareWeight(Weight{DType::kBF16, N, K, wg.data()}, &owned);
      auto u = both[i]->PrepareWeight(Weight{DType::kBF16, N, K, wu.data()}, &owned);
      ASSERT_TRUE(g.ok() && u.ok());
      dev_w[i][0] = *g;
      dev_w[i][1] = *u;
    }
    for (int m : {1, 2}) {
      const std::vector<float> x = RandomVec(m * K, 72 + m);
      std::vector<float> want_gate(m * N), want_up(m * N);
      cpu_->MatMul(x.data(), m, Weight{DType::kBF16, N, K, wg.data()}, want_gate.data());
      cpu_->MatMul(x.data(), m, Weight{DType::kBF16, N, K, wu.data()}, want_up.data());
      cpu_->SwiGlu(want_gate.data(), want_up.data(), want_gate.size(), want_gate.data());
      std::vector<float> got[2];
      for (int i = 0; i < 2; ++i) {
        Backend& b = *both[i];
        const std::vector<float> nan(m * N, std::numeric_limits<float>::quiet_NaN());
        float* dx = up(b, x.data(), x.size() * 4);
        float* gate = up(b, nan.data(), nan.size() * 4);
        float* upo = up(b, nan.data(), nan.size() * 4);
        const Weight ws[2] = {dev_w[i][0], dev_w[i][1]};
        float* const outs[2] = {gate, upo};
        b.MatMulShared(dx, m, ws, outs);
        b.SwiGlu(gate, upo, static_cast<size_t>(m) * N, gate);
        got[i] = down(b, gate, m * N);
        const std::vector<float> got_up = down(b, upo, m * N);
        EXPECT_LE(RelErr(got_up, want_up), m == 1 ? 1e-5 : 1e-2) << "up m=" << m << " backend " << i;
        EXPECT_LE(RelErr(got[i], want_gate), m == 1 ? 1e-5 : 1e-2) << "swiglu m=" << m << " backend " << i;
      }
      EXPECT_EQ(got[0], got[1]) << "fused gate/up/SwiGlu m=" << m;
    }
  }
  // RopeTable, Rope q, Rope k, WriteKv, Attention: two decode rows. With a bf16 cache the fused
  // backend runs decode attention as clusters with the RoPE + KV write inside (8 splits at head_dim
  // 64, GQA 2; 16 at head_dim 128, GQA 4; 32 as 16 blocks of 8 warps at position 1000), the other
  // RopeWriteKv + attention + combine kernel; a third backend merges the clusters' splits through
  // distributed shared memory (DYN_CUDA_DECODE_MERGE=smem) rather than global memory, and a fourth
  // pushes every warp's state into the merging blocks (DYN_CUDA_DECODE_MERGE=push). The clusters
  // sum the keys and merge the splits in another order than the row-wise kernel and the combine
  // kernel (blocks of 8 warps where the grid has at most one block per multiprocessor, the splits
  // as a tree), so their outputs are compared to 1e-5; q, k and the cache must be the same bits.
  std::unique_ptr<Backend> smem = CudaBackendWith("DYN_CUDA_DECODE_MERGE", "smem");
  ASSERT_NE(smem, nullptr);
  std::unique_ptr<Backend> push = CudaBackendWith("DYN_CUDA_DECODE_MERGE", "push");
  ASSERT_NE(push, nullptr);
  Backend* runs[4] = {gpu_.get(), plain.get(), smem.get(), push.get()};
  struct Case {
    DType kv;
    int head_dim, heads, pos0;
  };
  for (const Case c : {Case{DType::kBF16, 64, 4, 450}, Case{DType::kF32, 64, 4, 450}, Case{DType::kBF16, 128, 8, 600},
                       Case{DType::kBF16, 128, 8, 1000}}) {
    const DType kv = c.kv;
    const int hd = c.head_dim, heads = c.heads, layer = 1, rows = 2;
    const KvLayout layout = TestKvLayout(2, 2, hd, 16, 128, kv);
    // Disjoint blocks (Backend::WriteKv: no sequence reads a block another one writes this call).
    std::vector<int32_t> table_a, table_b;
    for (int i = 0; i < 64; ++i) table_a.push_back((i * 5 + 3) % 64), table_b.push_back(64 + (i * 5 + 4) % 64);
    const std::vector<AttentionSeq> seqs = {{0, 1, c.pos0, table_a}, {1, 1, 77, table_b}};
    const std::vector<int32_t> positions = {c.pos0, 77};
    std::vector<float> inv(layout.head_dim / 2);
    for (size_t j = 0; j < inv.size(); ++j) inv[j] = 1.0f / std::pow(10000.0f, 2.0f * j / layout.head_dim);
    const size_t cache_bytes = layout.BlockFloats() * layout.num_blocks * layout.ElementBytes();
    std::vector<uint8_t> cache0(cache_bytes);
    if (kv == DType::kBF16) {
      const std::vector<float> c = RandomVec(cache_bytes / 2, 80);
      for (size_t i = 0; i < c.size(); ++i) reinterpret_cast<uint16_t*>(cache0.data())[i] = F32ToBF16(c[i]);
    } else {
      const std::vector<float> c = RandomVec(cache_bytes / 4, 80);
      std::memcpy(cache0.data(), c.data(), cache_bytes);
    }
    const std::vector<float> q = RandomVec(rows * heads * hd, 81), k = RandomVec(rows * 2 * hd, 82), v = RandomVec(rows * 2 * hd, 83);
    for (RopeStyle style : {RopeStyle::kNeox, RopeStyle::kInterleaved}) {
      std::vector<float> got_q[4], got_k[4], got_out[4];
      std::vector<uint8_t> got_cache[4];
      for (int i = 0; i < 4; ++i) {
        Backend& b = *runs[i];
        float* dcache = up(b, cache0.data(), cache_bytes);
        float* dq = up(b, q.data(), q.size() * 4);
        float* dk = up(b, k.data(), k.size() * 4);
        float* dv = up(b, v.data(), v.size() * 4);
        const std::vector<float> nan(rows * heads * hd, std::numeric_limits<float>::quiet_NaN());
        float* cs = up(b, nan.data(), rows * hd * 4);
        float* out = up(b, nan.data(), nan.size() * 4);
        b.RopeTable(positions, inv, cs);
        b.Rope(dq, rows, heads, hd, cs, style);
        b.Rope(dk, rows, 2, hd, cs, style);
        b.WriteKv(dcache, layout, layer, seqs, dk, dv);
        b.Attention(dcache, layout, layer, seqs, dq, heads, 0.125f, out);
        got_out[i] = down(b, out, nan.size());
        got_q[i] = down(b, dq, q.size());
        got_k[i] = down(b, dk, k.size());
        got_cache[i].resize(cache_bytes);
        b.CopyToHost(got_cache[i].data(), dcache, cache_bytes);
        EXPECT_TRUE(std::all_of(got_out[i].begin(), got_out[i].end(), [](float f) { return std::isfinite(f); }))
            << "NaN or inf in attention output, backend " << i;
      }
      const std::string what = std::string(kv == DType::kBF16 ? "bf16 cache" : "f32 cache") + " head_dim " + std::to_string(hd);
      // The push merge sums in another order than the default's global merge: bits that differ show
      // that it ran (its 1e-5 check below cannot tell). An F32 cache takes the row-wise kernel.
      if (kv == DType::kBF16) {
        EXPECT_NE(got_out[3], got_out[0]) << "push merge did not run, " << what;
      }
      for (int i : {0, 2, 3}) {
        EXPECT_LE(RelErr(got_out[i], got_out[1]), 1e-5) << "attention with split merge, backend " << i << ", " << what;
        EXPECT_EQ(got_q[i], got_q[1]) << "rotated q, backend " << i << ", " << what;
        EXPECT_EQ(got_k[i], got_k[1]) << "rotated k, backend " << i << ", " << what;
        EXPECT_TRUE(got_cache[i] == got_cache[1]) << "cache, backend " << i << ", " << what;
      }
      EXPECT_NE(got_cache[0], cache0) << "nothing written, " << what;
    }
  }
}

// A Llama-style stack (GQA 4, head_dim 128, bf16 weights and cache) run call by call as the model
// does: prefill on both backends, then decode steps at one row, where a backend with
// DYN_CUDA_PERSIST=1 runs the layers as one persistent kernel (norms folded into the GEMVs'
// input staging, residual adds into their epilogues, attention split over the grid). Its logits
// must match the kernel-by-kernel backend's within float rounding, through eager launches, graph
// capture and replay, and a context that crosses the 128-key split boundary.
TEST_F(CudaBackendTest, PersistentDecodeMatchesKernelByKernel) {
  std::unique_ptr<Backend> persist = CudaBackendWith("DYN_CUDA_PERSIST", "1");
  ASSERT_NE(persist, nullptr);
  ASSERT_NE(persist->Describe().find("persistent"), std::string::npos) << persist->Describe();
  constexpr int kLayers = 4, kHidden = 1024, kHeads = 8, kKvHeads = 2, kDim = 128, kFfn = 5632, kVocab = 512;
  constexpr int kBlock = 16, kBlocks = 24, kPrompt = 120, kSteps = 20;
  constexpr float kEps = 1e-5f;
  struct HostLayer {
    std::vector<uint8_t> wq, wk, wv, wo, wg, wu, wd;
    std::vector<float> attn_norm, ffn_norm;
  };
  // bf16 weights of variance 1/cols, so activations keep their scale through the layers.
  auto ScaledBf16 = [](int64_t rows, int64_t cols, uint32_t seed) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    const float scale = std::sqrt(3.0f / static_cast<float>(cols));
    std::vector<uint8_t> bytes(rows * cols * 2);
    for (int64_t i = 0; i < rows * cols; ++i) reinterpret_cast<uint16_t*>(bytes.data())[i] = F32ToBF16(u(rng) * scale);
    return bytes;
  };
  std::vector<HostLayer> host(kLayers);
  uint32_t seed = 900;
  for (HostLayer& l : host) {
    l.wq = ScaledBf16(kHeads * kDim, kHidden, seed++);
    l.wk = ScaledBf16(kKvHeads * kDim, kHidden, seed++);
    l.wv = ScaledBf16(kKvHeads * kDim, kHidden, seed++);
    l.wo = ScaledBf16(kHidden, kHeads * kDim, seed++);
    l.wg = ScaledBf16(kFfn, kHidden, seed++);
    l.wu = ScaledBf16(kFfn, kHidden, seed++);
    l.wd = ScaledBf16(kHidden, kFfn, seed++);
    l.attn_norm = RandomVec(kHidden, seed++, 0.1f);
    l.ffn_norm = RandomVec(kHidden, seed++, 0.1f);
    for (float& v : l.attn_norm) v += 1.0f;
    for (float& v : l.ffn_norm) v += 1.0f;
  }
  const std::vector<uint8_t> embed = ScaledBf16(kVocab, kHidden, seed++);
  const std::vector<uint8_t> lm_head = ScaledBf16(kVocab, kHidden, seed++);
  std::vector<float> out_norm = RandomVec(kHidden, seed++, 0.1f);
  for (float& v : out_norm) v += 1.0f;
  std::vector<float> inv_freq(kDim / 2);
  for (int i = 0; i < kDim / 2; ++i) inv_freq[i] = std::pow(500000.0f, -2.0f * i / kDim);
  const KvLayout kv = TestKvLayout(kLayers, kKvHeads, kDim, kBlock, kBlocks, DType::kBF16);
  std::vector<int32_t> table(kBlocks);
  for (int i = 0; i < kBlocks; ++i) table[i] = kBlocks - 1 - i;  // not the identity

  // One backend's weights, workspace and cache.
  struct Side {
    Backend* be = nullptr;
    std::vector<std::unique_ptr<Buffer>> owned;
    std::vector<std::array<Weight, 7>> w;
    std::vector<std::array<float*, 2>> norms;
    Weight embed, lm_head;
    float *out_norm = nullptr, *x = nullptr, *h = nullptr, *q = nullptr, *k = nullptr, *v = nullptr, *attn = nullptr, *gate = nullptr,
          *up = nullptr, *cos_sin = nullptr, *logits = nullptr, *cache = nullptr;
    float* Alloc(size_t floats) {
      auto b = be->Allocate(floats * sizeof(float));
      EXPECT_TRUE(b.ok());
      float* p = (*b)->f32();
      owned.push_back(std::move(b).value());
      return p;
    }
    float* Copy(const std::vector<float>& v) {
      float* p = Alloc(v.size());
      be->CopyToBackend(p, v.data(), v.size() * sizeof(float));
      return p;
    }
    Weight Prep(const std::vector<uint8_t>& bytes, int64_t rows, int64_t cols) {
      auto r = be->PrepareWeight(Weight{DType::kBF16, rows, cols, bytes.data()}, &owned);
      EXPECT_TRUE(r.ok());
      return *r;
    }
  };
  Side sides[2];
  sides[0].be = gpu_.get();
  sides[1].be = persist.get();
  for (Side& s : sides) {
    for (const HostLayer& l : host) {
      s.w.push_back({s.Prep(l.wq, kHeads * kDim, kHidden), s.Prep(l.wk, kKvHeads * kDim, kHidden),
                     s.Prep(l.wv, kKvHeads * kDim, kHidden), s.Prep(l.wo, kHidden, kHeads * kDim), s.Prep(l.wg, kFfn, kHidden),
                     s.Prep(l.wu, kFfn, kHidden), s.Prep(l.wd, kHidden, kFfn)});
      s.norms.push_back({s.Copy(l.attn_norm), s.Copy(l.ffn_norm)});
    }
    s.embed = s.Prep(embed, kVocab, kHidden);
    s.lm_head = s.Prep(lm_head, kVocab, kHidden);
    s.out_norm = s.Copy(out_norm);
    s.x = s.Alloc(kPrompt * kHidden);
    s.h = s.Alloc(kPrompt * kHidden);
    s.q = s.Alloc(kPrompt * kHeads * kDim);
    s.k = s.Alloc(kPrompt * kKvHeads * kDim);
    s.v = s.Alloc(kPrompt * kKvHeads * kDim);
    s.attn = s.Alloc(kPrompt * kHeads * kDim);
    s.gate = s.Alloc(kPrompt * kFfn);
    s.up = s.Alloc(kPrompt * kFfn);
    s.cos_sin = s.Alloc(kPrompt * kDim);
    s.logits = s.Alloc(kPrompt * kVocab);
    s.cache = s.Alloc(kv.BlockFloats() * kBlocks / 2);  // bf16: two bytes an element
  }
  // The model's call sequence for rows [start, start + ids.size()) of one sequence; the logits of
  // every row (a decode step: its one row).
  auto forward = [&](Side& s, const std::vector<uint32_t>& ids, int start) {
    Backend& be = *s.be;
    const int T = static_cast<int>(ids.size());
    std::vector<int32_t> pos(T);
    for (int i = 0; i < T; ++i) pos[i] = start + i;
    const AttentionSeq seq{0, T, start, std::span<const int32_t>(table)};
    be.Embedding(s.embed, ids, s.x);
    be.RopeTable(pos, inv_freq, s.cos_sin);
    for (int l = 0; l < kLayers; ++l) {
      const auto& w = s.w[l];
      be.RmsNorm(s.x, s.norms[l][0], T, kHidden, kEps, s.h);
      const Weight qkv[3] = {w[0], w[1], w[2]};
      float* const qkv_out[3] = {s.q, s.k, s.v};
      be.MatMulShared(s.h, T, qkv, qkv_out);
      be.Rope(s.q, T, kHeads, kDim, s.cos_sin, RopeStyle::kNeox);
      be.Rope(s.k, T, kKvHeads, kDim, s.cos_sin, RopeStyle::kNeox);
      be.WriteKv(s.cache, kv, l, std::span(&seq, 1), s.k, s.v);
      be.Attention(s.cache, kv, l, std::span(&seq, 1), s.q, kHeads, 1.0f / std::sqrt(float{kDim}), s.attn);
      be.MatMul(s.attn, T, w[3], s.h);
      be.Add(s.x, s.h, static_cast<size_t>(T) * kHidden);
      be.RmsNorm(s.x, s.norms[l][1], T, kHidden, kEps, s.h);
      const Weight gu[2] = {w[4], w[5]};
      float* const gu_out[2] = {s.gate, s.up};
      be.MatMulShared(s.h, T, gu, gu_out);
      be.SwiGlu(s.gate, s.up, static_cast<size_t>(T) * kFfn, s.gate);
      be.MatMul(s.gate, T, w[6], s.h);
      be.Add(s.x, s.h, static_cast<size_t>(T) * kHidden);
    }
    be.RmsNorm(s.x, s.out_norm, T, kHidden, kEps, s.h);
    be.MatMul(s.h, T, s.lm_head, s.logits);
    std::vector<float> logits(static_cast<size_t>(T) * kVocab);
    be.CopyToHost(logits.data(), s.logits, logits.size() * sizeof(float));
    return logits;
  };
  std::vector<uint32_t> prompt(kPrompt);
  for (int i = 0; i < kPrompt; ++i) prompt[i] = static_cast<uint32_t>((i * 37 + 5) % kVocab);
  const std::vector<float> pre0 = forward(sides[0], prompt, 0), pre1 = forward(sides[1], prompt, 0);
  ASSERT_EQ(pre0, pre1) << "prefill (no persistent kernel at many rows) differs";
  const int launches_before = cuda::PersistentLaunches();
  uint32_t token = static_cast<uint32_t>(std::max_element(pre0.end() - kVocab, pre0.end()) - (pre0.end() - kVocab));
  for (int step = 0; step < kSteps; ++step) {
    const std::vector<float> want = forward(sides[0], {token}, kPrompt + step);
    const std::vector<float> got = forward(sides[1], {token}, kPrompt + step);
    // Float sums in another order (the FFN's 5632-column rows are two ring chunks summed apart).
    ASSERT_LE(RelErr(got, want), 3e-4) << "decode step " << step << " (context " << kPrompt + step + 1 << ")";
    token = static_cast<uint32_t>(std::max_element(want.begin(), want.end()) - want.begin());
  }
  EXPECT_GT(cuda::PersistentLaunches(), launches_before) << "the persistent kernel never ran";
}

TEST_F(CudaBackendTest, DummyWeightsAreRandomBf16) {
  std::vector<std::unique_ptr<Buffer>> owned;
  auto w = gpu_->PrepareWeight(Weight{DType::kBF16, 64, 256, nullptr}, &owned);
  ASSERT_TRUE(w.ok());
  EXPECT_EQ(w->dtype, DType::kBF16);
  const std::vector<float> x(256, 1.0f);
  float* out = Poisoned(64);
  gpu_->MatMul(Up(x), 1, *w, out);
  const std::vector<float> got = Down(out, 64);
  double ss = 0;
  for (float g : got) ss += g * g;
  // Row sums of 256 uniform values of variance 1/256: about unit variance, never all zero.
  EXPECT_GT(ss / 64, 0.3);
  EXPECT_LT(ss / 64, 3.0);
}

}  // namespace
}  // namespace dyn
