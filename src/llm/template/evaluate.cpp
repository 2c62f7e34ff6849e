// Expression evaluation: names, operators with Python semantics, attribute/item access, slices.
#include <cmath>
#include <limits>
#include <optional>

#include "llm/template/interpreter.h"

namespace dyn::tmpl {

namespace {

Status UndefinedError(const Value& v) {
  if (v.str().empty()) return Status::InvalidArgument("value is undefined");
  return Status::InvalidArgument(v.str());
}

Status TypeError(const std::string& message) { return Status::InvalidArgument(message); }

std::string UndefinedHint(const std::string& name) { return "'" + name + "' is undefined"; }

bool MulOverflows(int64_t a, int64_t b, int64_t* out) { return __builtin_mul_overflow(a, b, out); }

}  // namespace

Result<Value> Interpreter::GetAttr(const Value& obj, const std::string& name) {
  if (obj.is_undefined()) return UndefinedError(obj);
  if (!name.empty() && name[0] == '_') return Value::Undefined(UndefinedHint(name));  // no dunder access
  switch (obj.kind()) {
    case Value::Kind::kDict: {
      Value method = LookupMethod(obj, name);
      if (!method.is_undefined()) return method;
      if (const Value* v = obj.dict().FindStr(name)) return *v;
      return Value::Undefined("'dict object' has no attribute '" + name + "'");
    }
    case Value::Kind::kNamespace:
      if (const Value* v = obj.dict().FindStr(name)) return *v;
      return Value::Undefined("'Namespace object' has no attribute '" + name + "'");
    case Value::Kind::kLoop: {
      const LoopState& l = obj.loop();
      if (!l.items) return Value::Undefined("loop is over");
      int64_t n = static_cast<int64_t>(l.items->size());
      int64_t i = l.index0;
      if (name == "index") return Value::Int(i + 1);
      if (name == "index0") return Value::Int(i);
      if (name == "revindex") return Value::Int(n - i);
      if (name == "revindex0") return Value::Int(n - i - 1);
      if (name == "first") return Value::Bool(i == 0);
      if (name == "last") return Value::Bool(i == n - 1);
      if (name == "length") return Value::Int(n);
      if (name == "depth") return Value::Int(l.depth0 + 1);
      if (name == "depth0") return Value::Int(l.depth0);
      if (name == "previtem") return i > 0 ? (*l.items)[i - 1] : Value::Undefined("there is no previous item");
      if (name == "nextitem") return i + 1 < n ? (*l.items)[i + 1] : Value::Undefined("there is no next item");
      return LookupMethod(obj, name);
    }
    default:
      return LookupMethod(obj, name);
  }
}

Result<Value> Interpreter::GetItem(const Value& obj, const Value& key) {
  if (obj.is_undefined()) return UndefinedError(obj);
  switch (obj.kind()) {
    case Value::Kind::kDict:
      if (const Value* v = obj.dict().Find(key)) return *v;
      if (key.is_string()) return GetAttr(obj, key.str());
      return Value::Undefined("'dict object' has no attribute '" + key.ToStr() + "'");
    case Value::Kind::kList:
    case Value::Kind::kString: {
      if (!key.is_int()) {
        if (key.is_string()) return GetAttr(obj, key.str());
        return Value::Undefined(std::string("'") + obj.TypeName() + " object' has no attribute '" + key.ToStr() + "'");
      }
      int64_t i = key.as_int();
      if (obj.is_list()) {
        int64_t n = static_cast<int64_t>(obj.list().items.size());
        if (i < 0) i += n;
        if (i < 0 || i >= n) return Value::Undefined(std::string("'") + obj.TypeName() + " object' has no element " + key.ToStr());
        return obj.list().items[i];
      }
      std::vector<std::string> cps = SplitCodePoints(obj.str());
      int64_t n = static_cast<int64_t>(cps.size());
      if (i < 0) i += n;
      if (i < 0 || i >= n) return Value::Undefined("'str object' has no element " + key.ToStr());
      return Value::Str(cps[i]);
    }
    default:
      if (key.is_string()) return GetAttr(obj, key.str());
      return Value::Undefined(std::string("'") + obj.TypeName() + " object' has no attribute '" + key.ToStr() + "'");
  }
}

namespace {

Result<Value> Slice(const Value& obj, const Value& start_v, const Value& stop_v, const Value& step_v) {
  auto as_opt = [](const Value& v, const char* what) -> Result<std::optional<int64_t>> {
    if (v.is_undefined() || v.is_none()) return std::optional<int64_t>{};
    if (!v.is_int()) return Status::InvalidArgument(std::string("slice ") + what + " must be an integer");
    return std::optional<int64_t>(v.as_int());
  };
  DYN_ASSIGN_OR_RETURN(auto start, as_opt(start_v, "start"));
  DYN_ASSIGN_OR_RETURN(auto stop, as_opt(stop_v, "stop"));
  DYN_ASSIGN_OR_RETURN(auto step_opt, as_opt(step_v, "step"));
  int64_t step = step_opt.value_or(1);
  if (step == 0) return Status::InvalidArgument("slice step cannot be zero");
  std::vector<std::string> cps;
  int64_t n;
  if (obj.is_list()) {
    n = static_cast<int64_t>(obj.list().items.size());
  } else if (obj.is_string()) {
    cps = SplitCodePoints(obj.str());
    n = static_cast<int64_t>(cps.size());
  } else if (obj.is_undefined()) {
    return UndefinedError(obj);
  } else {
    return Status::InvalidArgument(std::string("'") + obj.TypeName() + "' object is not subscriptable");
  }
  // Python's slice.indices().
  auto clamp = [&](std::optional<int64_t> v, int64_t def) {
    if (!v) return def;
    int64_t x = *v;
    if (x < 0) x = std::max<int64_t>(x + n, step < 0 ? -1 : 0);
    else x = std::min<int64_t>(x, step < 0 ? n - 1 : n);
    return x;
  };
  int64_t lo = clamp(start, step < 0 ? n - 1 : 0);
  int64_t hi = clamp(stop, step < 0 ? -1 : n);
  std::vector<int64_t> idx;
  if (step > 0) for (int64_t i = lo; i < hi; i += step) idx.push_back(i);
  else for (int64_t i = lo; i > hi; i += step) idx.push_back(i);
  if (obj.is_list()) {
    std::vector<Value> out;
    out.reserve(idx.size());
    for (int64_t i : idx) out.push_back(obj.list().items[i]);
    return Value::List(std::move(out), obj.list().is_tuple);
  }
  std::string out;
  for (int64_t i : idx) out += cps[i];
  return Value::Str(std::move(out));
}

}  // namespace

Result<Value> Interpreter::Eval(const Expr& e, const std::shared_ptr<Scope>& scope) {
  DYN_RETURN_IF_ERROR(EnterFrame());
  struct Unwind {
    int& depth;
    ~Unwind() { --depth; }
  } unwind{eval_depth_};
  DYN_RETURN_IF_ERROR(Step());
  switch (e.kind) {
    case Expr::Kind::kLiteral: return e.value;
    case Expr::Kind::kName: {
      if (const Value* v = scope->Find(e.name)) return *v;
      return Value::Undefined(UndefinedHint(e.name));
    }
    case Expr::Kind::kList:
    case Expr::Kind::kTuple: {
      std::vector<Value> items;
      items.reserve(e.children.size());
      for (const auto& c : e.children) {
        DYN_ASSIGN_OR_RETURN(Value v, Eval(*c, scope));
        items.push_back(std::move(v));
      }
      Value list = Value::List(std::move(items), e.kind == Expr::Kind::kTuple);
      if (list.Depth() > kMaxValueDepth) return Status::ResourceExhausted("value nested too deeply");
      return list;
    }
    case Expr::Kind::kDict: {
      auto d = std::make_shared<DictObj>();
      for (size_t i = 0; i + 1 < e.children.size(); i += 2) {
        DYN_ASSIGN_OR_RETURN(Value k, Eval(*e.children[i], scope));
        DYN_ASSIGN_OR_RETURN(Value v, Eval(*e.children[i + 1], scope));
        if (k.is_list() && !k.list().is_tuple) return TypeError("unhashable type: 'list'");
        if (k.is_dict()) return TypeError("unhashable type: 'dict'");
        d->Set(std::move(k), std::move(v));
      }
      if (d->depth > kMaxValueDepth) return Status::ResourceExhausted("value nested too deeply");
      return Value::Dict(std::move(d));
    }
    case Expr::Kind::kGetAttr: {
      DYN_ASSIGN_OR_RETURN(Value obj, Eval(*e.children[0], scope));
      return GetAttr(obj, e.name);
    }
    case Expr::Kind::kGetItem: {
      DYN_ASSIGN_OR_RETURN(Value obj, Eval(*e.children[0], scope));
      DYN_ASSIGN_OR_RETURN(Value key, Eval(*e.children[1], scope));
      return GetItem(obj, key);
    }
    case Expr::Kind::kSlice: {
      DYN_ASSIGN_OR_RETURN(Value obj, Eval(*e.children[0], scope));
      Value parts[3];
      for (int i = 0; i < 3; ++i) {
        if (e.children[i + 1]) { DYN_ASSIGN_OR_RETURN(parts[i], Eval(*e.children[i + 1], scope)); }
      }
      return Slice(obj, parts[0], parts[1], parts[2]);
    }
    case Expr::Kind::kCall: {
      DYN_ASSIGN_OR_RETURN(Value callee, Eval(*e.children[0], scope));
      Args args;
      DYN_RETURN_IF_ERROR(EvalArgs(e, 1, scope, args));
      return Call(callee, std::move(args));
    }
    case Expr::Kind::kFilter: {
      Value input;
      if (e.children[0]) { DYN_ASSIGN_OR_RETURN(input, Eval(*e.children[0], scope)); }
      Args args;
      DYN_RETURN_IF_ERROR(EvalArgs(e, 1, scope, args));
      return ApplyFilter(*this, e.name, input, args);
    }
    case Expr::Kind::kTest: {
      DYN_ASSIGN_OR_RETURN(Value v, Eval(*e.children[0], scope));
      Args args;
      DYN_RETURN_IF_ERROR(EvalArgs(e, 1, scope, args));
      DYN_ASSIGN_OR_RETURN(bool r, ApplyTest(*this, e.name, v, args));
      return Value::Bool(r != e.negated);
    }
    case Expr::Kind::kNeg:
    case Expr::Kind::kPos: {
      DYN_ASSIGN_OR_RETURN(Value v, Eval(*e.children[0], scope));
      if (v.is_undefined()) return UndefinedError(v);
      if (!v.is_number()) return TypeError(std::string("bad operand type for unary -: '") + v.TypeName() + "'");
      if (e.kind == Expr::Kind::kPos) return v.is_float() ? v : Value::Int(v.as_int());
      if (v.is_float()) return Value::Float(-v.as_double());
      if (v.as_int() == std::numeric_limits<int64_t>::min()) return TypeError("integer overflow");
      return Value::Int(-v.as_int());
    }
    case Expr::Kind::kNot: {
      DYN_ASSIGN_OR_RETURN(Value v, Eval(*e.children[0], scope));
      return Value::Bool(!v.Truthy());
    }
    case Expr::Kind::kAnd:
    case Expr::Kind::kOr: {
      DYN_ASSIGN_OR_RETURN(Value a, Eval(*e.children[0], scope));
      if (a.Truthy() == (e.kind == Expr::Kind::kOr)) return a;
      return Eval(*e.children[1], scope);
    }
    case Expr::Kind::kBinary: {
      DYN_ASSIGN_OR_RETURN(Value a, Eval(*e.children[0], scope));
      DYN_ASSIGN_OR_RETURN(Value b, Eval(*e.children[1], scope));
      return EvalBinary(e.name, a, b);
    }
    case Expr::Kind::kCompare: return EvalCompare(e, scope);
    case Expr::Kind::kCondExpr: {
      DYN_ASSIGN_OR_RETURN(Value c, Eval(*e.children[1], scope));
      if (c.Truthy()) return Eval(*e.children[0], scope);
      if (e.children[2]) return Eval(*e.children[2], scope);
      return Value::Undefined("the inline if-expression on line " + std::to_string(e.line) +
                              " evaluated to false and no else section was defined.");
    }
  }
  return Status::Internal("unknown expression");
}

Result<Value> Interpreter::EvalCompare(const Expr& e, const std::shared_ptr<Scope>& scope) {
  DYN_ASSIGN_OR_RETURN(Value left, Eval(*e.children[0], scope));
  for (size_t i = 0; i < e.ops.size(); ++i) {
    DYN_ASSIGN_OR_RETURN(Value right, Eval(*e.children[i + 1], scope));
    const std::string& op = e.ops[i];
    bool r;
    if (op == "==") r = left.Equals(right);
    else if (op == "!=") r = !left.Equals(right);
    else if (op == "in" || op == "notin") {
      DYN_ASSIGN_OR_RETURN(bool in, ApplyTest(*this, "in", left, Args{{right}, {}}));
      r = (op == "in") == in;
    } else {
      if (left.is_undefined()) return UndefinedError(left);
      if (right.is_undefined()) return UndefinedError(right);
      if (op == "<") { DYN_ASSIGN_OR_RETURN(r, Less(left, right)); }
      else if (op == ">") { DYN_ASSIGN_OR_RETURN(r, Less(right, left)); }
      else if (op == "<=") { DYN_ASSIGN_OR_RETURN(bool gt, Less(right, left)); r = !gt; }
      else { DYN_ASSIGN_OR_RETURN(bool lt, Less(left, right)); r = !lt; }
    }
    if (!r) return Value::Bool(false);
    left = std::move(right);
  }
  return Value::Bool(true);
}

Result<Value> Interpreter::EvalBinary(const std::string& op, const Value& a, const Value& b) {
  if (op == "~") {
    std::string s = a.ToStr() + b.ToStr();
    DYN_RETURN_IF_ERROR(CheckSize(s.size()));
    return Value::Str(std::move(s));
  }
  if (a.is_undefined()) return UndefinedError(a);
  if (b.is_undefined()) return UndefinedError(b);
  auto type_error = [&]() {
    return TypeError(std::string("unsupported operand type(s) for ") + op + ": '" + a.TypeName() + "' and '" +
                     b.TypeName() + "'");
  };
  if (a.is_number() && b.is_number()) {
    bool ints = !a.is_float() && !b.is_float();
    int64_t x = a.as_int(), y = b.as_int(), r = 0;
    double fx = a.as_double(), fy = b.as_double();
    if (op == "+") {
      if (!ints) return Value::Float(fx + fy);
      if (__builtin_add_overflow(x, y, &r)) return TypeError("integer overflow");
      return Value::Int(r);
    }
    if (op == "-") {
      if (!ints) return Value::Float(fx - fy);
      if (__builtin_sub_overflow(x, y, &r)) return TypeError("integer overflow");
      return Value::Int(r);
    }
    if (op == "*") {
      if (!ints) return Value::Float(fx * fy);
      if (MulOverflows(x, y, &r)) return TypeError("integer overflow");
      return Value::Int(r);
    }
    if (op == "/") {
      if (fy == 0) return Status::InvalidArgument("division by zero");
      return Value::Float(fx / fy);
    }
    if (op == "//" || op == "%") {
      if (ints ? y == 0 : fy == 0) return Status::InvalidArgument("integer division or modulo by zero");
      if (ints) {
        if (x == std::numeric_limits<int64_t>::min() && y == -1) return TypeError("integer overflow");
        int64_t q = x / y, m = x % y;
        if (m != 0 && ((m < 0) != (y < 0))) {
          --q;
          m += y;
        }
        return op == "//" ? Value::Int(q) : Value::Int(m);
      }
      double m = std::fmod(fx, fy);
      if (m != 0 && ((m < 0) != (fy < 0))) m += fy;
      if (op == "%") return Value::Float(m);
      return Value::Float(std::floor((fx - m) / fy + 0.5 - 0.5));
    }
    if (op == "**") {
      if (ints && y >= 0) {
        int64_t result = 1, base = x;
        for (int64_t e = y; e > 0; e >>= 1) {
          if (e & 1 && MulOverflows(result, base, &result)) return TypeError("integer overflow");
          if (e > 1 && MulOverflows(base, base, &base)) return TypeError("integer overflow");
        }
        return Value::Int(result);
      }
      if (fx == 0 && fy < 0) return Status::InvalidArgument("0.0 cannot be raised to a negative power");
      return Value::Float(std::pow(fx, fy));
    }
    return type_error();
  }
  if (op == "+") {
    if (a.is_string() && b.is_string()) {
      DYN_RETURN_IF_ERROR(CheckSize(a.str().size() + b.str().size()));
      return Value::Str(a.str() + b.str());
    }
    if (a.is_list() && b.is_list() && a.list().is_tuple == b.list().is_tuple) {
      if (a.list().items.size() + b.list().items.size() > kMaxContainerItems) return Status::TooLarge("list too large");
      DYN_RETURN_IF_ERROR(Step(a.list().items.size() + b.list().items.size()));
      std::vector<Value> items = a.list().items;
      items.insert(items.end(), b.list().items.begin(), b.list().items.end());
      return Value::List(std::move(items), a.list().is_tuple);
    }
    if (a.is_string() || a.is_list()) {
      const char* t = a.is_string() ? "str" : a.TypeName();
      return TypeError(std::string("can only concatenate ") + t + " (not \"" + b.TypeName() + "\") to " + t);
    }
    return type_error();
  }
  if (op == "*" && (a.is_int() || b.is_int()) && (a.is_string() || b.is_string() || a.is_list() || b.is_list())) {
    const Value& seq = a.is_int() ? b : a;
    int64_t n = std::max<int64_t>(0, a.is_int() ? a.as_int() : b.as_int());
    if (seq.is_string()) {
      if (!seq.str().empty() && static_cast<uint64_t>(n) > limits_.max_output_bytes / seq.str().size()) {
        return Status::TooLarge("string repetition exceeds " + std::to_string(limits_.max_output_bytes) + " bytes");
      }
      std::string out;
      out.reserve(seq.str().size() * n);
      for (int64_t i = 0; i < n; ++i) out += seq.str();
      return Value::Str(std::move(out));
    }
    size_t len = seq.list().items.size();
    if (len && static_cast<uint64_t>(n) > kMaxContainerItems / len) return Status::TooLarge("list repetition too large");
    DYN_RETURN_IF_ERROR(Step(len * n));
    std::vector<Value> items;
    for (int64_t i = 0; i < n; ++i) items.insert(items.end(), seq.list().items.begin(), seq.list().items.end());
    return Value::List(std::move(items), seq.list().is_tuple);
  }
  if (op == "%" && a.is_string()) return Status::Unsupported("printf-style string formatting is not supported");
  return type_error();
}

}  // namespace dyn::tmpl
