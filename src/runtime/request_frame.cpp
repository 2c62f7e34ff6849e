#include "runtime/request_frame.h"

#include <algorithm>

namespace dyn {
namespace {

void AppendHeader(std::string& out, FrameType type, uint64_t call_id, size_t payload_bytes) {
  ByteWriter w(out);
  w.U32(static_cast<uint32_t>(kFrameMinLength + payload_bytes));
  w.U8(static_cast<uint8_t>(type));
  w.U64(call_id);
}

}  // namespace

void AppendFrame(std::string& out, FrameType type, uint64_t call_id, std::string_view payload) {
  AppendHeader(out, type, call_id, payload.size());
  out.append(payload.data(), payload.size());
}

void AppendCallFrame(std::string& out, uint64_t call_id, std::string_view endpoint, std::string_view request) {
  AppendHeader(out, FrameType::kCall, call_id, 2 + endpoint.size() + request.size());
  ByteWriter w(out);
  w.U16(static_cast<uint16_t>(endpoint.size()));
  w.Bytes(endpoint);
  w.Bytes(request);
}

void AppendEndFrame(std::string& out, uint64_t call_id, const Status& status) {
  AppendHeader(out, FrameType::kEnd, call_id, 1 + status.message().size());
  ByteWriter w(out);
  w.U8(static_cast<uint8_t>(status.code()));
  w.Bytes(status.message());
}

Status ParseCallPayload(std::string_view payload, std::string_view& endpoint, std::string_view& request) {
  ByteReader r(payload);
  uint16_t n;
  DYN_RETURN_IF_ERROR(r.U16(n));
  DYN_RETURN_IF_ERROR(r.Bytes(n, endpoint));
  request = payload.substr(2 + n);
  return Status::Ok();
}

Status ParseEndPayload(std::string_view payload) {
  if (payload.empty()) return Status::Internal("malformed end frame");
  const auto code = static_cast<uint8_t>(payload[0]);
  if (code > static_cast<uint8_t>(StatusCode::kInternal)) {
    return Status::Internal("end frame with unknown status code " + std::to_string(code));
  }
  if (code == 0) return Status::Ok();
  return Status(static_cast<StatusCode>(code), std::string(payload.substr(1)));
}

char* FrameParser::WritableBuffer(size_t min_size) {
  // Move the unconsumed tail to the front once the consumed head dominates, so the buffer does not
  // grow with the stream; a frame's bytes stay contiguous.
  if (begin_ > 0 && (begin_ == end_ || begin_ >= buf_.size() / 2)) {
    std::memmove(buf_.data(), buf_.data() + begin_, end_ - begin_);
    end_ -= begin_;
    begin_ = 0;
  }
  if (buf_.size() - end_ < min_size) buf_.resize(std::max(buf_.size() * 2, end_ + min_size));
  return buf_.data() + end_;
}

Result<bool> FrameParser::Next(Frame& frame) {
  const size_t avail = end_ - begin_;
  if (avail < 4) return false;
  ByteReader r(std::string_view(buf_.data() + begin_, avail));
  uint32_t length;
  (void)r.U32(length);
  if (length < kFrameMinLength) return Status::InvalidArgument("frame length " + std::to_string(length) + " too small");
  if (length > max_frame_bytes_) {
    return Status::TooLarge("frame of " + std::to_string(length) + " bytes exceeds the limit of " +
                            std::to_string(max_frame_bytes_));
  }
  if (avail - 4 < length) return false;
  uint8_t type;
  (void)r.U8(type);
  if (type < static_cast<uint8_t>(FrameType::kCall) || type > static_cast<uint8_t>(FrameType::kPong)) {
    return Status::InvalidArgument("unknown frame type " + std::to_string(type));
  }
  frame.type = static_cast<FrameType>(type);
  (void)r.U64(frame.call_id);
  frame.payload = std::string_view(buf_.data() + begin_ + kFrameHeaderBytes, length - kFrameMinLength);
  begin_ += 4 + length;
  return true;
}

}  // namespace dyn
