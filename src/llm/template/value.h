// Template values: the Python object model subset that chat templates see (private header).
//
// Lists, dicts and namespaces are shared by reference like Python objects; strings and scalars
// are values. Dicts keep insertion order. Undefined follows jinja2's default Undefined.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <boost/json/fwd.hpp>

#include "base/status.h"

namespace dyn::tmpl {

class Value;
struct Callable;
struct LoopState;

struct ListObj {
  std::vector<Value> items;
  bool is_tuple = false;
  uint32_t depth = 1;  // nesting depth of containers, bounded so that recursion over values is too
};

struct DictObj {
  std::vector<std::pair<Value, Value>> items;
  uint32_t depth = 1;
  const Value* Find(const Value& key) const;
  const Value* FindStr(std::string_view key) const;
  void Set(Value key, Value value);
};

class Value {
 public:
  enum class Kind : uint8_t { kUndefined, kNone, kBool, kInt, kFloat, kString, kList, kDict, kNamespace, kCallable, kLoop };

  Value() = default;
  static Value Undefined(std::string hint = {}) {
    Value v;
    if (!hint.empty()) v.ptr_ = std::make_shared<const std::string>(std::move(hint));
    return v;
  }
  static Value None() { Value v; v.kind_ = Kind::kNone; return v; }
  static Value Bool(bool b) { Value v; v.kind_ = Kind::kBool; v.i_ = b; return v; }
  static Value Int(int64_t i) { Value v; v.kind_ = Kind::kInt; v.i_ = i; return v; }
  static Value Float(double f) { Value v; v.kind_ = Kind::kFloat; v.f_ = f; return v; }
  static Value Str(std::string s) {
    Value v;
    v.kind_ = Kind::kString;
    if (!s.empty()) v.ptr_ = std::make_shared<const std::string>(std::move(s));
    return v;
  }
  static Value List(std::vector<Value> items, bool is_tuple = false);
  static Value Dict(std::shared_ptr<DictObj> d = nullptr);
  static Value Namespace(std::shared_ptr<DictObj> d);
  static Value Func(std::shared_ptr<Callable> fn);
  static Value Loop(std::shared_ptr<LoopState> loop);

  Kind kind() const { return kind_; }
  bool is_undefined() const { return kind_ == Kind::kUndefined; }
  bool is_none() const { return kind_ == Kind::kNone; }
  bool is_bool() const { return kind_ == Kind::kBool; }
  bool is_int() const { return kind_ == Kind::kInt || kind_ == Kind::kBool; }  // Python: bool is an int
  bool is_number() const { return is_int() || kind_ == Kind::kFloat; }
  bool is_float() const { return kind_ == Kind::kFloat; }
  bool is_string() const { return kind_ == Kind::kString; }
  bool is_list() const { return kind_ == Kind::kList; }
  bool is_dict() const { return kind_ == Kind::kDict; }
  bool is_namespace() const { return kind_ == Kind::kNamespace; }
  bool is_callable() const { return kind_ == Kind::kCallable; }
  bool is_loop() const { return kind_ == Kind::kLoop; }

  bool as_bool() const { return i_ != 0; }
  int64_t as_int() const { return i_; }
  double as_double() const { return kind_ == Kind::kFloat ? f_ : static_cast<double>(i_); }
  // String contents, or undefined's name hint.
  const std::string& str() const {
    return ptr_ && (kind_ == Kind::kString || kind_ == Kind::kUndefined) ? *static_cast<const std::string*>(ptr_.get())
                                                                        : EmptyString();
  }
  ListObj& list() const { return *lp(); }
  DictObj& dict() const { return *dp(); }  // dicts and namespaces
  Callable& fn() const { return *const_cast<Callable*>(static_cast<const Callable*>(ptr_.get())); }
  LoopState& loop() const { return *const_cast<LoopState*>(static_cast<const LoopState*>(ptr_.get())); }

  // Container nesting depth: 0 for scalars, 1 for a flat list or dict.
  uint32_t Depth() const;

  // Python truthiness.
  bool Truthy() const;
  // Python `==`.
  bool Equals(const Value& other) const;
  // Python str(): what `{{ x }}` prints.
  std::string ToStr() const;
  // Python repr(): how values print inside lists and dicts.
  std::string Repr() const;
  // Python type name, for error messages ("str", "int", "dict", ...).
  const char* TypeName() const;

 private:
  Kind kind_ = Kind::kUndefined;
  int64_t i_ = 0;
  double f_ = 0;
  ListObj* lp() const { return const_cast<ListObj*>(static_cast<const ListObj*>(ptr_.get())); }
  DictObj* dp() const { return const_cast<DictObj*>(static_cast<const DictObj*>(ptr_.get())); }

  // The one heap part, by kind: const std::string (strings, undefined's hint), ListObj,
  // DictObj (dicts, namespaces), Callable, LoopState. Strings are shared and immutable, so
  // copying a value (every variable read) copies no text.
  std::shared_ptr<const void> ptr_;

  static const std::string& EmptyString() {
    static const std::string empty;
    return empty;
  }
};

struct Scope;
struct Stmt;

// Something a template can call: a global function, a method bound to a value, or a macro.
struct Callable {
  enum class Type : uint8_t { kBuiltin, kMethod, kMacro, kUnsafe };
  Type type = Type::kBuiltin;
  std::string name;                   // builtin or method name
  Value receiver;                     // kMethod: the value the method is bound to
  const Stmt* macro = nullptr;        // kMacro: the definition (owned by the parsed template)
  std::weak_ptr<Scope> closure;       // kMacro: the scope it was defined in (kept alive by the render)
  std::shared_ptr<Callable> caller;   // kMacro called from a call block: the block body
};

// The `loop` variable of a for loop.
struct LoopState {
  const std::vector<Value>* items = nullptr;
  int64_t index0 = 0;
  int64_t depth0 = 0;
  const Stmt* stmt = nullptr;       // the for statement, for recursive loops
  std::weak_ptr<Scope> scope;       // the scope the loop runs in
  std::vector<Value> changed_last;  // loop.changed() state
  bool changed_called = false;
};

// Deepest container nesting a template may build or receive.
constexpr uint32_t kMaxValueDepth = 128;

// Python's repr() of a float (shortest round-trip: 1.0, 0.1, 1e-05, 1e+16, inf).
std::string FloatRepr(double d);
// Python's repr() of a str.
std::string StrRepr(std::string_view s);
// Python ordering (`<`) for numbers, strings and sequences; error for other types.
Result<bool> Less(const Value& a, const Value& b);

struct JsonDumpOptions {
  bool ensure_ascii = false;
  bool has_indent = false;
  std::string indent;  // the indent unit when has_indent
  std::string item_separator = ", ";
  std::string key_separator = ": ";
  bool sort_keys = false;
};
// Python json.dumps(value, ...). Undefined, callables and namespaces are errors as in Python.
Result<std::string> JsonDumps(const Value& value, const JsonDumpOptions& options, int max_depth = 256);

// JSON -> template value (objects keep insertion order).
Value FromJson(const boost::json::value& json);

}  // namespace dyn::tmpl
