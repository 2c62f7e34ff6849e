// kv_transfer_bench: bandwidth of each KV transfer backend against a plain memcpy of the same bytes
// (the physical limit of a same-host copy on this machine).
//
//   kv_transfer_bench [--reps N] [--sizes-mb 1,16,128,1024] [--backends memcpy,shm,tcp] [--socket-buffer-kb K]
//
// One source region (in shared memory, served by both backends) and one destination region, each
// as large as the largest size. For every block size, transfer size and id pattern it prints the
// median GB/s (10^9 bytes/s) over N samples and the ratio to memcpy. Each sample repeats the
// transfer until it has moved at least 64 MiB, so small sizes are not lost in timer noise.
// Source and sink live in one process here (loopback TCP, one mapping of the segment); across
// processes the copies are the same.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "transfer/kv_transfer.h"

namespace {

using namespace dyn;

struct BlockShape {
  const char* name;
  KvLayoutDesc layout;
};

KvLayoutDesc MakeLayout(int block_size, int layers, int kv_heads, int head_dim) {
  KvLayoutDesc l;
  l.block_size = block_size;
  l.num_layers = layers;
  l.num_kv_heads = kv_heads;
  l.head_dim = head_dim;
  l.dtype = "f32";
  l.block_bytes = static_cast<size_t>(layers) * 2 * block_size * kv_heads * head_dim * 4;
  return l;
}

std::vector<std::string> Split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');) out.push_back(item);
  return out;
}

std::string CpuModel() {
  std::ifstream in("/proc/cpuinfo");
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  }
  return "unknown cpu";
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  int reps = 7;
  std::vector<size_t> sizes_mb = {1, 16, 128, 1024};
  std::vector<std::string> backends = {"memcpy", "shm", "tcp"};
  int socket_buffer_bytes = TcpSourceOptions{}.socket_buffer_bytes;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string flag = argv[i];
    if (flag == "--reps") {
      reps = std::max(1, std::atoi(argv[i + 1]));
    } else if (flag == "--sizes-mb") {
      sizes_mb.clear();
      for (const std::string& s : Split(argv[i + 1])) sizes_mb.push_back(std::stoul(s));
    } else if (flag == "--socket-buffer-kb") {
      socket_buffer_bytes = std::atoi(argv[i + 1]) * 1024;
    } else if (flag == "--backends") {
      backends = Split(argv[i + 1]);
    } else {
      std::fprintf(stderr, "usage: %s [--reps N] [--sizes-mb 1,16,128,1024] [--backends memcpy,shm,tcp] [--socket-buffer-kb K]\n", argv[0]);
      return 2;
    }
  }
  // 256 KiB blocks, and a real one: 16 tokens of SmolLM2-135M in F32 (30 layers, 3 KV heads of 64).
  const std::vector<BlockShape> shapes = {{"256KiB", MakeLayout(16, 32, 1, 64)}, {"SmolLM2-16tok", MakeLayout(16, 30, 3, 64)}};
  const size_t max_bytes = *std::max_element(sizes_mb.begin(), sizes_mb.end()) << 20;

  char* dst_base = static_cast<char*>(std::aligned_alloc(4096, max_bytes));
  std::memset(dst_base, 0, max_bytes);  // touch every page before timing

  std::printf("machine: %s, %u cpus; %d samples per case, median\n", CpuModel().c_str(),
              std::thread::hardware_concurrency(), reps);
  std::printf("%-14s %8s %-11s %8s %10s %10s %8s\n", "block", "size_MiB", "ids", "blocks", "backend", "GB/s", "x_memcpy");

  auto sink = CreateKvTransferSink(KvSinkOptions{.socket_buffer_bytes = socket_buffer_bytes});
  for (const BlockShape& shape : shapes) {
    // A fresh segment per shape (a segment is published once); one source + one destination region.
    auto memory = SharedKvMemory::Create(max_bytes);
    if (!memory.ok()) {
      std::fprintf(stderr, "%s\n", memory.status().ToString().c_str());
      return 1;
    }
    char* src_base = static_cast<char*>((*memory)->data());
    auto* words = reinterpret_cast<uint64_t*>(src_base);
    for (size_t i = 0; i < max_bytes / 8; ++i) words[i] = i * 0x9E3779B97F4A7C15ULL;
    const KvLayoutDesc& layout = shape.layout;
    const int region_blocks = static_cast<int>(max_bytes / layout.block_bytes);
    KvRegion src_region{src_base, layout.block_bytes, region_blocks};
    KvRegion dst_region{dst_base, layout.block_bytes, region_blocks};
    auto shm = StartShmKvSource(**memory, src_region, layout);
    auto tcp = StartTcpKvSource(src_region, layout,
                                TcpSourceOptions{.host = "127.0.0.1", .socket_buffer_bytes = socket_buffer_bytes});
    if (!shm.ok() || !tcp.ok()) {
      std::fprintf(stderr, "cannot start sources: %s %s\n", shm.status().ToString().c_str(),
                   tcp.status().ToString().c_str());
      return 1;
    }
    for (size_t mb : sizes_mb) {
      const int n = std::max(1, static_cast<int>((mb << 20) / layout.block_bytes));
      const size_t bytes = static_cast<size_t>(n) * layout.block_bytes;
      for (const bool scattered : {false, true}) {
        std::vector<int32_t> src(n), dst(n);
        if (scattered) {
          std::mt19937 rng(static_cast<unsigned>(mb));
          std::vector<int32_t> all(region_blocks);
          std::iota(all.begin(), all.end(), 0);
          std::shuffle(all.begin(), all.end(), rng);
          src.assign(all.begin(), all.begin() + n);
          std::shuffle(all.begin(), all.end(), rng);
          dst.assign(all.begin(), all.begin() + n);
        } else {
          std::iota(src.begin(), src.end(), 0);
          std::iota(dst.begin(), dst.end(), 0);
        }
        const int inner = static_cast<int>(std::max<size_t>(1, (64u << 20) / bytes));
        double memcpy_gbps = 0;
        for (const std::string& backend : backends) {
          KvTransferDescriptor desc;
          desc.backend = backend;
          desc.address = backend == "shm" ? (*shm)->address() : (*tcp)->address();
          desc.layout = layout;
          auto once = [&]() -> Status {
            if (backend != "memcpy") return sink->Pull(desc, src, dst, layout, dst_region);
            if (!scattered) {
              std::memcpy(dst_base, src_base, bytes);
            } else {
              for (int i = 0; i < n; ++i) {
                std::memcpy(dst_base + dst[i] * layout.block_bytes, src_base + src[i] * layout.block_bytes,
                            layout.block_bytes);
              }
            }
            return Status::Ok();
          };
          std::memset(dst_base + dst[0] * layout.block_bytes, 0, layout.block_bytes);
          if (Status st = once(); !st.ok()) {  // warm-up (connection, mapping) and a check
            std::fprintf(stderr, "%s: %s\n", backend.c_str(), st.ToString().c_str());
            return 1;
          }
          const int last = n - 1;
          if (std::memcmp(dst_base + dst[0] * layout.block_bytes, src_base + src[0] * layout.block_bytes,
                          layout.block_bytes) != 0 ||
              std::memcmp(dst_base + dst[last] * layout.block_bytes, src_base + src[last] * layout.block_bytes,
                          layout.block_bytes) != 0) {
            std::fprintf(stderr, "%s: copied bytes differ\n", backend.c_str());
            return 1;
          }
          std::vector<double> gbps;
          for (int r = 0; r < reps; ++r) {
            const auto start = std::chrono::steady_clock::now();
            for (int k = 0; k < inner; ++k) (void)once();
            const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
            gbps.push_back(static_cast<double>(bytes) * inner / s / 1e9);
          }
          const double median = Median(gbps);
          if (backend == "memcpy") memcpy_gbps = median;
          std::printf("%-14s %8zu %-11s %8d %10s %10.2f %8s\n", shape.name, mb, scattered ? "scattered" : "consecutive", n,
                      backend.c_str(), median,
                      memcpy_gbps > 0 ? std::to_string(median / memcpy_gbps).substr(0, 4).c_str() : "-");
          std::fflush(stdout);
        }
      }
    }
    (*tcp)->Stop();
    (*shm)->Stop();
  }
  std::free(dst_base);
  return 0;
}
