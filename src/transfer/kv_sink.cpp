// The sink every engine uses: checks what it can locally, then hands the pull to the backend named
// by the descriptor. Counts successful pulls for metrics.
#include <chrono>

#include "transfer/transfer_internal.h"

namespace dyn {

using namespace transfer_internal;

namespace {

class MultiBackendSink final : public KvTransferSink {
 public:
  explicit MultiBackendSink(const KvSinkOptions& options) : tcp_(options) {}

  Status Pull(const KvTransferDescriptor& from, std::span<const int32_t> src_blocks, std::span<const int32_t> dst_blocks,
              const KvLayoutDesc& local_layout, KvRegion local) override {
    if (src_blocks.size() != dst_blocks.size()) {
      return Status::InvalidArgument("kv pull: " + std::to_string(src_blocks.size()) + " source blocks but " +
                                     std::to_string(dst_blocks.size()) + " destination blocks");
    }
    if (local.block_bytes != local_layout.block_bytes) {
      return Status::InvalidArgument("kv pull: local region block_bytes " + std::to_string(local.block_bytes) +
                                     " does not match the local layout's " + std::to_string(local_layout.block_bytes));
    }
    // The descriptor's layout is what the source said when it made it; refuse early on a mismatch
    // (the source checks again against its real layout).
    DYN_RETURN_IF_ERROR(local_layout.CheckCompatible(from.layout).WithContext("kv pull refused"));
    DYN_RETURN_IF_ERROR(CheckIds(dst_blocks, local.num_blocks, "destination").WithContext("kv pull"));
    if (from.backend != "tcp" && from.backend != "shm") {
      return Status::Unsupported("kv pull: unknown transfer backend '" + from.backend + "'");
    }
    const auto start = std::chrono::steady_clock::now();
    Status status;
    if (!src_blocks.empty()) {
      status = from.backend == "tcp" ? tcp_.Pull(from.address, local_layout, src_blocks, dst_blocks, local)
                                     : shm_.Pull(from.address, local_layout, src_blocks, dst_blocks, local);
    }
    if (!status.ok()) return status;
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::lock_guard<std::mutex> lock(mu_);
    ++stats_.transfers;
    stats_.bytes += static_cast<uint64_t>(src_blocks.size()) * local.block_bytes;
    stats_.seconds += seconds;
    return Status::Ok();
  }

  TransferStats Stats() const {
    std::lock_guard<std::mutex> lock(mu_);
    return stats_;
  }

 private:
  TcpPuller tcp_;
  ShmPuller shm_;
  mutable std::mutex mu_;
  TransferStats stats_;
};

}  // namespace

std::unique_ptr<KvTransferSink> CreateKvTransferSink(const KvSinkOptions& options) {
  return std::make_unique<MultiBackendSink>(options);
}

TransferStats SinkStats(const KvTransferSink& sink) {
  auto* s = dynamic_cast<const MultiBackendSink*>(&sink);
  return s == nullptr ? TransferStats{} : s->Stats();
}

}  // namespace dyn
