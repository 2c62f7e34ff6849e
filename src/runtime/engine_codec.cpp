#include "runtime/engine_codec.h"

#include "runtime/request_frame.h"

namespace dyn {
namespace {

// Bumped on any layout change; decoders reject other versions instead of misreading them.
constexpr uint8_t kRequestVersion = 2;  // 2: phase, kv_transfer, first_token
constexpr uint8_t kOutputVersion = 2;   // 2: kv_transfer

void WriteIds(ByteWriter& w, const std::vector<uint32_t>& ids) {
  w.U32(static_cast<uint32_t>(ids.size()));
  for (uint32_t id : ids) w.U32(id);
}

Status ReadIds(ByteReader& r, std::vector<uint32_t>& ids) {
  uint32_t n;
  DYN_RETURN_IF_ERROR(r.Count(4, n));
  ids.resize(n);
  for (uint32_t& id : ids) DYN_RETURN_IF_ERROR(r.U32(id));
  return Status::Ok();
}

Status CheckVersion(ByteReader& r, uint8_t expected, const char* what) {
  uint8_t version;
  DYN_RETURN_IF_ERROR(r.U8(version));
  if (version != expected) {
    return Status::InvalidArgument(std::string(what) + " encoding version " + std::to_string(version) +
                                   " (expected " + std::to_string(expected) + ")");
  }
  return Status::Ok();
}

Status CheckEnd(const ByteReader& r) {
  if (!r.done()) return Status::InvalidArgument(std::to_string(r.remaining()) + " trailing bytes");
  return Status::Ok();
}

Status DecodeRequestInto(ByteReader& r, PreprocessedRequest& q) {
  DYN_RETURN_IF_ERROR(CheckVersion(r, kRequestVersion, "request"));
  DYN_RETURN_IF_ERROR(r.Str(q.request_id));
  DYN_RETURN_IF_ERROR(ReadIds(r, q.token_ids));
  SamplingParams& s = q.sampling;
  DYN_RETURN_IF_ERROR(r.F32(s.temperature));
  DYN_RETURN_IF_ERROR(r.F32(s.top_p));
  DYN_RETURN_IF_ERROR(r.I32(s.top_k));
  DYN_RETURN_IF_ERROR(r.F32(s.min_p));
  DYN_RETURN_IF_ERROR(r.F32(s.repetition_penalty));
  DYN_RETURN_IF_ERROR(r.F32(s.frequency_penalty));
  DYN_RETURN_IF_ERROR(r.F32(s.presence_penalty));
  bool has_seed;
  DYN_RETURN_IF_ERROR(r.Bool(has_seed));
  if (has_seed) {
    uint64_t seed;
    DYN_RETURN_IF_ERROR(r.U64(seed));
    s.seed = seed;
  }
  DYN_RETURN_IF_ERROR(r.Bool(s.logprobs));
  DYN_RETURN_IF_ERROR(r.I32(s.top_logprobs));
  StopConditions& stop = q.stop;
  DYN_RETURN_IF_ERROR(r.I32(stop.max_tokens));
  DYN_RETURN_IF_ERROR(r.I32(stop.min_tokens));
  DYN_RETURN_IF_ERROR(ReadIds(r, stop.stop_token_ids));
  DYN_RETURN_IF_ERROR(r.Bool(stop.ignore_eos));
  DYN_RETURN_IF_ERROR(ReadIds(r, q.eos_token_ids));
  uint8_t phase;
  DYN_RETURN_IF_ERROR(r.U8(phase));
  if (phase > static_cast<uint8_t>(RequestPhase::kDecodeImported))
    return Status::InvalidArgument("bad request phase " + std::to_string(phase));
  q.phase = static_cast<RequestPhase>(phase);
  DYN_RETURN_IF_ERROR(r.Str(q.kv_transfer));
  DYN_RETURN_IF_ERROR(r.U32(q.first_token));
  return CheckEnd(r);
}

// Smallest encodings: a TokenLogprob is token + logprob + top count; a TopLogprob token + logprob.
constexpr size_t kMinTokenLogprobBytes = 12;
constexpr size_t kTopLogprobBytes = 8;

Status DecodeOutputInto(ByteReader& r, EngineOutput& o) {
  DYN_RETURN_IF_ERROR(CheckVersion(r, kOutputVersion, "output"));
  DYN_RETURN_IF_ERROR(ReadIds(r, o.token_ids));
  uint32_t n;
  DYN_RETURN_IF_ERROR(r.Count(kMinTokenLogprobBytes, n));
  o.logprobs.resize(n);
  for (TokenLogprob& lp : o.logprobs) {
    DYN_RETURN_IF_ERROR(r.U32(lp.token));
    DYN_RETURN_IF_ERROR(r.F32(lp.logprob));
    uint32_t top;
    DYN_RETURN_IF_ERROR(r.Count(kTopLogprobBytes, top));
    lp.top.resize(top);
    for (TopLogprob& t : lp.top) {
      DYN_RETURN_IF_ERROR(r.U32(t.token));
      DYN_RETURN_IF_ERROR(r.F32(t.logprob));
    }
  }
  uint8_t finish;
  DYN_RETURN_IF_ERROR(r.U8(finish));
  if (finish > static_cast<uint8_t>(FinishReason::kError) + 1) {
    return Status::InvalidArgument("bad finish reason " + std::to_string(finish));
  }
  if (finish != 0) o.finish_reason = static_cast<FinishReason>(finish - 1);
  DYN_RETURN_IF_ERROR(r.Str(o.error));
  DYN_RETURN_IF_ERROR(r.U32(o.prompt_tokens));
  DYN_RETURN_IF_ERROR(r.U32(o.cached_tokens));
  DYN_RETURN_IF_ERROR(r.Str(o.kv_transfer));
  return CheckEnd(r);
}

}  // namespace

std::string EncodeRequest(const PreprocessedRequest& q) {
  std::string out;
  out.reserve(72 + q.request_id.size() + q.kv_transfer.size() + 4 * (q.token_ids.size() + q.stop.stop_token_ids.size() + q.eos_token_ids.size()));
  ByteWriter w(out);
  w.U8(kRequestVersion);
  w.Str(q.request_id);
  WriteIds(w, q.token_ids);
  const SamplingParams& s = q.sampling;
  w.F32(s.temperature);
  w.F32(s.top_p);
  w.I32(s.top_k);
  w.F32(s.min_p);
  w.F32(s.repetition_penalty);
  w.F32(s.frequency_penalty);
  w.F32(s.presence_penalty);
  w.U8(s.seed.has_value() ? 1 : 0);
  if (s.seed) w.U64(*s.seed);
  w.U8(s.logprobs ? 1 : 0);
  w.I32(s.top_logprobs);
  const StopConditions& stop = q.stop;
  w.I32(stop.max_tokens);
  w.I32(stop.min_tokens);
  WriteIds(w, stop.stop_token_ids);
  w.U8(stop.ignore_eos ? 1 : 0);
  WriteIds(w, q.eos_token_ids);
  w.U8(static_cast<uint8_t>(q.phase));
  w.Str(q.kv_transfer);
  w.U32(q.first_token);
  return out;
}

Result<PreprocessedRequest> DecodeRequest(std::string_view bytes) {
  ByteReader r(bytes);
  PreprocessedRequest q;
  Status s = DecodeRequestInto(r, q);
  if (!s.ok()) return s.WithContext("decoding request");
  return q;
}

std::string EncodeOutput(const EngineOutput& o) {
  std::string out;
  size_t size = 36 + o.error.size() + o.kv_transfer.size() + 4 * o.token_ids.size();
  for (const auto& lp : o.logprobs) size += kMinTokenLogprobBytes + kTopLogprobBytes * lp.top.size();
  out.reserve(size);
  ByteWriter w(out);
  w.U8(kOutputVersion);
  WriteIds(w, o.token_ids);
  w.U32(static_cast<uint32_t>(o.logprobs.size()));
  for (const TokenLogprob& lp : o.logprobs) {
    w.U32(lp.token);
    w.F32(lp.logprob);
    w.U32(static_cast<uint32_t>(lp.top.size()));
    for (const TopLogprob& t : lp.top) {
      w.U32(t.token);
      w.F32(t.logprob);
    }
  }
  // 0 = no finish reason, else the reason + 1.
  w.U8(o.finish_reason ? static_cast<uint8_t>(*o.finish_reason) + 1 : 0);
  w.Str(o.error);
  w.U32(o.prompt_tokens);
  w.U32(o.cached_tokens);
  w.Str(o.kv_transfer);
  return out;
}

Result<EngineOutput> DecodeOutput(std::string_view bytes) {
  ByteReader r(bytes);
  EngineOutput o;
  Status s = DecodeOutputInto(r, o);
  if (!s.ok()) return s.WithContext("decoding output");
  return o;
}

void MergeOutput(EngineOutput& into, EngineOutput&& next) {
  if (into.token_ids.empty()) {
    into.token_ids = std::move(next.token_ids);
  } else {
    into.token_ids.insert(into.token_ids.end(), next.token_ids.begin(), next.token_ids.end());
  }
  if (into.logprobs.empty()) {
    into.logprobs = std::move(next.logprobs);
  } else {
    for (auto& lp : next.logprobs) into.logprobs.push_back(std::move(lp));
  }
  if (next.finish_reason) {
    into.finish_reason = next.finish_reason;
    into.error = std::move(next.error);
    into.kv_transfer = std::move(next.kv_transfer);
  }
  // Only the first delta of a stream carries these; keep whichever of the two has them.
  if (into.prompt_tokens == 0) into.prompt_tokens = next.prompt_tokens;
  if (into.cached_tokens == 0) into.cached_tokens = next.cached_tokens;
}

}  // namespace dyn
