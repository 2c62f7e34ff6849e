// Wire helpers shared by the request plane's server, client and engine codec: little-endian byte
// writing/reading with bounds checks, and the frame format of docs/request_plane.md.
//
// A frame is: u32 length (of everything after these 4 bytes), u8 type, u64 call id, payload.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <utility>

#include "base/status.h"

namespace dyn {

// Appends little-endian values to a string.
class ByteWriter {
 public:
  explicit ByteWriter(std::string& out) : out_(out) {}
  void U8(uint8_t v) { out_.push_back(static_cast<char>(v)); }
  void U16(uint16_t v) { Le(v, 2); }
  void U32(uint32_t v) { Le(v, 4); }
  void U64(uint64_t v) { Le(v, 8); }
  void I32(int32_t v) { U32(static_cast<uint32_t>(v)); }
  void F32(float v) {
    uint32_t bits;
    std::memcpy(&bits, &v, 4);
    U32(bits);
  }
  void Bytes(std::string_view s) { out_.append(s.data(), s.size()); }
  // u32 length, then the bytes.
  void Str(std::string_view s) {
    U32(static_cast<uint32_t>(s.size()));
    Bytes(s);
  }

 private:
  void Le(uint64_t v, int n) {
    char b[8];
    for (int i = 0; i < n; ++i) b[i] = static_cast<char>((v >> (8 * i)) & 0xff);
    out_.append(b, n);
  }
  std::string& out_;
};

// Reads little-endian values from a byte view. Every read checks the remaining length first, so a
// truncated or lying input yields InvalidArgument and never reads out of bounds.
class ByteReader {
 public:
  explicit ByteReader(std::string_view in) : in_(in) {}
  size_t remaining() const { return in_.size() - pos_; }
  bool done() const { return pos_ == in_.size(); }

  Status U8(uint8_t& v) {
    uint64_t x;
    DYN_RETURN_IF_ERROR(Le(x, 1));
    v = static_cast<uint8_t>(x);
    return Status::Ok();
  }
  Status U16(uint16_t& v) {
    uint64_t x;
    DYN_RETURN_IF_ERROR(Le(x, 2));
    v = static_cast<uint16_t>(x);
    return Status::Ok();
  }
  Status U32(uint32_t& v) {
    uint64_t x;
    DYN_RETURN_IF_ERROR(Le(x, 4));
    v = static_cast<uint32_t>(x);
    return Status::Ok();
  }
  Status U64(uint64_t& v) { return Le(v, 8); }
  Status I32(int32_t& v) {
    uint32_t x;
    DYN_RETURN_IF_ERROR(U32(x));
    v = static_cast<int32_t>(x);
    return Status::Ok();
  }
  Status F32(float& v) {
    uint32_t bits;
    DYN_RETURN_IF_ERROR(U32(bits));
    std::memcpy(&v, &bits, 4);
    return Status::Ok();
  }
  Status Bool(bool& v) {
    uint8_t x;
    DYN_RETURN_IF_ERROR(U8(x));
    if (x > 1) return Status::InvalidArgument("bad boolean byte");
    v = x == 1;
    return Status::Ok();
  }
  Status Bytes(size_t n, std::string_view& v) {
    if (n > remaining()) return Truncated();
    v = in_.substr(pos_, n);
    pos_ += n;
    return Status::Ok();
  }
  // u32 length, then the bytes.
  Status Str(std::string& v) {
    uint32_t n;
    DYN_RETURN_IF_ERROR(U32(n));
    std::string_view s;
    DYN_RETURN_IF_ERROR(Bytes(n, s));
    v.assign(s);
    return Status::Ok();
  }
  // A u32 element count, checked against the bytes left given each element's minimum encoded
  // size, so a lying count cannot make the decoder allocate more than the input could hold.
  Status Count(size_t min_element_bytes, uint32_t& n) {
    DYN_RETURN_IF_ERROR(U32(n));
    if (min_element_bytes > 0 && n > remaining() / min_element_bytes) return Truncated();
    return Status::Ok();
  }

 private:
  static Status Truncated() { return Status::InvalidArgument("truncated input"); }
  Status Le(uint64_t& v, size_t n) {
    if (n > remaining()) return Truncated();
    v = 0;
    for (size_t i = 0; i < n; ++i) v |= static_cast<uint64_t>(static_cast<uint8_t>(in_[pos_ + i])) << (8 * i);
    pos_ += n;
    return Status::Ok();
  }
  std::string_view in_;
  size_t pos_ = 0;
};

enum class FrameType : uint8_t {
  kCall = 1,    // client -> server; payload: u16 endpoint length, endpoint, request bytes
  kData = 2,    // server -> client; payload: one response
  kEnd = 3,     // server -> client; payload: u8 status code, message
  kCancel = 4,  // client -> server; empty payload
  kPing = 5,    // either way, call id 0; answered with kPong
  kPong = 6,
};

// u32 length + u8 type + u64 call id.
inline constexpr size_t kFrameHeaderBytes = 13;
// The length field counts the type and call id too, so it is never below this.
inline constexpr size_t kFrameMinLength = 9;

struct Frame {
  FrameType type = FrameType::kPing;
  uint64_t call_id = 0;
  std::string_view payload;  // valid until the parser is fed or consumed again
};

// Appends one frame to `out` (frames are gathered into one buffer per write).
void AppendFrame(std::string& out, FrameType type, uint64_t call_id, std::string_view payload);
// Appends a CALL frame without building its payload separately.
void AppendCallFrame(std::string& out, uint64_t call_id, std::string_view endpoint, std::string_view request);
// Appends an END frame carrying `status`.
void AppendEndFrame(std::string& out, uint64_t call_id, const Status& status);

// Splits a CALL payload into endpoint and request bytes.
Status ParseCallPayload(std::string_view payload, std::string_view& endpoint, std::string_view& request);
// The Status an END payload carries; a malformed payload gives Internal.
Status ParseEndPayload(std::string_view payload);

// Incremental frame parser over a byte stream: feed bytes as they arrive, then take frames.
class FrameParser {
 public:
  explicit FrameParser(size_t max_frame_bytes) : max_frame_bytes_(max_frame_bytes) {}
  // Space to read into; call Commit(n) after n bytes were written there.
  char* WritableBuffer(size_t min_size);
  void Commit(size_t n) { end_ += n; }
  // Next complete frame: true and `frame` set, false when more bytes are needed, or an error
  // (frame over max_frame_bytes, bad length, unknown type) after which the stream is unusable.
  Result<bool> Next(Frame& frame);

 private:
  size_t max_frame_bytes_;
  std::string buf_;
  size_t begin_ = 0;  // first unconsumed byte
  size_t end_ = 0;    // one past the last received byte
};

}  // namespace dyn
