#include <gtest/gtest.h>
#include <boost/json.hpp>
#include "llm/template/chat_template.h"
TEST(Smoke, Renders) {
  auto t = dyn::ChatTemplate::Parse("Hello {{ name }}!");
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  auto r = (*t)->Render(boost::json::object{{"name", "x"}});
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, "Hello x!");
}
