#include "runtime/engine_codec.h"

#include <gtest/gtest.h>

#include <random>

#include "runtime/request_frame.h"

namespace dyn {
namespace {

PreprocessedRequest FullRequest() {
  PreprocessedRequest q;
  q.request_id = "req-\xff\x00-1";
  q.request_id.push_back('\0');
  q.token_ids = {1, 2, 0xffffffffu, 42};
  q.sampling.temperature = 0.7f;
  q.sampling.top_p = 0.9f;
  q.sampling.top_k = -3;
  q.sampling.min_p = 0.05f;
  q.sampling.repetition_penalty = 1.1f;
  q.sampling.frequency_penalty = -0.5f;
  q.sampling.presence_penalty = 0.25f;
  q.sampling.seed = 0x0123456789abcdefull;
  q.sampling.logprobs = true;
  q.sampling.top_logprobs = 5;
  q.stop.max_tokens = 123;
  q.stop.min_tokens = 7;
  q.stop.stop_token_ids = {9, 8};
  q.stop.ignore_eos = true;
  q.eos_token_ids = {2, 128001};
  q.phase = RequestPhase::kDecodeImported;
  q.kv_transfer = R"({"backend":"tcp","address":"10.0.0.1:7000"})";
  q.first_token = 4711;
  return q;
}

EngineOutput FullOutput() {
  EngineOutput o;
  o.token_ids = {5, 6, 7};
  o.logprobs = {{5, -0.5f, {{5, -0.5f}, {11, -1.5f}}}, {6, -0.25f, {}}, {7, 0.0f, {{7, 0.0f}}}};
  o.finish_reason = FinishReason::kError;
  o.error = "Internal: boom";
  o.prompt_tokens = 64;
  o.cached_tokens = 32;
  o.kv_transfer = R"({"lease_id":"7"})";
  return o;
}

void ExpectSameRequest(const PreprocessedRequest& a, const PreprocessedRequest& b) {
  EXPECT_EQ(a.request_id, b.request_id);
  EXPECT_EQ(a.token_ids, b.token_ids);
  EXPECT_EQ(a.sampling.temperature, b.sampling.temperature);
  EXPECT_EQ(a.sampling.top_p, b.sampling.top_p);
  EXPECT_EQ(a.sampling.top_k, b.sampling.top_k);
  EXPECT_EQ(a.sampling.min_p, b.sampling.min_p);
  EXPECT_EQ(a.sampling.repetition_penalty, b.sampling.repetition_penalty);
  EXPECT_EQ(a.sampling.frequency_penalty, b.sampling.frequency_penalty);
  EXPECT_EQ(a.sampling.presence_penalty, b.sampling.presence_penalty);
  EXPECT_EQ(a.sampling.seed, b.sampling.seed);
  EXPECT_EQ(a.sampling.logprobs, b.sampling.logprobs);
  EXPECT_EQ(a.sampling.top_logprobs, b.sampling.top_logprobs);
  EXPECT_EQ(a.stop.max_tokens, b.stop.max_tokens);
  EXPECT_EQ(a.stop.min_tokens, b.stop.min_tokens);
  EXPECT_EQ(a.stop.stop_token_ids, b.stop.stop_token_ids);
  EXPECT_EQ(a.stop.ignore_eos, b.stop.ignore_eos);
  EXPECT_EQ(a.eos_token_ids, b.eos_token_ids);
  EXPECT_EQ(a.phase, b.phase);
  EXPECT_EQ(a.kv_transfer, b.kv_transfer);
  EXPECT_EQ(a.first_token, b.first_token);
}

void ExpectSameOutput(const EngineOutput& a, const EngineOutput& b) {
  EXPECT_EQ(a.token_ids, b.token_ids);
  ASSERT_EQ(a.logprobs.size(), b.logprobs.size());
  for (size_t i = 0; i < a.logprobs.size(); ++i) {
    EXPECT_EQ(a.logprobs[i].token, b.logprobs[i].token);
    EXPECT_EQ(a.logprobs[i].logprob, b.logprobs[i].logprob);
    ASSERT_EQ(a.logprobs[i].top.size(), b.logprobs[i].top.size());
    for (size_t j = 0; j < a.logprobs[i].top.size(); ++j) {
      EXPECT_EQ(a.logprobs[i].top[j].token, b.logprobs[i].top[j].token);
      EXPECT_EQ(a.logprobs[i].top[j].logprob, b.logprobs[i].top[j].logprob);
    }
  }
  EXPECT_EQ(a.finish_reason, b.finish_reason);
  EXPECT_EQ(a.error, b.error);
  EXPECT_EQ(a.prompt_tokens, b.prompt_tokens);
  EXPECT_EQ(a.cached_tokens, b.cached_tokens);
  EXPECT_EQ(a.kv_transfer, b.kv_transfer);
}

TEST(EngineCodec, RequestRoundTripsEveryField) {
  const PreprocessedRequest q = FullRequest();
  auto decoded = DecodeRequest(EncodeRequest(q));
  ASSERT_TRUE(decoded.ok()) << decoded.status().ToString();
  ExpectSameRequest(q, *decoded);

  PreprocessedRequest defaults;  // no seed, empty vectors
  auto d2 = DecodeRequest(EncodeRequest(defaults));
  ASSERT_TRUE(d2.ok()) << d2.status().ToString();
  EXPECT_FALSE(d2->sampling.seed.has_value());
  ExpectSameRequest(defaults, *d2);
}

TEST(EngineCodec, OutputRoundTripsEveryField) {
  for (auto reason : {FinishReason::kStop, FinishReason::kLength, FinishReason::kCancelled, FinishReason::kError}) {
    EngineOutput o = FullOutput();
    o.finish_reason = reason;
    auto decoded = DecodeOutput(EncodeOutput(o));
    ASSERT_TRUE(decoded.ok()) << decoded.status().ToString();
    ExpectSameOutput(o, *decoded);
  }
  EngineOutput empty;
  auto d = DecodeOutput(EncodeOutput(empty));
  ASSERT_TRUE(d.ok());
  EXPECT_FALSE(d->finish_reason.has_value());
  ExpectSameOutput(empty, *d);
}

TEST(EngineCodec, EveryTruncationFailsCleanly) {
  const std::string req = EncodeRequest(FullRequest());
  for (size_t n = 0; n < req.size(); ++n) {
    auto r = DecodeRequest(std::string_view(req).substr(0, n));
    ASSERT_FALSE(r.ok()) << "request prefix of " << n << " bytes decoded";
    EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  }
  const std::string out = EncodeOutput(FullOutput());
  for (size_t n = 0; n < out.size(); ++n) {
    auto r = DecodeOutput(std::string_view(out).substr(0, n));
    ASSERT_FALSE(r.ok()) << "output prefix of " << n << " bytes decoded";
    EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  }
}

TEST(EngineCodec, TrailingBytesAndWrongVersionAreRejected) {
  EXPECT_EQ(DecodeRequest(EncodeRequest(FullRequest()) + "x").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(DecodeOutput(EncodeOutput(FullOutput()) + "x").status().code(), StatusCode::kInvalidArgument);
  std::string bad = EncodeOutput(FullOutput());
  bad[0] = 7;
  EXPECT_EQ(DecodeOutput(bad).status().code(), StatusCode::kInvalidArgument);
}

TEST(EngineCodec, HugeCountsAreRejectedWithoutAllocating) {
  // Version, then a token count of 2^32-1 with 4 bytes of data behind it.
  std::string bytes("\x01\xff\xff\xff\xff\x00\x00\x00\x00", 9);
  auto r = DecodeOutput(bytes);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
}

TEST(EngineCodec, RandomGarbageDoesNotCrash) {
  std::mt19937 rng(1234);
  const std::string valid_req = EncodeRequest(FullRequest());
  const std::string valid_out = EncodeOutput(FullOutput());
  int decoded = 0;
  for (int i = 0; i < 20000; ++i) {
    std::string bytes;
    if (i % 2 == 0) {
      bytes.resize(rng() % 96);
      for (char& c : bytes) c = static_cast<char>(rng());
      if (!bytes.empty()) bytes[0] = 1;  // get past the version byte most of the time
    } else {
      // Valid encodings with a few bytes flipped: reach deeper into the decoders.
      bytes = (i % 4 == 1) ? valid_req : valid_out;
      for (int k = 0; k < 3; ++k) bytes[rng() % bytes.size()] = static_cast<char>(rng());
    }
    auto q = DecodeRequest(bytes);
    auto o = DecodeOutput(bytes);
    decoded += q.ok() + o.ok();
    if (!q.ok()) {
      EXPECT_EQ(q.status().code(), StatusCode::kInvalidArgument);
    }
    if (!o.ok()) {
      EXPECT_EQ(o.status().code(), StatusCode::kInvalidArgument);
    }
  }
  EXPECT_GT(decoded, 0);  // flips inside float fields still decode
}

TEST(EngineCodec, MergeOutputAppendsAndKeepsFirstDeltaFields) {
  EngineOutput a;
  a.token_ids = {1};
  a.logprobs = {{1, -1.0f, {}}};
  a.prompt_tokens = 10;
  a.cached_tokens = 4;
  EngineOutput b;
  b.token_ids = {2, 3};
  b.logprobs = {{2, -2.0f, {}}, {3, -3.0f, {{3, -3.0f}}}};
  MergeOutput(a, std::move(b));
  EngineOutput c;
  c.token_ids = {4};
  c.logprobs = {{4, -4.0f, {}}};
  c.finish_reason = FinishReason::kLength;
  MergeOutput(a, std::move(c));
  EXPECT_EQ(a.token_ids, (std::vector<uint32_t>{1, 2, 3, 4}));
  ASSERT_EQ(a.logprobs.size(), 4u);
  EXPECT_EQ(a.logprobs[2].top.size(), 1u);
  EXPECT_EQ(a.logprobs[3].logprob, -4.0f);
  EXPECT_EQ(a.finish_reason, FinishReason::kLength);
  EXPECT_EQ(a.prompt_tokens, 10u);
  EXPECT_EQ(a.cached_tokens, 4u);

  EngineOutput empty;
  EngineOutput first;
  first.prompt_tokens = 7;
  first.token_ids = {9};
  MergeOutput(empty, std::move(first));
  EXPECT_EQ(empty.prompt_tokens, 7u);
  EXPECT_EQ(empty.token_ids, (std::vector<uint32_t>{9}));
}

// ---- framing ----

void Feed(FrameParser& p, std::string_view bytes) {
  std::memcpy(p.WritableBuffer(bytes.size()), bytes.data(), bytes.size());
  p.Commit(bytes.size());
}

TEST(RequestFrame, ParsesFramesSplitAnywhere) {
  std::string wire;
  AppendCallFrame(wire, 7, "generate", "payload-bytes");
  AppendFrame(wire, FrameType::kData, 7, std::string(1000, 'd'));
  AppendEndFrame(wire, 7, Status::NotFound("nope"));
  AppendFrame(wire, FrameType::kPing, 0, {});
  FrameParser p(1 << 20);
  std::vector<std::pair<FrameType, std::string>> got;
  for (char c : wire) {  // one byte at a time: every split point
    Feed(p, std::string_view(&c, 1));
    Frame f;
    for (;;) {
      auto r = p.Next(f);
      ASSERT_TRUE(r.ok()) << r.status().ToString();
      if (!*r) break;
      EXPECT_EQ(f.call_id, f.type == FrameType::kPing ? 0u : 7u);
      got.emplace_back(f.type, std::string(f.payload));
    }
  }
  ASSERT_EQ(got.size(), 4u);
  std::string_view endpoint, request;
  ASSERT_TRUE(ParseCallPayload(got[0].second, endpoint, request).ok());
  EXPECT_EQ(endpoint, "generate");
  EXPECT_EQ(request, "payload-bytes");
  EXPECT_EQ(got[1].second.size(), 1000u);
  Status end = ParseEndPayload(got[2].second);
  EXPECT_EQ(end.code(), StatusCode::kNotFound);
  EXPECT_EQ(end.message(), "nope");
  EXPECT_TRUE(ParseEndPayload(std::string(1, '\0')).ok());
  EXPECT_FALSE(ParseEndPayload("").ok());
  EXPECT_FALSE(ParseEndPayload("\x7f").ok());
}

TEST(RequestFrame, RejectsOversizedShortAndUnknownFrames) {
  {
    std::string wire;
    AppendFrame(wire, FrameType::kData, 1, std::string(200, 'x'));
    FrameParser p(100);
    Feed(p, wire.substr(0, 4));  // the length alone is enough to refuse
    Frame f;
    auto r = p.Next(f);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), StatusCode::kTooLarge);
  }
  {
    FrameParser p(100);
    Feed(p, std::string("\x03\x00\x00\x00", 4));
    Frame f;
    EXPECT_FALSE(p.Next(f).ok());
  }
  {
    std::string wire;
    AppendFrame(wire, FrameType::kData, 1, "x");
    wire[4] = 99;
    FrameParser p(100);
    Feed(p, wire);
    Frame f;
    EXPECT_FALSE(p.Next(f).ok());
  }
  std::string_view endpoint, request;
  EXPECT_FALSE(ParseCallPayload(std::string("\x05\x00" "ab", 4), endpoint, request).ok());
}

}  // namespace
}  // namespace dyn
