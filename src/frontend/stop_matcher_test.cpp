#include "frontend/stop_matcher.h"

#include <gtest/gtest.h>

namespace dyn {
namespace {

// Feeds pieces and returns everything emitted plus whether it stopped.
std::pair<std::string, bool> Feed(StopMatcher& m, const std::vector<std::string>& pieces) {
  std::string out;
  bool stopped = false;
  for (const auto& p : pieces) {
    auto step = m.Push(p);
    out += step.text;
    if (step.stopped) {
      stopped = true;
      break;
    }
  }
  if (!stopped) out += m.Flush();
  return {out, stopped};
}

TEST(StopMatcher, NoStopsPassesThrough) {
  StopMatcher m({}, false);
  EXPECT_EQ(m.Push("abc").text, "abc");
  EXPECT_EQ(m.Flush(), "");
}

TEST(StopMatcher, StopInsideOnePiece) {
  StopMatcher m({"END"}, false);
  auto s = m.Push("helloENDworld");
  EXPECT_TRUE(s.stopped);
  EXPECT_EQ(s.text, "hello");
  EXPECT_EQ(s.stop_index, 0);
  EXPECT_TRUE(m.Push("more").stopped);
  EXPECT_EQ(m.Push("more").text, "");
}

TEST(StopMatcher, StopAcrossPiecesIsHeldBackUntilResolved) {
  StopMatcher m({"STOP"}, false);
  auto a = m.Push("abc ST");
  EXPECT_EQ(a.text, "abc ");  // "ST" could start "STOP"
  EXPECT_FALSE(a.stopped);
  auto b = m.Push("O");
  EXPECT_EQ(b.text, "");
  auto c = m.Push("P tail");
  EXPECT_TRUE(c.stopped);
  EXPECT_EQ(c.text, "");
}

TEST(StopMatcher, FalseStartIsReleased) {
  StopMatcher m({"STOP"}, false);
  EXPECT_EQ(m.Push("xST").text, "x");
  EXPECT_EQ(m.Push("OX").text, "STOX");
  EXPECT_EQ(m.Push("S").text, "");
  EXPECT_EQ(m.Flush(), "S");
}

TEST(StopMatcher, IncludeStopString) {
  StopMatcher m({"\n\n"}, true);
  auto [out, stopped] = Feed(m, {"para", "\n", "\nnext"});
  EXPECT_TRUE(stopped);
  EXPECT_EQ(out, "para\n\n");
}

TEST(StopMatcher, EarliestOfSeveralWinsAndIndexIsOriginal) {
  StopMatcher m({"", "world", "lo w"}, false);
  auto s = m.Push("hello world");
  EXPECT_TRUE(s.stopped);
  EXPECT_EQ(s.text, "hel");
  EXPECT_EQ(s.stop_index, 2);
}

TEST(StopMatcher, OneByteAtATimeEqualsWholeText) {
  const std::string text = "The cat sat. The dog ran. Then it stopped here.";
  for (const std::string stop : {"dog", "here.", "T", "zzz", "ran. Th"}) {
    StopMatcher whole({stop}, false);
    auto expected = Feed(whole, {text});
    StopMatcher bytes({stop}, false);
    std::vector<std::string> pieces;
    for (char c : text) pieces.emplace_back(1, c);
    EXPECT_EQ(Feed(bytes, pieces), expected) << stop;
    size_t pos = text.find(stop);
    EXPECT_EQ(expected.first, pos == std::string::npos ? text : text.substr(0, pos));
  }
}

TEST(StopMatcher, MultibyteStopIsNotSplit) {
  StopMatcher m({"é!"}, false);
  auto a = m.Push("caf\xc3\xa9");
  EXPECT_EQ(a.text, "caf");
  auto b = m.Push("?");
  EXPECT_EQ(b.text, "\xc3\xa9?");
}

}  // namespace
}  // namespace dyn
