// GGUF file reader: metadata (key/values) and tensor directory over a memory map.
//
// Used by the tokenizer (tokenizer.ggml.* keys, chat template) and the native model loader (tensors).
// The file stays mapped for the reader's lifetime; tensor data pointers point into the map.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "base/file.h"
#include "base/status.h"

namespace dyn {

// ggml tensor element types (values as in the GGUF spec).
enum class GgmlType : uint32_t {
  kF32 = 0, kF16 = 1, kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8, kQ8_1 = 9,
  kQ2_K = 10, kQ3_K = 11, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14, kQ8_K = 15, kBF16 = 30,
};
const char* GgmlTypeName(GgmlType t);           // "Q4_1", or "type<N>" when unknown
// Elements per quantization block and bytes per block; 0 when the type is unknown to dyn.
uint32_t GgmlBlockElems(GgmlType t);
uint32_t GgmlBlockBytes(GgmlType t);

enum class GgufValueType : uint32_t {
  kU8 = 0, kI8 = 1, kU16 = 2, kI16 = 3, kU32 = 4, kI32 = 5, kF32 = 6, kBool = 7,
  kString = 8, kArray = 9, kU64 = 10, kI64 = 11, kF64 = 12,
};

struct GgufValue {
  GgufValueType type = GgufValueType::kU8;
  // Scalars: integers in `i` (u64 values above INT64_MAX wrap), floats in `f`, bools in `i`.
  int64_t i = 0;
  double f = 0;
  std::string str;
  // Arrays: element type plus the one vector that matches it.
  GgufValueType array_type = GgufValueType::kU8;
  std::vector<int64_t> ints;         // integer and bool arrays
  std::vector<double> floats;        // float arrays
  std::vector<std::string> strings;  // string arrays
};

struct GgufTensor {
  std::string name;
  std::vector<uint64_t> dims;  // GGUF order: dims[0] is the fastest-varying (row length)
  GgmlType type = GgmlType::kF32;
  const uint8_t* data = nullptr;
  uint64_t nbytes = 0;
  uint64_t elements() const;
};

class GgufFile {
 public:
  // Maps and parses the file; fails with a clear message on a bad magic, version or truncation.
  static Result<std::unique_ptr<GgufFile>> Open(const std::string& path);

  const std::string& path() const { return map_->path(); }
  uint32_t version() const { return version_; }
  size_t file_size() const { return map_->size(); }

  const GgufValue* Find(std::string_view key) const;
  std::optional<std::string> GetString(std::string_view key) const;
  std::optional<int64_t> GetInt(std::string_view key) const;      // any integer or bool type
  std::optional<double> GetFloat(std::string_view key) const;     // float or integer types
  const std::vector<std::string>* GetStringArray(std::string_view key) const;
  const std::vector<int64_t>* GetIntArray(std::string_view key) const;
  const std::vector<double>* GetFloatArray(std::string_view key) const;
  const std::vector<std::string>& keys() const { return keys_; }  // in file order

  const std::vector<GgufTensor>& tensors() const { return tensors_; }
  const GgufTensor* FindTensor(std::string_view name) const;

 private:
  GgufFile() = default;
  std::unique_ptr<MappedFile> map_;
  uint32_t version_ = 0;
  std::vector<std::string> keys_;
  std::unordered_map<std::string, GgufValue> kv_;
  std::vector<GgufTensor> tensors_;
  std::unordered_map<std::string, size_t> tensor_index_;
};

}  // namespace dyn
