// The shared memory backend (same host): the source's KV region lives in a POSIX shared memory
// object; a sink maps it read-only once and memcpy's coalesced runs. No server on the data path.
//
// Segment: [ShmHeader, padded to 4 KiB][data() ... size()]. StartShmKvSource fills the header
// (layout, where the region starts, block count) and then publishes state = kServing; Stop sets
// kStopped and unlinks the name, so new sinks cannot map it and sinks holding a mapping refuse it.
#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "transfer/transfer_internal.h"

namespace dyn {

using namespace transfer_internal;

namespace {

constexpr uint64_t kShmMagic = 0x3156'4B2D'4E59'44ULL;  // "DYN-KV1"
constexpr size_t kHeaderBytes = 4096;
enum ShmState : uint32_t { kUnpublished = 0, kServing = 1, kStopped = 2 };

struct ShmHeader {
  uint64_t magic;
  uint32_t state;  // ShmState, written last (release) by the source
  uint32_t reserved;
  uint64_t data_offset;  // region start, from the segment start
  uint64_t block_bytes;
  int32_t num_blocks;
  int32_t block_size;
  int32_t num_layers;
  int32_t num_kv_heads;
  int32_t head_dim;
  char dtype[28];
};
static_assert(sizeof(ShmHeader) <= kHeaderBytes);

std::atomic<uint64_t> g_next_segment{0};

class PosixSharedKvMemory final : public SharedKvMemory {
 public:
  PosixSharedKvMemory(std::string name, char* base, size_t bytes) : name_(std::move(name)), base_(base), bytes_(bytes) {}
  ~PosixSharedKvMemory() override {
    Unlink();
    ::munmap(base_, kHeaderBytes + bytes_);
  }
  void* data() override { return base_ + kHeaderBytes; }
  size_t size() const override { return bytes_; }
  const std::string& name() const override { return name_; }

  ShmHeader* header() { return reinterpret_cast<ShmHeader*>(base_); }
  char* segment() { return base_; }
  void Unlink() {
    if (!unlinked_.exchange(true)) ::shm_unlink(name_.c_str());
  }

 private:
  std::string name_;
  char* base_;
  size_t bytes_;
  std::atomic<bool> unlinked_{false};
};

class ShmKvSource final : public KvTransferSource {
 public:
  explicit ShmKvSource(PosixSharedKvMemory& memory) : memory_(memory) {}
  ~ShmKvSource() override { Stop(); }
  std::string backend() const override { return "shm"; }
  std::string address() const override { return memory_.name(); }
  void Stop() override {
    if (stopped_.exchange(true)) return;
    std::atomic_ref<uint32_t>(memory_.header()->state).store(kStopped, std::memory_order_release);
    memory_.Unlink();
  }

 private:
  PosixSharedKvMemory& memory_;
  std::atomic<bool> stopped_{false};
};

}  // namespace

Result<std::unique_ptr<SharedKvMemory>> SharedKvMemory::Create(size_t bytes) {
  const std::string name = "/dyn-kv-" + std::to_string(::getpid()) + "-" + std::to_string(g_next_segment++);
  int fd = ::shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600);
  if (fd < 0) return Status::IoError("shm_open " + name + ": " + strerror(errno));
  UniqueFd owned(fd);
  const size_t total = kHeaderBytes + bytes;
  if (::ftruncate(fd, static_cast<off_t>(total)) < 0) {
    ::shm_unlink(name.c_str());
    return Status::ResourceExhausted("ftruncate " + name + " to " + std::to_string(total) + ": " + strerror(errno));
  }
  void* base = ::mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (base == MAP_FAILED) {
    ::shm_unlink(name.c_str());
    return Status::ResourceExhausted("mmap " + name + ": " + strerror(errno));
  }
  return std::unique_ptr<SharedKvMemory>(std::make_unique<PosixSharedKvMemory>(name, static_cast<char*>(base), bytes));
}

int RemoveOrphanedSharedKvMemory() {
  DIR* dir = ::opendir("/dev/shm");
  if (dir == nullptr) return 0;
  int removed = 0;
  const std::string prefix = "dyn-kv-";
  while (dirent* e = ::readdir(dir)) {
    const std::string name = e->d_name;
    if (name.rfind(prefix, 0) != 0) continue;
    const long pid = std::strtol(name.c_str() + prefix.size(), nullptr, 10);
    if (pid <= 0 || ::kill(static_cast<pid_t>(pid), 0) == 0 || errno != ESRCH) continue;
    if (::shm_unlink(("/" + name).c_str()) == 0) ++removed;
  }
  ::closedir(dir);
  return removed;
}

Result<std::unique_ptr<KvTransferSource>> StartShmKvSource(SharedKvMemory& memory, KvRegion region, KvLayoutDesc layout) {
  auto* posix = dynamic_cast<PosixSharedKvMemory*>(&memory);
  if (posix == nullptr) return Status::InvalidArgument("shm kv source: memory was not made by SharedKvMemory::Create");
  if (region.block_bytes != layout.block_bytes || region.num_blocks < 0) {
    return Status::InvalidArgument("shm kv source: region block_bytes " + std::to_string(region.block_bytes) +
                                   " does not match the layout's " + std::to_string(layout.block_bytes));
  }
  char* begin = static_cast<char*>(region.base);
  char* data = static_cast<char*>(memory.data());
  if (begin < data || begin + region.bytes() > data + memory.size()) {
    return Status::InvalidArgument("shm kv source: the region is not inside the shared memory " + memory.name());
  }
  if (layout.dtype.size() >= sizeof(ShmHeader::dtype)) return Status::InvalidArgument("shm kv source: dtype too long");
  ShmHeader* h = posix->header();
  if (std::atomic_ref<uint32_t>(h->state).load() != kUnpublished) {
    return Status::InvalidArgument("shm kv source: " + memory.name() + " was already published");
  }
  h->magic = kShmMagic;
  h->data_offset = static_cast<uint64_t>(begin - posix->segment());
  h->block_bytes = region.block_bytes;
  h->num_blocks = region.num_blocks;
  h->block_size = layout.block_size;
  h->num_layers = layout.num_layers;
  h->num_kv_heads = layout.num_kv_heads;
  h->head_dim = layout.head_dim;
  std::memset(h->dtype, 0, sizeof(h->dtype));
  std::memcpy(h->dtype, layout.dtype.data(), layout.dtype.size());
  std::atomic_ref<uint32_t>(h->state).store(kServing, std::memory_order_release);
  return std::unique_ptr<KvTransferSource>(std::make_unique<ShmKvSource>(*posix));
}

namespace transfer_internal {

struct ShmPuller::Mapping {
  const char* base = nullptr;
  size_t bytes = 0;
  ~Mapping() {
    if (base != nullptr) ::munmap(const_cast<char*>(base), bytes);
  }
  const ShmHeader& header() const { return *reinterpret_cast<const ShmHeader*>(base); }
  uint32_t state() const {
    return std::atomic_ref<uint32_t>(const_cast<ShmHeader&>(header()).state).load(std::memory_order_acquire);
  }
};

ShmPuller::~ShmPuller() = default;

Result<std::shared_ptr<ShmPuller::Mapping>> ShmPuller::Map(const std::string& name, bool fresh) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!fresh) {
    auto it = mappings_.find(name);
    if (it != mappings_.end()) return it->second;
  }
  // Drop this name's old mapping and any mapping whose source has stopped: a stopped source's
  // pages stay alive while mapped, and nobody will pull from it again.
  std::erase_if(mappings_, [&](const auto& entry) { return entry.first == name || entry.second->state() != kServing; });
  int fd = ::shm_open(name.c_str(), O_RDONLY | O_CLOEXEC, 0);
  if (fd < 0) {
    return Status::Unavailable("shm source " + name + " cannot be opened (stopped or on another host?): " +
                               strerror(errno));
  }
  UniqueFd owned(fd);
  struct stat st {};
  if (::fstat(fd, &st) < 0) return Status::IoError("fstat " + name + ": " + strerror(errno));
  if (static_cast<size_t>(st.st_size) < kHeaderBytes) return Status::Unavailable("shm source " + name + " has no header");
  void* base = ::mmap(nullptr, static_cast<size_t>(st.st_size), PROT_READ, MAP_SHARED, fd, 0);
  if (base == MAP_FAILED) return Status::IoError("mmap " + name + ": " + strerror(errno));
  auto m = std::make_shared<Mapping>();
  m->base = static_cast<const char*>(base);
  m->bytes = static_cast<size_t>(st.st_size);
  mappings_[name] = m;
  return m;
}

Status ShmPuller::Pull(const std::string& name, const KvLayoutDesc& local_layout, std::span<const int32_t> src,
                       std::span<const int32_t> dst, KvRegion local) {
  const std::string where = "kv pull from shm source " + name;
  DYN_ASSIGN_OR_RETURN(std::shared_ptr<Mapping> m, Map(name, /*fresh=*/false));
  if (m->state() != kServing) {
    // A cached mapping of a stopped source (or of an old process whose name was reused): look again.
    DYN_ASSIGN_OR_RETURN(m, Map(name, /*fresh=*/true));
  }
  const ShmHeader& h = m->header();
  if (h.magic != kShmMagic) return Status::IoError(where + ": not a dyn kv segment");
  if (m->state() != kServing) return Status::Unavailable(where + ": the source has stopped");
  KvLayoutDesc remote;
  remote.block_size = h.block_size;
  remote.num_layers = h.num_layers;
  remote.num_kv_heads = h.num_kv_heads;
  remote.head_dim = h.head_dim;
  remote.dtype = std::string(h.dtype, strnlen(h.dtype, sizeof(h.dtype)));
  remote.block_bytes = h.block_bytes;
  if (Status s = remote.CheckCompatible(local_layout); !s.ok()) return s.WithContext(where + " refused");
  if (h.num_blocks < 0 || h.block_bytes == 0 || h.data_offset > m->bytes ||
      static_cast<uint64_t>(h.num_blocks) > (m->bytes - h.data_offset) / h.block_bytes) {
    return Status::IoError(where + ": header describes more blocks than the segment holds");
  }
  DYN_RETURN_IF_ERROR(CheckIds(src, h.num_blocks, "source").WithContext(where + " refused"));
  const char* from = m->base + h.data_offset;
  char* to = static_cast<char*>(local.base);
  std::vector<CopySpan> spans;
  size_t bytes = 0;
  for (const PairRun& r : CoalescePairs(src, dst)) {
    spans.push_back({to + static_cast<size_t>(r.dst) * local.block_bytes, from + static_cast<size_t>(r.src) * h.block_bytes,
                     static_cast<size_t>(r.count) * h.block_bytes});
    bytes += spans.back().bytes;
  }
  ParallelCopy(spans, CopyThreadsFor(bytes));
  return Status::Ok();
}

size_t ShmPuller::MappedSegments() {
  std::lock_guard<std::mutex> lock(mu_);
  return mappings_.size();
}

}  // namespace transfer_internal
}  // namespace dyn
