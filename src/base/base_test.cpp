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

#include <cstdlib>

#include "base/flags.h"

namespace dyn {
namespace {

TEST(Flags, CommandLineBeatsEnvironmentBeatsDefault) {
  std::string model = "default";
  int64_t port = 8000, seqs = 64;
  double temp = 0.5;
  bool caching = true, verbose = false;
  FlagSet fs("dyn test", "test");
  fs.String("model", &model, "model");
  fs.Int("port", &port, "port");
  fs.Int("max-num-seqs", &seqs, "seqs");
  fs.Double("temperature", &temp, "t");
  fs.Bool("prefix-caching", &caching, "c");
  fs.Bool("verbose", &verbose, "v");
  setenv("DYN_PORT", "9000", 1);
  setenv("DYN_MAX_NUM_SEQS", "8", 1);
  const char* argv[] = {"dyn", "--model", "m.gguf", "--port=9100", "--no-prefix-caching", "--verbose", "extra"};
  Status s = fs.Parse(7, const_cast<char**>(argv));
  unsetenv("DYN_PORT");
  unsetenv("DYN_MAX_NUM_SEQS");
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(model, "m.gguf");
  EXPECT_EQ(port, 9100);
  EXPECT_EQ(seqs, 8);
  EXPECT_EQ(temp, 0.5);
  EXPECT_FALSE(caching);
  EXPECT_TRUE(verbose);
  ASSERT_EQ(fs.positional().size(), 1u);
  EXPECT_EQ(fs.positional()[0], "extra");
  EXPECT_EQ(FlagSet::EnvName("max-num-seqs"), "DYN_MAX_NUM_SEQS");
}

TEST(Flags, IsSetTellsGivenFromDefault) {
  int64_t block = 16, seqs = 64;
  FlagSet fs("t", "");
  fs.Int("block-size", &block, "");
  fs.Int("max-num-seqs", &seqs, "");
  const char* argv[] = {"t", "--block-size", "16"};  // given, though equal to the default
  ASSERT_TRUE(fs.Parse(3, const_cast<char**>(argv)).ok());
  EXPECT_TRUE(fs.IsSet("block-size"));
  EXPECT_FALSE(fs.IsSet("max-num-seqs"));
}

TEST(Flags, ErrorsNameTheFlag) {
  int64_t port = 0;
  FlagSet fs("dyn test", "test");
  fs.Int("port", &port, "port");
  const char* bad_num[] = {"dyn", "--port", "80x"};
  Status s = fs.Parse(3, const_cast<char**>(bad_num));
  EXPECT_NE(s.message().find("--port"), std::string::npos);
  FlagSet fs2("dyn test", "test");
  fs2.Int("port", &port, "port");
  const char* unknown[] = {"dyn", "--prot", "1"};
  EXPECT_NE(fs2.Parse(3, const_cast<char**>(unknown)).message().find("--prot"), std::string::npos);
  const char* missing[] = {"dyn", "--port"};
  FlagSet fs3("dyn test", "test");
  fs3.Int("port", &port, "port");
  EXPECT_FALSE(fs3.Parse(2, const_cast<char**>(missing)).ok());
}

}  // namespace
}  // namespace dyn
