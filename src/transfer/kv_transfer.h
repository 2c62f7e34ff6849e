// KV transfer: moving a request's KV cache blocks from a prefill worker to a decode worker
// (disaggregated serving). One interface, several backends:
//   tcp  - any two hosts: the source serves reads of its KV region on a TCP port
//   shm  - same host: the source's KV region lives in shared memory the destination maps and
//          copies from directly (one memcpy, no server on the data path)
// and room for cuda-ipc / nccl later (device memory on both sides).
//
// The unit is the block: the engine's KV cache is a region of num_blocks blocks of block_bytes
// each (for the native CPU engine, block b = [layers][K|V][block_size][kv_heads][head_dim] F32,
// contiguous). A transfer copies source blocks src[i] into destination blocks dst[i]. Backends
// coalesce runs of consecutive ids on both sides into one large copy, so a 1 GB transfer is a few
// operations, not one per block per layer.
//
// No engine or scheduler knowledge here: the engines decide which blocks, lease them on the
// source until the copy is done, and tell the destination where to pull from (KvTransferDescriptor).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "base/status.h"

namespace dyn {

// What a block holds; both sides must agree exactly or the transfer is refused.
struct KvLayoutDesc {
  int block_size = 0;   // tokens per block
  int num_layers = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  std::string dtype = "f32";
  size_t block_bytes = 0;  // bytes of one block (all layers, K and V)

  // OK, or InvalidArgument naming the first field that differs ("kv layout mismatch: head_dim 64 vs 128").
  Status CheckCompatible(const KvLayoutDesc& other) const;
  std::string ToString() const;
};

// A process's KV cache memory as the transfer layer sees it.
struct KvRegion {
  void* base = nullptr;
  size_t block_bytes = 0;
  int num_blocks = 0;
  size_t bytes() const { return block_bytes * static_cast<size_t>(num_blocks); }
};

// Where and what to pull; travels from the prefill worker to the decode worker (inside the
// request). Encoded as JSON by EncodeDescriptor/DecodeDescriptor.
struct KvTransferDescriptor {
  std::string backend;            // "tcp" | "shm" | "sim" (the mocker: nothing to copy)
  std::string address;            // tcp: "host:port"; shm: the shared memory object's name
  uint64_t lease_id = 0;          // the source's hold on the blocks (released after the pull)
  // The source worker's request-plane "host:port": its "kv_release" endpoint ends the lease
  // (disagg/worker_kv_transfer.h). Empty: the lease only expires.
  std::string control_address;
  std::vector<int32_t> block_ids; // source blocks, in prompt order
  int num_tokens = 0;             // prompt tokens whose KV the blocks hold
  KvLayoutDesc layout;
};
std::string EncodeDescriptor(const KvTransferDescriptor& d);
Result<KvTransferDescriptor> DecodeDescriptor(std::string_view json);

// Source side: makes a KV region readable by destinations. One per engine.
class KvTransferSource {
 public:
  virtual ~KvTransferSource() = default;
  virtual std::string backend() const = 0;
  virtual std::string address() const = 0;  // goes into descriptors
  virtual void Stop() = 0;
};

// Destination side: copies remote blocks into the local region. Thread-safe; Pull blocks the
// calling thread until the copy is complete (callers run it off their engine's step thread).
class KvTransferSink {
 public:
  virtual ~KvTransferSink() = default;
  // Copies src_blocks of the source named by (backend, address) into dst_blocks of `local`
  // (same count). Fails (nothing partially trusted) on layout mismatch, bad ids, or I/O errors.
  virtual Status Pull(const KvTransferDescriptor& from, std::span<const int32_t> src_blocks,
                      std::span<const int32_t> dst_blocks, const KvLayoutDesc& local_layout, KvRegion local) = 0;
};

struct TransferStats {
  uint64_t transfers = 0;
  uint64_t bytes = 0;
  double seconds = 0;  // summed wall time of pulls
};

// ---- TCP ----
struct TcpSourceOptions {
  std::string host = "0.0.0.0";
  int port = 0;                        // 0: ephemeral
  std::string advertise_host = "127.0.0.1";
  int send_timeout_ms = 60000;         // a sink that stops reading frees its connection thread after this
  int socket_buffer_bytes = 4 << 20;   // SO_SNDBUF/SO_RCVBUF (the kernel doubles it); 0: autotuning
  // Caps each pull's send rate (bytes/s; 0: unlimited), so KV traffic leaves room on a shared
  // link; also what makes a transfer last long enough to be cut in a test.
  double max_bytes_per_second = 0;
};
Result<std::unique_ptr<KvTransferSource>> StartTcpKvSource(KvRegion region, KvLayoutDesc layout,
                                                           const TcpSourceOptions& options);

// ---- shared memory (same host) ----
// The region's memory itself: created by the source engine for its KV cache (so no copy is needed
// on its side), mapped read-only by destinations. Unlinked when the source stops.
// The segment starts with a small header (magic, layout, block count) written by StartShmKvSource;
// data() points past it, so the whole of data()/size() is the caller's.
class SharedKvMemory {
 public:
  static Result<std::unique_ptr<SharedKvMemory>> Create(size_t bytes);  // a fresh, unique name
  virtual ~SharedKvMemory() = default;
  virtual void* data() = 0;
  virtual size_t size() const = 0;
  virtual const std::string& name() const = 0;
};
// Removes the segments that source processes which died without stopping left in /dev/shm (names
// carry the creator's pid). Returns how many. Pids are looked up in this process's pid namespace:
// do not call it where processes of another pid namespace share this /dev/shm.
int RemoveOrphanedSharedKvMemory();
// `region` must lie inside memory.data()/size(); `memory` must outlive the source. A memory is
// published by one source, once.
Result<std::unique_ptr<KvTransferSource>> StartShmKvSource(SharedKvMemory& memory, KvRegion region, KvLayoutDesc layout);

// One sink that speaks every backend (it picks by descriptor.backend), with connection and
// mapping caches.
struct KvSinkOptions {
  int connect_timeout_ms = 5000;
  int io_timeout_ms = 30000;  // a source that stalls this long fails the pull (no hang)
  int socket_buffer_bytes = 4 << 20;  // as TcpSourceOptions::socket_buffer_bytes
};
std::unique_ptr<KvTransferSink> CreateKvTransferSink(const KvSinkOptions& options = {});
TransferStats SinkStats(const KvTransferSink& sink);

}  // namespace dyn
