#include "llm/gguf.h"

#include <cstring>

namespace dyn {

const char* GgmlTypeName(GgmlType t) {
  switch (t) {
    case GgmlType::kF32: return "F32";
    case GgmlType::kF16: return "F16";
    case GgmlType::kQ4_0: return "Q4_0";
    case GgmlType::kQ4_1: return "Q4_1";
    case GgmlType::kQ5_0: return "Q5_0";
    case GgmlType::kQ5_1: return "Q5_1";
    case GgmlType::kQ8_0: return "Q8_0";
    case GgmlType::kQ8_1: return "Q8_1";
    case GgmlType::kQ2_K: return "Q2_K";
    case GgmlType::kQ3_K: return "Q3_K";
    case GgmlType::kQ4_K: return "Q4_K";
    case GgmlType::kQ5_K: return "Q5_K";
    case GgmlType::kQ6_K: return "Q6_K";
    case GgmlType::kQ8_K: return "Q8_K";
    case GgmlType::kBF16: return "BF16";
  }
  static thread_local char buf[24];
  std::snprintf(buf, sizeof(buf), "type%u", static_cast<unsigned>(t));
  return buf;
}

uint32_t GgmlBlockElems(GgmlType t) {
  switch (t) {
    case GgmlType::kF32: case GgmlType::kF16: case GgmlType::kBF16: return 1;
    case GgmlType::kQ4_0: case GgmlType::kQ4_1: case GgmlType::kQ5_0: case GgmlType::kQ5_1:
    case GgmlType::kQ8_0: case GgmlType::kQ8_1: return 32;
    case GgmlType::kQ2_K: case GgmlType::kQ3_K: case GgmlType::kQ4_K: case GgmlType::kQ5_K:
    case GgmlType::kQ6_K: case GgmlType::kQ8_K: return 256;
  }
  return 0;
}

uint32_t GgmlBlockBytes(GgmlType t) {
  switch (t) {
    case GgmlType::kF32: return 4;
    case GgmlType::kF16: case GgmlType::kBF16: return 2;
    case GgmlType::kQ4_0: return 18;
    case GgmlType::kQ4_1: return 20;
    case GgmlType::kQ5_0: return 22;
    case GgmlType::kQ5_1: return 24;
    case GgmlType::kQ8_0: return 34;
    case GgmlType::kQ8_1: return 36;
    case GgmlType::kQ2_K: return 84;
    case GgmlType::kQ3_K: return 110;
    case GgmlType::kQ4_K: return 144;
    case GgmlType::kQ5_K: return 176;
    case GgmlType::kQ6_K: return 210;
    case GgmlType::kQ8_K: return 292;
  }
  return 0;
}

uint64_t GgufTensor::elements() const {
  uint64_t n = 1;
  for (uint64_t d : dims) n *= d;
  return n;
}

namespace {

// Bounds-checked little-endian cursor over the mapped bytes.
class Cursor {
 public:
  Cursor(const uint8_t* p, size_t n) : p_(p), n_(n) {}
  size_t pos() const { return pos_; }
  bool Read(void* out, size_t k) {
    if (k > n_ - pos_) return false;
    std::memcpy(out, p_ + pos_, k);
    pos_ += k;
    return true;
  }
  template <class T>
  bool Get(T* v) { return Read(v, sizeof(T)); }
  bool GetString(std::string* s) {
    uint64_t len;
    if (!Get(&len) || len > n_ - pos_) return false;
    s->assign(reinterpret_cast<const char*>(p_ + pos_), len);
    pos_ += len;
    return true;
  }

 private:
  const uint8_t* p_;
  size_t n_;
  size_t pos_ = 0;
};

bool ReadScalar(Cursor& c, GgufValueType t, int64_t* i, double* f, std::string* s) {
  switch (t) {
    case GgufValueType::kU8: { uint8_t v; if (!c.Get(&v)) return false; *i = v; *f = v; return true; }
    case GgufValueType::kI8: { int8_t v; if (!c.Get(&v)) return false; *i = v; *f = v; return true; }
    case GgufValueType::kU16: { uint16_t v; if (!c.Get(&v)) return false; *i = v; *f = v; return true; }
    case GgufValueType::kI16: { int16_t v; if (!c.Get(&v)) return false; *i = v; *f = v; return true; }
    case GgufValueType::kU32: { uint32_t v; if (!c.Get(&v)) return false; *i = v; *f = v; return true; }
    case GgufValueType::kI32: { int32_t v; if (!c.Get(&v)) return false; *i = v; *f = v; return true; }
    case GgufValueType::kU64: { uint64_t v; if (!c.Get(&v)) return false; *i = static_cast<int64_t>(v); *f = static_cast<double>(v); return true; }
    case GgufValueType::kI64: { int64_t v; if (!c.Get(&v)) return false; *i = v; *f = static_cast<double>(v); return true; }
    case GgufValueType::kF32: { float v; if (!c.Get(&v)) return false; *f = v; *i = static_cast<int64_t>(v); return true; }
    case GgufValueType::kF64: { double v; if (!c.Get(&v)) return false; *f = v; *i = static_cast<int64_t>(v); return true; }
    case GgufValueType::kBool: { uint8_t v; if (!c.Get(&v)) return false; *i = v ? 1 : 0; *f = *i; return true; }
    case GgufValueType::kString: return c.GetString(s);
    case GgufValueType::kArray: return false;
  }
  return false;
}

bool IsFloat(GgufValueType t) { return t == GgufValueType::kF32 || t == GgufValueType::kF64; }

}  // namespace

Result<std::unique_ptr<GgufFile>> GgufFile::Open(const std::string& path) {
  DYN_ASSIGN_OR_RETURN(auto map, MappedFile::Open(path));
  std::unique_ptr<GgufFile> g(new GgufFile());
  Cursor c(map->data(), map->size());
  auto bad = [&](const std::string& what) {
    return Status::InvalidArgument(path + ": not a valid GGUF file (" + what + " at byte " + std::to_string(c.pos()) + ")");
  };
  char magic[4];
  if (!c.Read(magic, 4) || std::memcmp(magic, "GGUF", 4) != 0) return bad("bad magic");
  if (!c.Get(&g->version_)) return bad("truncated header");
  if (g->version_ < 2 || g->version_ > 3)
    return Status::Unsupported(path + ": GGUF version " + std::to_string(g->version_) + " is not supported (2 and 3 are)");
  uint64_t n_tensors, n_kv;
  if (!c.Get(&n_tensors) || !c.Get(&n_kv)) return bad("truncated header");
  if (n_tensors > (1u << 24) || n_kv > (1u << 24)) return bad("implausible counts");

  for (uint64_t k = 0; k < n_kv; ++k) {
    std::string key;
    uint32_t type;
    if (!c.GetString(&key) || !c.Get(&type)) return bad("truncated key/value");
    GgufValue v;
    v.type = static_cast<GgufValueType>(type);
    if (v.type == GgufValueType::kArray) {
      uint32_t et;
      uint64_t count;
      if (!c.Get(&et) || !c.Get(&count)) return bad("truncated array");
      v.array_type = static_cast<GgufValueType>(et);
      if (v.array_type == GgufValueType::kArray) return bad("nested arrays in " + key);
      if (count > map->size()) return bad("implausible array length in " + key);
      if (v.array_type == GgufValueType::kString) v.strings.resize(count);
      else if (IsFloat(v.array_type)) v.floats.resize(count);
      else v.ints.resize(count);
      for (uint64_t j = 0; j < count; ++j) {
        int64_t i = 0;
        double f = 0;
        std::string* s = v.array_type == GgufValueType::kString ? &v.strings[j] : nullptr;
        if (!ReadScalar(c, v.array_type, &i, &f, s)) return bad("bad array element in " + key);
        if (IsFloat(v.array_type)) v.floats[j] = f;
        else if (!s) v.ints[j] = i;
      }
    } else {
      if (type > 12) return bad("unknown value type " + std::to_string(type) + " for " + key);
      if (!ReadScalar(c, v.type, &v.i, &v.f, &v.str)) return bad("bad value for " + key);
    }
    g->keys_.push_back(key);
    g->kv_[key] = std::move(v);
  }

  struct Info { uint64_t offset; };
  std::vector<Info> infos;
  for (uint64_t t = 0; t < n_tensors; ++t) {
    GgufTensor ti;
    uint32_t n_dims, type;
    uint64_t offset;
    if (!c.GetString(&ti.name) || !c.Get(&n_dims) || n_dims > 8) return bad("bad tensor info");
    ti.dims.resize(n_dims);
    for (auto& d : ti.dims)
      if (!c.Get(&d)) return bad("bad tensor dims");
    if (!c.Get(&type) || !c.Get(&offset)) return bad("bad tensor info");
    ti.type = static_cast<GgmlType>(type);
    infos.push_back({offset});
    g->tensors_.push_back(std::move(ti));
  }
  uint64_t alignment = 32;
  if (auto a = g->GetInt("general.alignment")) alignment = static_cast<uint64_t>(*a);
  if (alignment == 0 || (alignment & (alignment - 1))) return bad("bad general.alignment");
  uint64_t data_start = (c.pos() + alignment - 1) / alignment * alignment;
  for (size_t t = 0; t < g->tensors_.size(); ++t) {
    GgufTensor& ti = g->tensors_[t];
    uint32_t be = GgmlBlockElems(ti.type), bb = GgmlBlockBytes(ti.type);
    uint64_t elems = ti.elements();
    if (be != 0) {
      if (ti.dims.empty() || ti.dims[0] % be) return bad("tensor " + ti.name + " row not a multiple of its block");
      ti.nbytes = elems / be * bb;
      uint64_t begin = data_start + infos[t].offset;
      if (begin > map->size() || ti.nbytes > map->size() - begin) return bad("tensor " + ti.name + " past end of file");
      ti.data = map->data() + begin;
    }  // unknown types keep data == nullptr; the model loader names them in its error
    g->tensor_index_[ti.name] = t;
  }
  g->map_ = std::move(map);
  return g;
}

const GgufValue* GgufFile::Find(std::string_view key) const {
  auto it = kv_.find(std::string(key));
  return it == kv_.end() ? nullptr : &it->second;
}

std::optional<std::string> GgufFile::GetString(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (!v || v->type != GgufValueType::kString) return std::nullopt;
  return v->str;
}

std::optional<int64_t> GgufFile::GetInt(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (!v || v->type == GgufValueType::kString || v->type == GgufValueType::kArray || IsFloat(v->type)) return std::nullopt;
  return v->i;
}

std::optional<double> GgufFile::GetFloat(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (!v || v->type == GgufValueType::kString || v->type == GgufValueType::kArray) return std::nullopt;
  return IsFloat(v->type) ? v->f : static_cast<double>(v->i);
}

const std::vector<std::string>* GgufFile::GetStringArray(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (!v || v->type != GgufValueType::kArray || v->array_type != GgufValueType::kString) return nullptr;
  return &v->strings;
}

const std::vector<int64_t>* GgufFile::GetIntArray(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (!v || v->type != GgufValueType::kArray || v->array_type == GgufValueType::kString || IsFloat(v->array_type))
    return nullptr;
  return &v->ints;
}

const std::vector<double>* GgufFile::GetFloatArray(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (!v || v->type != GgufValueType::kArray || !IsFloat(v->array_type)) return nullptr;
  return &v->floats;
}

const GgufTensor* GgufFile::FindTensor(std::string_view name) const {
  auto it = tensor_index_.find(std::string(name));
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

}  // namespace dyn
