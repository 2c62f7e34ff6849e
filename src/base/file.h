// Files: read whole, or map read-only. Model weights are mapped, never copied, so a model's
// resident memory is what the kernels touch.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "base/status.h"

namespace dyn {

Result<std::string> ReadFile(const std::string& path);
bool FileExists(const std::string& path);
bool IsDirectory(const std::string& path);

// A read-only memory map of a whole file. Movable, not copyable; unmaps on destruction.
class MappedFile {
 public:
  static Result<std::unique_ptr<MappedFile>> Open(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  MappedFile(std::string path, const uint8_t* data, size_t size) : path_(std::move(path)), data_(data), size_(size) {}
  std::string path_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace dyn
