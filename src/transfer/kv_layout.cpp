// KV layouts, transfer descriptors (JSON), and the run coalescing every backend uses.
#include <algorithm>
#include <boost/json.hpp>
#include <charconv>
#include <cstring>
#include <limits>
#include <sstream>
#include <thread>

#include "transfer/transfer_internal.h"

namespace dyn {

namespace json = boost::json;
using namespace transfer_internal;

namespace {

template <class T>
std::string Mismatch(const char* field, const T& mine, const T& theirs) {
  std::ostringstream os;
  os << "kv layout mismatch: " << field << " " << mine << " vs " << theirs;
  return os.str();
}

// 64-bit values travel as decimal strings (JSON numbers lose precision past 2^53 in many
// readers); numbers are accepted too.
Result<uint64_t> GetU64(const json::object& o, std::string_view key) {
  const json::value* v = o.if_contains(key);
  if (v == nullptr) return Status::InvalidArgument("missing field " + std::string(key));
  if (v->is_uint64()) return v->get_uint64();
  if (v->is_int64() && v->get_int64() >= 0) return static_cast<uint64_t>(v->get_int64());
  if (v->is_string()) {
    const json::string& s = v->get_string();
    uint64_t out = 0;
    auto [ptr, ec] = std::from_chars(s.data(), s.data() + s.size(), out);
    if (ec == std::errc() && ptr == s.data() + s.size() && !s.empty()) return out;
  }
  return Status::InvalidArgument("field " + std::string(key) + " is not an unsigned 64-bit value");
}

Result<int> GetInt(const json::object& o, std::string_view key) {
  const json::value* v = o.if_contains(key);
  if (v == nullptr) return Status::InvalidArgument("missing field " + std::string(key));
  if (v->is_int64() && v->get_int64() >= 0 && v->get_int64() <= std::numeric_limits<int>::max()) {
    return static_cast<int>(v->get_int64());
  }
  if (v->is_uint64() && v->get_uint64() <= static_cast<uint64_t>(std::numeric_limits<int>::max())) {
    return static_cast<int>(v->get_uint64());
  }
  return Status::InvalidArgument("field " + std::string(key) + " is not a non-negative int");
}

Result<std::string> GetString(const json::object& o, std::string_view key) {
  const json::value* v = o.if_contains(key);
  if (v == nullptr || !v->is_string()) return Status::InvalidArgument("missing string field " + std::string(key));
  return std::string(v->get_string());
}

json::object LayoutObject(const KvLayoutDesc& l) {
  json::object o;
  o["block_size"] = l.block_size;
  o["num_layers"] = l.num_layers;
  o["num_kv_heads"] = l.num_kv_heads;
  o["head_dim"] = l.head_dim;
  o["dtype"] = l.dtype;
  o["block_bytes"] = std::to_string(l.block_bytes);
  return o;
}

Result<KvLayoutDesc> LayoutFromObject(const json::value& v) {
  if (!v.is_object()) return Status::InvalidArgument("kv layout is not a JSON object");
  const json::object& o = v.get_object();
  KvLayoutDesc l;
  DYN_ASSIGN_OR_RETURN(l.block_size, GetInt(o, "block_size"));
  DYN_ASSIGN_OR_RETURN(l.num_layers, GetInt(o, "num_layers"));
  DYN_ASSIGN_OR_RETURN(l.num_kv_heads, GetInt(o, "num_kv_heads"));
  DYN_ASSIGN_OR_RETURN(l.head_dim, GetInt(o, "head_dim"));
  DYN_ASSIGN_OR_RETURN(l.dtype, GetString(o, "dtype"));
  DYN_ASSIGN_OR_RETURN(uint64_t block_bytes, GetU64(o, "block_bytes"));
  if (block_bytes == 0) return Status::InvalidArgument("kv layout block_bytes is 0");
  l.block_bytes = block_bytes;
  return l;
}

Result<json::value> ParseJson(std::string_view text, const char* what) {
  boost::system::error_code ec;
  json::value v = json::parse(text, ec);
  if (ec) return Status::InvalidArgument(std::string(what) + " is not valid JSON: " + ec.message());
  return v;
}

}  // namespace

Status KvLayoutDesc::CheckCompatible(const KvLayoutDesc& o) const {
  if (block_size != o.block_size) return Status::InvalidArgument(Mismatch("block_size", block_size, o.block_size));
  if (num_layers != o.num_layers) return Status::InvalidArgument(Mismatch("num_layers", num_layers, o.num_layers));
  if (num_kv_heads != o.num_kv_heads) {
    return Status::InvalidArgument(Mismatch("num_kv_heads", num_kv_heads, o.num_kv_heads));
  }
  if (head_dim != o.head_dim) return Status::InvalidArgument(Mismatch("head_dim", head_dim, o.head_dim));
  if (dtype != o.dtype) return Status::InvalidArgument(Mismatch("dtype", dtype, o.dtype));
  if (block_bytes != o.block_bytes) return Status::InvalidArgument(Mismatch("block_bytes", block_bytes, o.block_bytes));
  return Status::Ok();
}

std::string KvLayoutDesc::ToString() const {
  std::ostringstream os;
  os << "block_size=" << block_size << " layers=" << num_layers << " kv_heads=" << num_kv_heads
     << " head_dim=" << head_dim << " dtype=" << dtype << " block_bytes=" << block_bytes;
  return os.str();
}

std::string EncodeDescriptor(const KvTransferDescriptor& d) {
  json::object o;
  o["backend"] = d.backend;
  o["address"] = d.address;
  o["lease_id"] = std::to_string(d.lease_id);
  if (!d.control_address.empty()) o["control_address"] = d.control_address;
  json::array ids;
  ids.reserve(d.block_ids.size());
  for (int32_t id : d.block_ids) ids.emplace_back(id);
  o["block_ids"] = std::move(ids);
  o["num_tokens"] = d.num_tokens;
  o["layout"] = LayoutObject(d.layout);
  return json::serialize(o);
}

Result<KvTransferDescriptor> DecodeDescriptor(std::string_view text) {
  DYN_ASSIGN_OR_RETURN(json::value v, ParseJson(text, "kv transfer descriptor"));
  if (!v.is_object()) return Status::InvalidArgument("kv transfer descriptor is not a JSON object");
  const json::object& o = v.get_object();
  KvTransferDescriptor d;
  DYN_ASSIGN_OR_RETURN(d.backend, GetString(o, "backend"));
  DYN_ASSIGN_OR_RETURN(d.address, GetString(o, "address"));
  DYN_ASSIGN_OR_RETURN(d.lease_id, GetU64(o, "lease_id"));
  if (const json::value* c = o.if_contains("control_address")) {
    if (!c->is_string()) return Status::InvalidArgument("control_address is not a string");
    d.control_address = std::string(c->get_string());
  }
  DYN_ASSIGN_OR_RETURN(d.num_tokens, GetInt(o, "num_tokens"));
  const json::value* ids = o.if_contains("block_ids");
  if (ids == nullptr || !ids->is_array()) return Status::InvalidArgument("missing array field block_ids");
  d.block_ids.reserve(ids->get_array().size());
  for (const json::value& id : ids->get_array()) {
    if (!id.is_int64() || id.get_int64() < 0 || id.get_int64() > std::numeric_limits<int32_t>::max()) {
      return Status::InvalidArgument("block_ids holds a value that is not a block id");
    }
    d.block_ids.push_back(static_cast<int32_t>(id.get_int64()));
  }
  const json::value* layout = o.if_contains("layout");
  if (layout == nullptr) return Status::InvalidArgument("missing field layout");
  DYN_ASSIGN_OR_RETURN(d.layout, LayoutFromObject(*layout));
  return d;
}

namespace transfer_internal {

std::string EncodeLayout(const KvLayoutDesc& layout) { return json::serialize(LayoutObject(layout)); }

Result<KvLayoutDesc> DecodeLayout(std::string_view text) {
  DYN_ASSIGN_OR_RETURN(json::value v, ParseJson(text, "kv layout"));
  return LayoutFromObject(v);
}

std::vector<BlockRun> CoalesceRuns(std::span<const int32_t> ids) {
  std::vector<BlockRun> runs;
  for (int32_t id : ids) {
    if (!runs.empty() && runs.back().first + runs.back().count == id) {
      ++runs.back().count;
    } else {
      runs.push_back({id, 1});
    }
  }
  return runs;
}

std::vector<PairRun> CoalescePairs(std::span<const int32_t> src, std::span<const int32_t> dst) {
  std::vector<PairRun> runs;
  const size_t n = std::min(src.size(), dst.size());
  for (size_t i = 0; i < n; ++i) {
    if (!runs.empty() && runs.back().src + runs.back().count == src[i] && runs.back().dst + runs.back().count == dst[i]) {
      ++runs.back().count;
    } else {
      runs.push_back({src[i], dst[i], 1});
    }
  }
  return runs;
}

void ParallelCopy(std::span<const CopySpan> spans, int threads) {
  size_t total = 0;
  for (const CopySpan& s : spans) total += s.bytes;
  threads = std::max(1, threads);
  if (threads == 1 || total == 0) {
    for (const CopySpan& s : spans) std::memcpy(s.dst, s.src, s.bytes);
    return;
  }
  // Thread t copies bytes [t * share, (t + 1) * share) of the spans laid end to end.
  const size_t share = (total + threads - 1) / threads;
  auto copy_range = [&](size_t begin, size_t end) {
    size_t at = 0;
    for (const CopySpan& s : spans) {
      const size_t lo = std::max(begin, at), hi = std::min(end, at + s.bytes);
      if (lo < hi) std::memcpy(s.dst + (lo - at), s.src + (lo - at), hi - lo);
      at += s.bytes;
      if (at >= end) break;
    }
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) {
    pool.emplace_back(copy_range, std::min(total, t * share), std::min(total, (t + 1) * share));
  }
  copy_range(0, std::min(total, share));
  for (std::thread& th : pool) th.join();
}

int CopyThreadsFor(size_t bytes) {
  const int hw = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  return static_cast<int>(std::clamp<size_t>(bytes / (size_t{32} << 20), 1, static_cast<size_t>(std::min(8, hw))));
}

Status CheckIds(std::span<const int32_t> ids, int num_blocks, std::string_view what) {
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= num_blocks) {
      return Status::InvalidArgument(std::string(what) + " block id " + std::to_string(ids[i]) + " (index " +
                                     std::to_string(i) + ") is out of range [0, " + std::to_string(num_blocks) + ")");
    }
  }
  return Status::Ok();
}

std::vector<iovec> RunsToIovecs(const std::vector<BlockRun>& runs, const KvRegion& region) {
  std::vector<iovec> iov;
  iov.reserve(runs.size());
  auto* base = static_cast<char*>(region.base);
  for (const BlockRun& r : runs) {
    iov.push_back({base + static_cast<size_t>(r.first) * region.block_bytes,
                   static_cast<size_t>(r.count) * region.block_bytes});
  }
  return iov;
}

}  // namespace transfer_internal
}  // namespace dyn
