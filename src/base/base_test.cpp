#include <gtest/gtest.h>

#include "base/file.h"
#include "base/status.h"

namespace dyn {
namespace {

Result<int> Half(int x) {
  if (x % 2) return Status::InvalidArgument("odd");
  return x / 2;
}

Result<int> Quarter(int x) {
  DYN_ASSIGN_OR_RETURN(int h, Half(x));
  DYN_ASSIGN_OR_RETURN(int q, Half(h));
  return q;
}

TEST(Status, ResultPropagates) {
  EXPECT_EQ(*Quarter(8), 2);
  auto r = Quarter(6);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(r.status().ToString(), "InvalidArgument: odd");
  EXPECT_EQ(r.status().WithContext("quarter").message(), "quarter: odd");
}

TEST(File, MissingFileIsIoError) {
  auto r = ReadFile("/nonexistent/dyn");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kIoError);
  EXPECT_FALSE(MappedFile::Open("/nonexistent/dyn").ok());
}

TEST(File, MapsFile) {
  auto m = MappedFile::Open("../shared/models/stories260K/hf/config.json");
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  auto s = ReadFile("../shared/models/stories260K/hf/config.json");
  ASSERT_TRUE(s.ok());
  ASSERT_EQ((*m)->size(), s->size());
  EXPECT_EQ(std::string(reinterpret_cast<const char*>((*m)->data()), (*m)->size()), *s);
}

}  // namespace
}  // namespace dyn
