#include "router/vllm_kv_events.h"

#include <cctype>
#include <cstring>
#include <memory>
#include <string_view>
#include <variant>

#include "kv/block_hash.h"

namespace dyn::router {
namespace {

// A decoded msgpack value: just what the event format needs (maps and extensions are skipped).
struct Value {
  enum class Kind { kNil, kBool, kInt, kUint, kFloat, kStr, kBin, kArray, kOther } kind = Kind::kNil;
  bool b = false;
  int64_t i = 0;
  uint64_t u = 0;
  double f = 0;
  std::string_view bytes;  // str / bin, into the payload
  std::vector<Value> items;

  bool is_nil() const { return kind == Kind::kNil; }
  bool is_int() const { return kind == Kind::kInt || kind == Kind::kUint; }
};

class Reader {
 public:
  explicit Reader(std::span<const uint8_t> data) : data_(data) {}

  Status Read(Value* v, int depth = 0) {
    if (depth > 32) return Status::InvalidArgument("msgpack: nested too deep");
    uint8_t t = 0;
    DYN_RETURN_IF_ERROR(Byte(&t));
    if (t <= 0x7f) return SetUint(v, t);
    if (t >= 0xe0) return SetInt(v, static_cast<int8_t>(t));
    if ((t & 0xf0) == 0x90) return Array(v, t & 0x0f, depth);
    if ((t & 0xf0) == 0x80) return SkipMap(v, t & 0x0f, depth);
    if ((t & 0xe0) == 0xa0) return Bytes(v, Value::Kind::kStr, t & 0x1f);
    uint64_t n = 0;
    switch (t) {
      case 0xc0: v->kind = Value::Kind::kNil; return Status::Ok();
      case 0xc2: case 0xc3: v->kind = Value::Kind::kBool; v->b = t == 0xc3; return Status::Ok();
      case 0xcc: DYN_RETURN_IF_ERROR(BigEndian(1, &n)); return SetUint(v, n);
      case 0xcd: DYN_RETURN_IF_ERROR(BigEndian(2, &n)); return SetUint(v, n);
      case 0xce: DYN_RETURN_IF_ERROR(BigEndian(4, &n)); return SetUint(v, n);
      case 0xcf: DYN_RETURN_IF_ERROR(BigEndian(8, &n)); return SetUint(v, n);
      case 0xd0: DYN_RETURN_IF_ERROR(BigEndian(1, &n)); return SetInt(v, static_cast<int8_t>(n));
      case 0xd1: DYN_RETURN_IF_ERROR(BigEndian(2, &n)); return SetInt(v, static_cast<int16_t>(n));
      case 0xd2: DYN_RETURN_IF_ERROR(BigEndian(4, &n)); return SetInt(v, static_cast<int32_t>(n));
      case 0xd3: DYN_RETURN_IF_ERROR(BigEndian(8, &n)); return SetInt(v, static_cast<int64_t>(n));
      case 0xca: {
        DYN_RETURN_IF_ERROR(BigEndian(4, &n));
        float f;
        const uint32_t bits = static_cast<uint32_t>(n);
        std::memcpy(&f, &bits, 4);
        v->kind = Value::Kind::kFloat;
        v->f = f;
        return Status::Ok();
      }
      case 0xcb: {
        DYN_RETURN_IF_ERROR(BigEndian(8, &n));
        v->kind = Value::Kind::kFloat;
        std::memcpy(&v->f, &n, 8);
        return Status::Ok();
      }
      case 0xd9: DYN_RETURN_IF_ERROR(BigEndian(1, &n)); return Bytes(v, Value::Kind::kStr, n);
      case 0xda: DYN_RETURN_IF_ERROR(BigEndian(2, &n)); return Bytes(v, Value::Kind::kStr, n);
      case 0xdb: DYN_RETURN_IF_ERROR(BigEndian(4, &n)); return Bytes(v, Value::Kind::kStr, n);
      case 0xc4: DYN_RETURN_IF_ERROR(BigEndian(1, &n)); return Bytes(v, Value::Kind::kBin, n);
      case 0xc5: DYN_RETURN_IF_ERROR(BigEndian(2, &n)); return Bytes(v, Value::Kind::kBin, n);
      case 0xc6: DYN_RETURN_IF_ERROR(BigEndian(4, &n)); return Bytes(v, Value::Kind::kBin, n);
      case 0xdc: DYN_RETURN_IF_ERROR(BigEndian(2, &n)); return Array(v, n, depth);
      case 0xdd: DYN_RETURN_IF_ERROR(BigEndian(4, &n)); return Array(v, n, depth);
      case 0xde: DYN_RETURN_IF_ERROR(BigEndian(2, &n)); return SkipMap(v, n, depth);
      case 0xdf: DYN_RETURN_IF_ERROR(BigEndian(4, &n)); return SkipMap(v, n, depth);
      // Extensions (fixext 1..16, ext 8/16/32): skipped as opaque.
      case 0xd4: return SkipExt(v, 1);
      case 0xd5: return SkipExt(v, 2);
      case 0xd6: return SkipExt(v, 4);
      case 0xd7: return SkipExt(v, 8);
      case 0xd8: return SkipExt(v, 16);
      case 0xc7: DYN_RETURN_IF_ERROR(BigEndian(1, &n)); return SkipExt(v, n);
      case 0xc8: DYN_RETURN_IF_ERROR(BigEndian(2, &n)); return SkipExt(v, n);
      case 0xc9: DYN_RETURN_IF_ERROR(BigEndian(4, &n)); return SkipExt(v, n);
      default: return Status::InvalidArgument("msgpack: bad type byte " + std::to_string(t));
    }
  }

  bool done() const { return pos_ == data_.size(); }

 private:
  Status Byte(uint8_t* b) {
    if (pos_ >= data_.size()) return Status::InvalidArgument("msgpack: truncated");
    *b = data_[pos_++];
    return Status::Ok();
  }
  Status BigEndian(size_t n, uint64_t* out) {
    if (data_.size() - pos_ < n) return Status::InvalidArgument("msgpack: truncated");
    uint64_t x = 0;
    for (size_t k = 0; k < n; ++k) x = (x << 8) | data_[pos_++];
    *out = x;
    return Status::Ok();
  }
  static Status SetUint(Value* v, uint64_t u) {
    v->kind = Value::Kind::kUint;
    v->u = u;
    v->i = static_cast<int64_t>(u);
    return Status::Ok();
  }
  static Status SetInt(Value* v, int64_t i) {
    v->kind = Value::Kind::kInt;
    v->i = i;
    v->u = static_cast<uint64_t>(i);
    return Status::Ok();
  }
  Status Bytes(Value* v, Value::Kind kind, uint64_t n) {
    if (data_.size() - pos_ < n) return Status::InvalidArgument("msgpack: truncated");
    v->kind = kind;
    v->bytes = std::string_view(reinterpret_cast<const char*>(data_.data() + pos_), n);
    pos_ += n;
    return Status::Ok();
  }
  Status Array(Value* v, uint64_t n, int depth) {
    // Each element takes at least one byte: a count beyond the rest of the payload is corrupt.
    if (n > data_.size() - pos_) return Status::InvalidArgument("msgpack: truncated");
    v->kind = Value::Kind::kArray;
    v->items.resize(n);
    for (auto& item : v->items) DYN_RETURN_IF_ERROR(Read(&item, depth + 1));
    return Status::Ok();
  }
  Status SkipMap(Value* v, uint64_t n, int depth) {
    if (n > data_.size() - pos_) return Status::InvalidArgument("msgpack: truncated");
    for (uint64_t k = 0; k < 2 * n; ++k) {
      Value skipped;
      DYN_RETURN_IF_ERROR(Read(&skipped, depth + 1));
    }
    v->kind = Value::Kind::kOther;
    return Status::Ok();
  }
  Status SkipExt(Value* v, uint64_t n) {
    if (data_.size() - pos_ < n + 1) return Status::InvalidArgument("msgpack: truncated");
    pos_ += n + 1;  // the type byte, then the data
    v->kind = Value::Kind::kOther;
    return Status::Ok();
  }

  std::span<const uint8_t> data_;
  size_t pos_ = 0;
};

Status ToHash(const Value& v, uint64_t* out) {
  if (v.is_int()) {
    *out = v.u;  // signed values keep their two's-complement bits
    return Status::Ok();
  }
  if (v.kind == Value::Kind::kBin || v.kind == Value::Kind::kStr) {
    if (v.bytes.empty()) return Status::InvalidArgument("kv event: empty hash bytes");
    uint64_t x = 0;
    const size_t from = v.bytes.size() > 8 ? v.bytes.size() - 8 : 0;
    for (size_t k = from; k < v.bytes.size(); ++k) x = (x << 8) | static_cast<uint8_t>(v.bytes[k]);
    *out = x;
    return Status::Ok();
  }
  return Status::InvalidArgument("kv event: a block hash is neither an integer nor bytes");
}

StorageTier TierOf(const Value* medium) {
  if (medium == nullptr || medium->kind != Value::Kind::kStr) return StorageTier::kDevice;
  std::string m(medium->bytes);
  for (char& c : m) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (m == "gpu" || m == "cuda" || m == "device") return StorageTier::kDevice;
  if (m.rfind("cpu", 0) == 0 || m == "host") return StorageTier::kHost;
  if (m == "disk" || m == "ssd") return StorageTier::kDisk;
  return StorageTier::kExternal;
}

const Value* Field(const Value& ev, size_t i) { return i < ev.items.size() ? &ev.items[i] : nullptr; }

Status DecodeStored(const Value& ev, RouterEvent* out) {
  const Value* hashes = Field(ev, 1);
  const Value* parent = Field(ev, 2);
  const Value* tokens = Field(ev, 3);
  const Value* block_size = Field(ev, 4);
  if (!hashes || hashes->kind != Value::Kind::kArray || !tokens || tokens->kind != Value::Kind::kArray ||
      !block_size || !block_size->is_int() || block_size->i <= 0)
    return Status::InvalidArgument("kv event: BlockStored needs block_hashes, token_ids and block_size");
  const size_t bs = static_cast<size_t>(block_size->i);
  if (tokens->items.size() != hashes->items.size() * bs)
    return Status::InvalidArgument("kv event: BlockStored has " + std::to_string(tokens->items.size()) +
                                   " tokens for " + std::to_string(hashes->items.size()) + " blocks of " +
                                   std::to_string(bs));
  StoredData d;
  if (parent && !parent->is_nil()) {
    uint64_t p = 0;
    DYN_RETURN_IF_ERROR(ToHash(*parent, &p));
    d.parent_hash = p;
  }
  for (size_t b = 0; b < hashes->items.size(); ++b) {
    StoredBlock block;
    DYN_RETURN_IF_ERROR(ToHash(hashes->items[b], &block.block_hash));
    block.token_ids.reserve(bs);
    for (size_t k = 0; k < bs; ++k) {
      const Value& t = tokens->items[b * bs + k];
      if (!t.is_int() || t.i < 0 || t.u > UINT32_MAX) return Status::InvalidArgument("kv event: bad token id");
      block.token_ids.push_back(static_cast<uint32_t>(t.u));
    }
    d.blocks.push_back(std::move(block));
  }
  const Value* lora_name = Field(ev, 7);
  const uint64_t seed = lora_name && lora_name->kind == Value::Kind::kStr && !lora_name->bytes.empty()
                            ? BlockHashSeedForLora(lora_name->bytes)
                            : kBlockHashSeed;
  FillTokensHashes(d, seed);
  out->tier = TierOf(Field(ev, 6));
  out->data = std::move(d);
  return Status::Ok();
}

Status DecodeRemoved(const Value& ev, RouterEvent* out) {
  const Value* hashes = Field(ev, 1);
  if (!hashes || hashes->kind != Value::Kind::kArray)
    return Status::InvalidArgument("kv event: BlockRemoved needs block_hashes");
  RemovedData d;
  for (const Value& h : hashes->items) {
    uint64_t x = 0;
    DYN_RETURN_IF_ERROR(ToHash(h, &x));
    d.block_hashes.push_back(x);
  }
  out->tier = TierOf(Field(ev, 2));
  out->data = std::move(d);
  return Status::Ok();
}

}  // namespace

Result<ExternalEventBatch> DecodeVllmKvEvents(std::span<const uint8_t> payload, uint64_t worker_id) {
  Reader reader(payload);
  Value root;
  DYN_RETURN_IF_ERROR(reader.Read(&root));
  if (!reader.done()) return Status::InvalidArgument("kv events: trailing bytes after the payload");
  if (root.kind != Value::Kind::kArray || root.items.size() < 2 || root.items[1].kind != Value::Kind::kArray)
    return Status::InvalidArgument("kv events: payload is not [timestamp, events, dp_rank]");
  ExternalEventBatch batch;
  const Value& ts = root.items[0];
  batch.timestamp = ts.kind == Value::Kind::kFloat ? ts.f : ts.is_int() ? static_cast<double>(ts.i) : 0.0;
  if (root.items.size() > 2 && root.items[2].is_int() && root.items[2].i >= 0)
    batch.dp_rank = static_cast<uint32_t>(root.items[2].i);
  const WorkerKey worker{worker_id, batch.dp_rank.value_or(0)};
  for (const Value& ev : root.items[1].items) {
    if (ev.kind != Value::Kind::kArray || ev.items.empty() || ev.items[0].kind != Value::Kind::kStr)
      return Status::InvalidArgument("kv events: an event is not a tagged array");
    const std::string_view tag = ev.items[0].bytes;
    RouterEvent e;
    e.worker = worker;
    if (tag == "BlockStored") {
      DYN_RETURN_IF_ERROR(DecodeStored(ev, &e));
    } else if (tag == "BlockRemoved") {
      DYN_RETURN_IF_ERROR(DecodeRemoved(ev, &e));
    } else if (tag == "AllBlocksCleared") {
      e.data = ClearedData{};
    } else {
      ++batch.skipped;
      continue;
    }
    batch.events.push_back(std::move(e));
  }
  return batch;
}

Result<uint64_t> DecodeVllmSequence(std::span<const uint8_t> frame) {
  if (frame.size() != 8) return Status::InvalidArgument("kv events: sequence frame is not 8 bytes");
  uint64_t x = 0;
  for (uint8_t b : frame) x = (x << 8) | b;
  return x;
}

}  // namespace dyn::router
