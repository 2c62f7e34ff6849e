// The persistent decode kernel's planner (host code): which runs of pending calls it takes and
// the program it runs for them (cuda_persistent.cuh), and the trace printer.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "engine/native/backend/cuda/cuda_kernels.h"
#include "engine/native/backend/cuda/cuda_persistent.cuh"

namespace dyn::cuda {
namespace persist {
namespace {

bool GemvFits(const PersistentCall& c) {
  if (c.count < 1 || c.count > kGemvMaxJobs || c.cols <= 0 || c.cols % kTileCols != 0 || c.cols > kStageFloats) return false;
  if (c.swiglu_out != nullptr && (c.count != 2 || c.rows[0] != c.rows[1])) return false;
  int64_t units = 0;  // the kernel counts rows in int
  for (int j = 0; j < c.count; ++j) {
    if (c.w[j] == nullptr || c.rows[j] <= 0 || reinterpret_cast<uintptr_t>(c.w[j]) % 16 != 0) return false;
    units += c.rows[j];
  }
  if (units >= (int64_t{1} << 30)) return false;
  // Rows longer than a ring slot leave UnitSumsFloats beside the staged input for every row a block
  // may get.
  const int64_t row_chunks = (c.cols * 2 + kChunkBytes - 1) / kChunkBytes;
  const int64_t block_units = ((c.swiglu_out != nullptr ? c.rows[0] : units) + kMinGrid - 1) / kMinGrid;
  if (row_chunks > 1 && c.cols + UnitSumsFloats(static_cast<int>(row_chunks)) * block_units > kStageFloats) return false;
  return reinterpret_cast<uintptr_t>(c.in) % 16 == 0;
}

bool AttentionFits(const PersistentCall& c) {
  const KvLayout& l = c.layout;
  return c.rope.cos_sin != nullptr && c.meta.decode && c.meta.rows == 1 && c.meta.num_rowwise == 1 && c.meta.num_tiles == 0 &&
         l.dtype == DType::kBF16 && l.head_dim == kHeadDim && l.num_kv_heads > 0 && l.num_kv_heads <= kMaxKvHeads &&
         c.num_heads == kGroup * l.num_kv_heads && c.rope.q == c.q;
}

// DYN_CUDA_PERSIST_TRACE_FILE=path: every (phase, block)'s times as CSV lines appended to the file
// (ns from the launch's first start), with the block's multiprocessor: which blocks are slow, and
// whether the same multiprocessors are slow in every phase. Each launch starts with the header
// line (scripts/persist_trace.py splits the launches there).
void DumpTrace(const std::vector<Phase>& phases, const std::vector<unsigned long long>& t, const std::vector<unsigned long long>& gm,
               const unsigned long long* trace, int grid, unsigned long long t0) {
  const char* path = std::getenv("DYN_CUDA_PERSIST_TRACE_FILE");
  if (path == nullptr || *path == 0) return;
  std::vector<unsigned long long> smid(grid);
  Check(cudaMemcpy(smid.data(), trace + TraceSmidOffset(grid), grid * sizeof(smid[0]), cudaMemcpyDeviceToHost), "cudaMemcpy", __FILE__,
        __LINE__);
  FILE* f = std::fopen(path, "a");
  if (f == nullptr) return;
  const int n = static_cast<int>(phases.size());
  std::fprintf(f, "phase,kind,units,cols,block,smid,start,end,staged,chunks_done,landed,taken,wait_ns,work_ns,stage_loaded,stage_normed\n");
  for (int p = 0; p < n; ++p) {
    for (int b = 0; b < grid; ++b) {
      const unsigned long long* m = &gm[(static_cast<size_t>(p) * grid + b) * kGemvMarks];
      const long long start = static_cast<long long>(t[static_cast<size_t>(p) * grid + b] - t0);
      const long long end = static_cast<long long>(t[static_cast<size_t>(n + p) * grid + b] - t0);
      const long long done = m[kMarkChunksDone] > t0 ? static_cast<long long>(m[kMarkChunksDone] - t0) : 0;
      std::fprintf(f, "%d,%s,%lld,%d,%d,%llu,%lld,%lld,%llu,%lld,%llu,%llu,%llu,%llu,%llu,%llu\n", p,
                   phases[p].kind == kAttentionPhase ? "attn" : "gemv", static_cast<long long>(phases[p].units), phases[p].cols, b, smid[b],
                   start, end, m[kMarkStaged], done, m[kMarkLanded], m[kMarkTaken], m[kMarkWaitNs], m[kMarkWorkNs], m[kMarkStageLoaded],
                   m[kMarkStageNormed]);
    }
  }
  std::fclose(f);
}

}  // namespace

// Per phase kind, averaged over the phases of that kind: the time from the phase's start (the
// earliest block's) to the median and the last block's end, and from the last end to the next
// phase's start (negative where phases overlap: no grid barrier separates them).
void PrintPersistentTrace(cudaStream_t stream, const void* program, const unsigned long long* trace, int grid) {
  Check(cudaStreamSynchronize(stream), "cudaStreamSynchronize", __FILE__, __LINE__);
  int32_t n = 0;
  Check(cudaMemcpy(&n, program, sizeof(n), cudaMemcpyDeviceToHost), "cudaMemcpy", __FILE__, __LINE__);
  std::vector<Phase> phases(n);
  Check(cudaMemcpy(phases.data(), static_cast<const char*>(program) + offsetof(Program, phases), n * sizeof(Phase),
                   cudaMemcpyDeviceToHost), "cudaMemcpy", __FILE__, __LINE__);
  std::vector<unsigned long long> t(size_t{2} * n * grid);
  Check(cudaMemcpy(t.data(), trace, t.size() * sizeof(t[0]), cudaMemcpyDeviceToHost), "cudaMemcpy", __FILE__, __LINE__);
  std::vector<unsigned long long> gm(kMaxPhases * static_cast<size_t>(grid) * kGemvMarks);
  Check(cudaMemcpy(gm.data(), trace + TraceGemvOffset(grid), gm.size() * sizeof(gm[0]), cudaMemcpyDeviceToHost), "cudaMemcpy", __FILE__,
        __LINE__);
  struct Acc {
    double work = 0, tail = 0, gap = 0, stage = 0, ready = 0, taken = 0, wait = 0, probe = 0, probe_end = 0, proc = 0, loop_end = 0;
    int count = 0;
  };
  std::map<std::string, Acc> by_kind;
  const unsigned long long t0 = *std::min_element(t.begin(), t.begin() + grid);
  unsigned long long last_end = 0;
  for (int p = 0; p < n; ++p) {
    std::vector<unsigned long long> starts(t.begin() + static_cast<size_t>(p) * grid, t.begin() + static_cast<size_t>(p + 1) * grid);
    std::vector<unsigned long long> ends(t.begin() + static_cast<size_t>(n + p) * grid, t.begin() + static_cast<size_t>(n + p + 1) * grid);
    std::sort(ends.begin(), ends.end());
    const unsigned long long start = *std::min_element(starts.begin(), starts.end());
    const Phase& ph = phases[p];
    std::string kind = ph.kind == kAttentionPhase ? "attention" : "gemv";
    if (ph.kind == kGemvPhase) {
      kind += " " + std::to_string(ph.units) + "x" + std::to_string(ph.cols) + (ph.swiglu ? " swiglu" : "") + (ph.norm_w ? " norm" : "");
    }
    Acc& a = by_kind[kind];
    a.work += (ends[grid / 2] - start) * 1e-3;
    a.tail += (ends.back() - ends[grid / 2]) * 1e-3;
    if (p > 0) a.gap += (static_cast<double>(start) - static_cast<double>(last_end)) * 1e-3;
    const unsigned long long* marks_p = &gm[static_cast<size_t>(p) * grid * kGemvMarks];
    // The median block's mark k, in us (ns marks; the chunks' end relative to the phase's start).
    auto median_us = [&](PhaseMark k) {
      std::vector<double> v;
      for (int b = 0; b < grid; ++b) {
        const unsigned long long m = marks_p[static_cast<size_t>(b) * kGemvMarks + k];
        v.push_back(k != kMarkChunksDone ? m * 1e-3 : m > start ? (m - start) * 1e-3 : 0.0);
      }
      std::sort(v.begin(), v.end());
      return v[v.size() / 2];
    };
    a.probe += median_us(kMarkProbeStart);
    a.probe_end += median_us(kMarkProbeEnd);
    if (ph.kind == kGemvPhase) {
      for (int b = 0; b < grid; ++b) {
        const unsigned long long* m = &marks_p[static_cast<size_t>(b) * kGemvMarks];
        a.ready += static_cast<double>(m[kMarkLanded]);
        a.taken += static_cast<double>(m[kMarkTaken]);
        a.wait += m[kMarkWaitNs] * 1e-3;
        a.proc += m[kMarkWorkNs] * 1e-3;
      }
      a.stage += median_us(kMarkStaged);
      a.loop_end += median_us(kMarkChunksDone);
    }
    ++a.count;
    last_end = ends.back();
  }
  std::fprintf(stderr, "persistent kernel: %d phases, %.1f us from the first block's start to the last end\n", n, (last_end - t0) * 1e-3);
  DumpTrace(phases, t, gm, trace, grid, t0);
  // Attention tasks' steps (summed over the launch's attention phases in each block): the median
  // and the largest over the blocks that ran tasks, per phase.
  std::vector<unsigned long long> marks(static_cast<size_t>(kAttnMarks) * grid);
  Check(cudaMemcpy(marks.data(), trace + TraceMarksOffset(grid), marks.size() * sizeof(marks[0]), cudaMemcpyDeviceToHost), "cudaMemcpy",
        __FILE__, __LINE__);
  const int attention_phases = static_cast<int>(std::count_if(phases.begin(), phases.end(), [](const Phase& p) { return p.kind == kAttentionPhase; }));
  static const char* const kSteps[kAttnSteps] = {"q/k load", "rope", "kv write", "key loop", "partial handed on", "merge (last split)"};
  if (attention_phases > 0) {
    // Mark k's us a time over the blocks that ran it (`times`: the count mark), sorted.
    auto per_time = [&](int k, int times_mark) {
      std::vector<double> v;
      for (int b = 0; b < grid; ++b) {
        const unsigned long long* m = &marks[static_cast<size_t>(b) * kAttnMarks];
        if (m[times_mark] > 0) v.push_back(m[k] * 1e-3 / static_cast<double>(m[times_mark]));
      }
      std::sort(v.begin(), v.end());
      return v;
    };
    const std::vector<double> probe = per_time(kAttnKeyProbeMark, kAttnTasksMark);
    if (!probe.empty()) {
      std::fprintf(stderr, "  attention task: one load of its first key: median %.2f us, max %.2f\n", probe[probe.size() / 2], probe.back());
    }
    for (int k = 0; k < kAttnSteps; ++k) {
      const std::vector<double> v = per_time(k, k == kAttnSteps - 1 ? kAttnMergesMark : kAttnTasksMark);  // the merge: last tasks only
      if (v.empty()) continue;
      std::fprintf(stderr, "  attention task step %-18s: median %6.2f us, max %6.2f (%zu blocks)\n", kSteps[k], v[v.size() / 2], v.back(), v.size());
    }
  }
  for (const auto& [kind, a] : by_kind) {
    std::fprintf(stderr, "  %-32s x%3d: work %7.2f us (median block), tail %6.2f, gap before %6.2f; total %8.1f us\n",
                 kind.c_str(), a.count, a.work / a.count, a.tail / a.count, a.gap / a.count, a.work + a.tail + a.gap);
    std::fprintf(stderr, "    one L2 load at the phase's start: %.2f us, at its end %.2f (median block)\n", a.probe / a.count, a.probe_end / a.count);
    if (a.taken > 0) {
      std::fprintf(stderr, "    staged at %.2f us (median block); chunks landed before their warp came %.1f%%; wait %.3f us a chunk\n",
                   a.stage / a.count, 100.0 * a.ready / a.taken, a.wait / (a.taken));
      std::fprintf(stderr, "    chunks done at %.2f us (median block); %.3f us a chunk on landed chunks\n", a.loop_end / a.count, a.proc / a.taken);
    }
  }
}

}  // namespace persist

using namespace persist;

size_t PersistentScratchBytes() { return kLlOffset + kLlEntries * sizeof(uint64_t); }

namespace {

// Where the phases hand their outputs on: each phase's entries get their own place, and every row
// a phase reads is found among earlier phases' outputs (entries) or is not written by any of them
// (read plainly: it was written before the launch). A row written by the program only plainly (a
// GEMV's output that an add consumed, the rotated q and k written back, block 0's norm output) must
// not be read by a later phase; the plan is refused then.
class HandOffs {
 public:
  static constexpr int64_t kExternal = -1, kUnreadable = -2;
  int64_t Alloc(int64_t n) {
    const int64_t at = next_;
    next_ += (n + 31) / 32 * 32;  // 256-byte aligned (the readers load 16 bytes)
    return at;
  }
  void Wrote(const float* base, int64_t len, int64_t at) { writers_.push_back({base, len, at}); }
  // The entry offset of row [p, p + n), kExternal, or kUnreadable.
  int64_t Find(const float* p, int64_t n) const {
    for (auto it = writers_.rbegin(); it != writers_.rend(); ++it) {
      if (p + n <= it->base || p >= it->base + it->len) continue;
      if (p < it->base || p + n > it->base + it->len || it->at < 0) return kUnreadable;
      return it->at + (p - it->base);
    }
    return kExternal;
  }
  bool Fits() const { return next_ <= static_cast<int64_t>(kLlEntries); }

 private:
  struct Writer {
    const float* base;
    int64_t len, at;
  };
  std::vector<Writer> writers_;
  int64_t next_ = 0;
};

// Fills the phases' hand-off offsets; false if a phase reads a row it cannot.
bool PlanHandOffs(std::vector<Phase>& phases) {
  HandOffs h;
  for (Phase& p : phases) {
    p.ll_in = p.ll_res = p.ll_out = p.ll_q = p.ll_k = p.ll_v = p.ll_part = -1;
    if (p.kind == kGemvPhase) {
      p.ll_in = h.Find(p.in, p.cols);
      if (p.ll_in == HandOffs::kUnreadable) return false;
      if (p.residual != nullptr) {
        p.ll_res = h.Find(p.residual, p.rows[0]);
        if (p.ll_res == HandOffs::kUnreadable) return false;
      }
      if (p.norm_out != nullptr) h.Wrote(p.norm_out, p.cols, HandOffs::kUnreadable);
      if (p.swiglu) {
        h.Wrote(p.out[0], p.units, HandOffs::kUnreadable);
        h.Wrote(p.out[1], p.units, HandOffs::kUnreadable);
        p.ll_out = h.Alloc(p.units);
        h.Wrote(p.swiglu_out, p.units, p.ll_out);
      } else if (p.residual != nullptr) {
        h.Wrote(p.out[0], p.rows[0], HandOffs::kUnreadable);
        p.ll_out = h.Alloc(p.rows[0]);
        h.Wrote(p.residual, p.rows[0], p.ll_out);
      } else {
        p.ll_out = h.Alloc(p.units);
        int64_t at = p.ll_out;
        for (int j = 0; j < p.count; ++j) {
          h.Wrote(p.out[j], p.rows[j], at);
          at += p.rows[j];
        }
      }
    } else {
      const int64_t q_len = int64_t{p.num_heads} * kHeadDim, kv_len = int64_t{p.kv_heads} * kHeadDim;
      p.ll_q = h.Find(p.q, q_len);
      p.ll_k = h.Find(p.k, kv_len);
      p.ll_v = h.Find(p.v, kv_len);
      if (p.ll_q < 0 || p.ll_k < 0 || p.ll_v < 0) return false;  // q, k, v come from this program's Q/K/V phase
      p.ll_part = h.Alloc(int64_t{p.kv_heads} * kMaxSplits * kPartEntries);
      h.Wrote(p.q, q_len, HandOffs::kUnreadable);  // rotated, written back plainly
      h.Wrote(p.k, kv_len, HandOffs::kUnreadable);
      p.ll_out = h.Alloc(q_len);
      h.Wrote(p.attn_out, q_len, p.ll_out);
    }
  }
  return h.Fits();
}

}  // namespace

int PlanPersistent(std::span<const PersistentCall> calls, std::vector<unsigned char>* program) {
  std::vector<Phase> phases;
  struct {
    bool active = false;
    const float* x = nullptr;
    const float* w = nullptr;
    float eps = 0.0f;
    float* out = nullptr;
    int dim = 0;
  } norm;
  int complete = 0;  // calls taken so far that leave no norm pending
  size_t complete_phases = 0;
  int residual_phase = -1;  // the phase an AddNorm not yet consumed gave a residual
  for (size_t i = 0; i < calls.size(); ++i) {
    const PersistentCall& c = calls[i];
    if (c.kind == PersistentCall::kNorm) {
      if (norm.active || c.dim <= 0) break;
      norm = {true, c.x, c.norm_w, c.eps, c.norm_out, c.dim};
      continue;
    }
    if (c.kind == PersistentCall::kAddNorm) {
      if (norm.active || phases.empty()) break;
      Phase& prev = phases.back();
      if (prev.kind != kGemvPhase || prev.swiglu || prev.count != 1 || prev.residual != nullptr || prev.out[0] != c.y ||
          prev.rows[0] != c.dim) {
        break;
      }
      prev.residual = c.x;
      residual_phase = static_cast<int>(phases.size()) - 1;
      norm = {true, c.x, c.norm_w, c.eps, c.norm_out, c.dim};
      continue;
    }
    if (c.kind == PersistentCall::kGemv) {
      if (!GemvFits(c)) break;
      Phase p{};
      p.kind = kGemvPhase;
      p.count = c.count;
      p.swiglu = c.swiglu_out != nullptr;
      p.cols = static_cast<int32_t>(c.cols);
      p.tiles = p.cols / kTileCols;
      for (int j = 0; j < c.count; ++j) {
        p.rows[j] = c.rows[j];
        p.w[j] = c.w[j];
        p.out[j] = c.out[j];
        p.units += c.rows[j];
      }
      if (p.swiglu) p.units = c.rows[0];  // (gate, up) pairs
      p.swiglu_out = c.swiglu_out;
      p.in = c.in;
      if (norm.active) {
        if (c.in != norm.out || c.cols != norm.dim || reinterpret_cast<uintptr_t>(norm.x) % 16 != 0) break;
        p.in = norm.x;
        p.norm_w = norm.w;
        p.eps = norm.eps;
        p.norm_out = norm.out;
        norm.active = false;
        residual_phase = -1;
      }
      phases.push_back(p);
    } else if (c.kind == PersistentCall::kDecodeAttention) {
      if (norm.active || !AttentionFits(c)) break;
      Phase p{};
      p.kind = kAttentionPhase;
      p.cache = static_cast<__nv_bfloat16*>(c.cache);
      p.g = Geometry(c.layout, c.layer);
      p.meta = c.meta;
      p.q = c.rope.q;
      p.k = c.rope.k;
      p.v = c.rope.v;
      p.cos_sin = c.rope.cos_sin;
      p.neox = c.rope.neox ? 1 : 0;
      p.num_heads = c.num_heads;
      p.kv_heads = c.layout.num_kv_heads;
      p.scale = c.scale;
      p.attn_out = c.attn_out;
      phases.push_back(p);
    } else {
      break;
    }
    complete = static_cast<int>(i) + 1;
    complete_phases = phases.size();
  }
  if (residual_phase >= 0 && static_cast<size_t>(residual_phase) < complete_phases) phases[residual_phase].residual = nullptr;
  phases.resize(complete_phases);
  const auto gemv_phases = std::count_if(phases.begin(), phases.end(), [](const Phase& p) { return p.kind == kGemvPhase; });
  if (gemv_phases < kMinGemvPhases || phases.size() > kMaxPhases || !PlanHandOffs(phases)) return 0;
  program->assign(offsetof(Program, phases) + phases.size() * sizeof(Phase), 0);
  const int32_t count = static_cast<int32_t>(phases.size());
  std::memcpy(program->data(), &count, sizeof(count));
  std::memcpy(program->data() + offsetof(Program, phases), phases.data(), phases.size() * sizeof(Phase));
  return complete;
}

}  // namespace dyn::cuda
