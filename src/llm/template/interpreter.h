// Template evaluation (private header): runs a parsed template body against a scope chain,
// counting steps and bounding output, recursion and container sizes.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "base/status.h"
#include "llm/template/ast.h"
#include "llm/template/chat_template.h"
#include "llm/template/value.h"

namespace dyn::tmpl {

// Names visible to a template; lookups walk outward through parents.
struct Scope {
  std::shared_ptr<Scope> parent;
  std::vector<std::pair<std::string, Value>> vars;

  const Value* Find(std::string_view name) const;
  void Set(std::string_view name, Value value);
};

// Positional and keyword arguments of a call, filter or test.
struct Args {
  std::vector<Value> pos;
  std::vector<std::pair<std::string, Value>> kw;

  // The argument at `index` or named `name`; nullptr when absent.
  const Value* Get(size_t index, std::string_view name) const;
  Value GetOr(size_t index, std::string_view name, Value fallback) const;
};

// Largest list or dict a template may build (strings are bounded by max_output_bytes).
constexpr size_t kMaxContainerItems = 1u << 18;
// Deepest nesting of statement and expression evaluation (C++ stack frames), whatever mix of
// macro recursion, nested blocks and tall expressions produces it: at most kMaxEvalDepth frames
// (about 1 MiB of stack in a normal build) and at most kMaxEvalStackBytes of stack below Run's
// frame (sanitizer builds' frames are several times larger: 1000 of them overflowed 8 MiB).
constexpr int kMaxEvalDepth = 1000;
constexpr uintptr_t kMaxEvalStackBytes = uintptr_t{2} << 20;

class Interpreter {
 public:
  using Clock = std::function<std::chrono::system_clock::time_point()>;
  Interpreter(const RenderLimits& limits, Clock clock) : limits_(limits), clock_(std::move(clock)) {}

  Result<std::string> Run(const Body& body, std::shared_ptr<Scope> globals);

  // Shared with the builtins.
  Status Step(uint64_t n = 1);
  Status CheckSize(size_t bytes) const;
  Result<Value> Call(const Value& callee, Args args);
  Result<Value> GetAttr(const Value& obj, const std::string& name);
  Result<Value> GetItem(const Value& obj, const Value& key);
  Result<std::vector<Value>> Iterate(const Value& v);  // what `for` iterates over
  std::chrono::system_clock::time_point Now() const { return clock_ ? clock_() : std::chrono::system_clock::now(); }
  const RenderLimits& limits() const { return limits_; }
  // Namespaces are the only mutable values, so every reference cycle runs through one; the
  // render clears them when it ends so that cycles (`ns.self = ns`) are not leaked.
  void TrackNamespace(const std::shared_ptr<DictObj>& ns) { namespaces_.push_back(ns); }

 private:
  enum class Flow { kNormal, kBreak, kContinue };

  Result<Flow> ExecBody(const Body& body, const std::shared_ptr<Scope>& scope);
  Result<Flow> Exec(const Stmt& s, const std::shared_ptr<Scope>& scope);
  Result<Flow> ExecFor(const Stmt& s, const std::shared_ptr<Scope>& scope, const Value& iterable, int64_t depth0);
  Result<std::string> Capture(const Body& body, const std::shared_ptr<Scope>& scope);
  Status Assign(const Expr& target, Value value, const std::shared_ptr<Scope>& scope);
  Status Emit(std::string_view text);

  Result<Value> Eval(const Expr& e, const std::shared_ptr<Scope>& scope);
  Result<Value> EvalBinary(const std::string& op, const Value& a, const Value& b);
  Result<Value> EvalCompare(const Expr& e, const std::shared_ptr<Scope>& scope);
  Status EvalArgs(const Expr& e, size_t first, const std::shared_ptr<Scope>& scope, Args& args);
  Result<Value> CallMacro(const Callable& fn, Args args);
  // Enters one more nested Exec/Eval frame, or says it would be too deep (then nothing changes).
  Status EnterFrame();

  RenderLimits limits_;
  Clock clock_;
  uint64_t steps_ = 0;
  int depth_ = 0;        // macro / recursive loop calls
  int eval_depth_ = 0;   // nested Exec/Eval frames on the C++ stack
  uintptr_t stack_top_ = 0;  // Run's frame address (the stack grows down from it)
  std::string* out_ = nullptr;
  // Scopes that macros close over; weak references from the macros avoid cycles.
  std::vector<std::shared_ptr<Scope>> closures_;
  std::vector<std::weak_ptr<DictObj>> namespaces_;
};

// Builtins (builtins.cpp, filters.cpp).
Result<Value> ApplyFilter(Interpreter& in, const std::string& name, const Value& input, const Args& args);
Result<bool> ApplyTest(Interpreter& in, const std::string& name, const Value& v, const Args& args);
bool HasTest(std::string_view name);
bool HasFilter(std::string_view name);
// Calls a global function or a method bound to a value.
Result<Value> CallBuiltin(Interpreter& in, const Callable& fn, const Args& args);
// A method of a str/dict/list value, or nullopt-like Undefined when the name is not a method.
Value LookupMethod(const Value& obj, const std::string& name);
// The global functions every template sees (range, namespace, dict, raise_exception, strftime_now, ...).
std::shared_ptr<Scope> MakeBuiltinScope();

// String helpers shared by filters and methods.
std::vector<std::string> SplitCodePoints(std::string_view s);
size_t CodePointCount(std::string_view s);
std::string PyStrip(std::string_view s, const Value* chars, bool left, bool right);
std::string PyLower(std::string_view s);
bool CaseIs(std::string_view s, bool upper);  // Python's isupper() / islower()
std::string PyUpper(std::string_view s);
std::string PyTitle(std::string_view s);
std::string PyCapitalize(std::string_view s);
Result<std::vector<std::string>> PySplit(std::string_view s, const Value* sep, int64_t maxsplit);
std::string PyReplace(std::string_view s, std::string_view old, std::string_view repl, int64_t count);

}  // namespace dyn::tmpl
