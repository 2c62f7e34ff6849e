#include "llm/template/interpreter.h"

#include <cmath>
#include <limits>
#include <optional>

namespace dyn::tmpl {

const Value* Scope::Find(std::string_view name) const {
  for (const Scope* s = this; s; s = s->parent.get()) {
    for (const auto& [k, v] : s->vars) {
      if (k == name) return &v;
    }
  }
  return nullptr;
}

void Scope::Set(std::string_view name, Value value) {
  for (auto& [k, v] : vars) {
    if (k == name) {
      v = std::move(value);
      return;
    }
  }
  vars.emplace_back(std::string(name), std::move(value));
}

const Value* Args::Get(size_t index, std::string_view name) const {
  if (index < pos.size()) return &pos[index];
  for (const auto& [k, v] : kw) {
    if (k == name) return &v;
  }
  return nullptr;
}

Value Args::GetOr(size_t index, std::string_view name, Value fallback) const {
  const Value* v = Get(index, name);
  return v ? *v : std::move(fallback);
}

namespace {

Status UndefinedError(const Value& v) {
  if (v.str().empty()) return Status::InvalidArgument("value is undefined");
  return Status::InvalidArgument(v.str());
}

Status TypeError(const std::string& message) { return Status::InvalidArgument(message); }

std::string UndefinedHint(const std::string& name) { return "'" + name + "' is undefined"; }

bool MulOverflows(int64_t a, int64_t b, int64_t* out) { return __builtin_mul_overflow(a, b, out); }

}  // namespace

Status Interpreter::Step(uint64_t n) {
  steps_ += n;
  if (steps_ > limits_.max_steps) {
    return Status::ResourceExhausted("template exceeded its step limit (" + std::to_string(limits_.max_steps) + ")");
  }
  return Status::Ok();
}

Status Interpreter::CheckSize(size_t bytes) const {
  if (bytes > limits_.max_output_bytes) {
    return Status::TooLarge("template output exceeds " + std::to_string(limits_.max_output_bytes) + " bytes");
  }
  return Status::Ok();
}

Status Interpreter::Emit(std::string_view text) {
  DYN_RETURN_IF_ERROR(CheckSize(out_->size() + text.size()));
  out_->append(text);
  return Status::Ok();
}

Result<std::string> Interpreter::Run(const Body& body, std::shared_ptr<Scope> globals) {
  std::string out;
  out_ = &out;
  auto flow = ExecBody(body, globals);
  out_ = nullptr;
  closures_.clear();
  if (!flow.ok()) return flow.status();
  return out;
}

Result<std::string> Interpreter::Capture(const Body& body, const std::shared_ptr<Scope>& scope) {
  std::string buffer;
  std::string* saved = out_;
  out_ = &buffer;
  auto flow = ExecBody(body, scope);
  out_ = saved;
  if (!flow.ok()) return flow.status();
  return buffer;
}

Result<Interpreter::Flow> Interpreter::ExecBody(const Body& body, const std::shared_ptr<Scope>& scope) {
  for (const auto& stmt : body) {
    DYN_ASSIGN_OR_RETURN(Flow flow, Exec(*stmt, scope));
    if (flow != Flow::kNormal) return flow;
  }
  return Flow::kNormal;
}

Status Interpreter::Assign(const Expr& target, Value value, const std::shared_ptr<Scope>& scope) {
  if (target.kind == Expr::Kind::kName) {
    scope->Set(target.name, std::move(value));
    return Status::Ok();
  }
  if (target.kind == Expr::Kind::kGetAttr) {
    const Expr& base = *target.children[0];
    const Value* ns = scope->Find(base.name);
    if (!ns || !ns->is_namespace()) return TypeError("cannot assign attribute on non-namespace object");
    if (!target.name.empty() && target.name[0] == '_') return TypeError("cannot assign underscore-prefixed attribute");
    if (value.Depth() + 1 > kMaxValueDepth) return Status::ResourceExhausted("value nested too deeply");
    ns->dict().Set(Value::Str(target.name), std::move(value));
    return Status::Ok();
  }
  // Tuple unpacking.
  DYN_ASSIGN_OR_RETURN(std::vector<Value> items, Iterate(value));
  if (items.size() != target.children.size()) {
    return TypeError("cannot unpack " + std::to_string(items.size()) + " values into " +
                     std::to_string(target.children.size()) + " names");
  }
  for (size_t i = 0; i < items.size(); ++i) DYN_RETURN_IF_ERROR(Assign(*target.children[i], items[i], scope));
  return Status::Ok();
}

Result<Interpreter::Flow> Interpreter::Exec(const Stmt& s, const std::shared_ptr<Scope>& scope) {
  DYN_RETURN_IF_ERROR(Step());
  switch (s.kind) {
    case Stmt::Kind::kText:
      DYN_RETURN_IF_ERROR(Emit(s.text));
      return Flow::kNormal;
    case Stmt::Kind::kPrint: {
      DYN_ASSIGN_OR_RETURN(Value v, Eval(*s.expr, scope));
      if (v.is_string()) DYN_RETURN_IF_ERROR(Emit(v.str()));
      else DYN_RETURN_IF_ERROR(Emit(v.ToStr()));
      return Flow::kNormal;
    }
    case Stmt::Kind::kIf:
      for (size_t i = 0; i < s.conds.size(); ++i) {
        DYN_ASSIGN_OR_RETURN(Value c, Eval(*s.conds[i], scope));
        if (c.Truthy()) return ExecBody(s.bodies[i], scope);
      }
      return ExecBody(s.else_body, scope);
    case Stmt::Kind::kFor: {
      DYN_ASSIGN_OR_RETURN(Value iterable, Eval(*s.expr, scope));
      return ExecFor(s, scope, iterable, 0);
    }
    case Stmt::Kind::kSet: {
      DYN_ASSIGN_OR_RETURN(Value v, Eval(*s.expr, scope));
      DYN_RETURN_IF_ERROR(Assign(*s.target, std::move(v), scope));
      return Flow::kNormal;
    }
    case Stmt::Kind::kSetBlock: {
      DYN_ASSIGN_OR_RETURN(std::string text, Capture(s.body, scope));
      Value v = Value::Str(std::move(text));
      if (s.expr) {
        // The filter chain's innermost input is empty; apply filters from the inside out.
        std::vector<const Expr*> chain;
        for (const Expr* f = s.expr.get(); f; f = f->children[0].get()) chain.push_back(f);
        for (auto it = chain.rbegin(); it != chain.rend(); ++it) {
          Args args;
          DYN_RETURN_IF_ERROR(EvalArgs(**it, 1, scope, args));
          DYN_ASSIGN_OR_RETURN(v, ApplyFilter(*this, (*it)->name, v, args));
        }
      }
      DYN_RETURN_IF_ERROR(Assign(*s.target, std::move(v), scope));
      return Flow::kNormal;
    }
    case Stmt::Kind::kFilterBlock: {
      DYN_ASSIGN_OR_RETURN(std::string text, Capture(s.body, scope));
      Value v = Value::Str(std::move(text));
      std::vector<const Expr*> chain;
      for (const Expr* f = s.expr.get(); f; f = f->children[0].get()) chain.push_back(f);
      for (auto it = chain.rbegin(); it != chain.rend(); ++it) {
        Args args;
        DYN_RETURN_IF_ERROR(EvalArgs(**it, 1, scope, args));
        DYN_ASSIGN_OR_RETURN(v, ApplyFilter(*this, (*it)->name, v, args));
      }
      DYN_RETURN_IF_ERROR(Emit(v.ToStr()));
      return Flow::kNormal;
    }
    case Stmt::Kind::kMacro: {
      auto fn = std::make_shared<Callable>();
      fn->type = Callable::Type::kMacro;
      fn->name = s.name;
      fn->macro = &s;
      fn->closure = scope;
      closures_.push_back(scope);
      scope->Set(s.name, Value::Func(std::move(fn)));
      return Flow::kNormal;
    }
    case Stmt::Kind::kCallBlock: {
      // The block body becomes `caller`, a macro passed to the called macro.
      auto caller = std::make_shared<Callable>();
      caller->type = Callable::Type::kMacro;
      caller->name = "caller";
      caller->macro = &s;
      caller->closure = scope;
      closures_.push_back(scope);
      const Expr& call = *s.expr;
      DYN_ASSIGN_OR_RETURN(Value callee, Eval(*call.children[0], scope));
      Args args;
      DYN_RETURN_IF_ERROR(EvalArgs(call, 1, scope, args));
      if (!callee.is_callable() || callee.fn().type != Callable::Type::kMacro) return TypeError("call block needs a macro");
      Callable bound = callee.fn();
      bound.caller = std::move(caller);
      DYN_ASSIGN_OR_RETURN(Value v, CallMacro(bound, std::move(args)));
      DYN_RETURN_IF_ERROR(Emit(v.ToStr()));
      return Flow::kNormal;
    }
    case Stmt::Kind::kBreak: return Flow::kBreak;
    case Stmt::Kind::kContinue: return Flow::kContinue;
    case Stmt::Kind::kScope: {
      auto inner = std::make_shared<Scope>();
      inner->parent = scope;
      for (const auto& [target, expr] : s.assignments) {
        DYN_ASSIGN_OR_RETURN(Value v, Eval(*expr, scope));
        DYN_RETURN_IF_ERROR(Assign(*target, std::move(v), inner));
      }
      return ExecBody(s.body, inner);
    }
  }
  return Flow::kNormal;
}

Result<Interpreter::Flow> Interpreter::ExecFor(const Stmt& s, const std::shared_ptr<Scope>& scope,
                                               const Value& iterable, int64_t depth0) {
  // Lists are immutable in the sandbox, so a plain list is iterated in place.
  std::vector<Value> owned;
  const std::vector<Value>* items_ptr = &owned;
  if (iterable.is_list() && !s.cond) {
    items_ptr = &iterable.list().items;
  } else {
    DYN_ASSIGN_OR_RETURN(std::vector<Value> all, Iterate(iterable));
    if (s.cond) {
      for (auto& item : all) {
        DYN_RETURN_IF_ERROR(Step());
        auto probe = std::make_shared<Scope>();
        probe->parent = scope;
        DYN_RETURN_IF_ERROR(Assign(*s.target, item, probe));
        DYN_ASSIGN_OR_RETURN(Value keep, Eval(*s.cond, probe));
        if (keep.Truthy()) owned.push_back(std::move(item));
      }
    } else {
      owned = std::move(all);
    }
  }
  const std::vector<Value>& items = *items_ptr;
  if (items.empty()) {
    DYN_ASSIGN_OR_RETURN(Flow flow, ExecBody(s.else_body, scope));
    (void)flow;
    return Flow::kNormal;
  }
  auto loop = std::make_shared<LoopState>();
  loop->items = &items;
  loop->depth0 = depth0;
  loop->stmt = &s;
  loop->scope = scope;
  Value loop_value = Value::Loop(loop);
  std::shared_ptr<Scope> iter_scope;
  for (size_t i = 0; i < items.size(); ++i) {
    DYN_RETURN_IF_ERROR(Step());
    loop->index0 = static_cast<int64_t>(i);
    // Each iteration starts from a fresh scope (jinja2 semantics); reuse the allocation unless
    // something (a macro defined in the body) still holds the previous one.
    if (iter_scope && iter_scope.use_count() == 1) {
      iter_scope->vars.clear();
    } else {
      iter_scope = std::make_shared<Scope>();
      iter_scope->parent = scope;
      iter_scope->vars.reserve(4);
    }
    DYN_RETURN_IF_ERROR(Assign(*s.target, items[i], iter_scope));
    iter_scope->Set("loop", loop_value);
    DYN_ASSIGN_OR_RETURN(Flow flow, ExecBody(s.body, iter_scope));
    if (flow == Flow::kBreak) break;
  }
  loop->items = nullptr;  // `loop` may outlive this frame inside a stored value
  return Flow::kNormal;
}

Status Interpreter::EvalArgs(const Expr& e, size_t first, const std::shared_ptr<Scope>& scope, Args& args) {
  for (size_t i = first; i < e.children.size(); ++i) {
    DYN_ASSIGN_OR_RETURN(Value v, Eval(*e.children[i], scope));
    args.pos.push_back(std::move(v));
  }
  for (const auto& [name, expr] : e.kwargs) {
    DYN_ASSIGN_OR_RETURN(Value v, Eval(*expr, scope));
    args.kw.emplace_back(name, std::move(v));
  }
  return Status::Ok();
}

Result<Value> Interpreter::CallMacro(const Callable& fn, Args args) {
  if (depth_ >= limits_.max_recursion) {
    return Status::ResourceExhausted("template recursion deeper than " + std::to_string(limits_.max_recursion));
  }
  const Stmt& m = *fn.macro;
  auto scope = std::make_shared<Scope>();
  scope->parent = fn.closure.lock();
  std::vector<Value> varargs;
  for (size_t i = 0; i < args.pos.size(); ++i) {
    if (i < m.params.size()) scope->Set(m.params[i], std::move(args.pos[i]));
    else varargs.push_back(std::move(args.pos[i]));
  }
  auto kwargs = std::make_shared<DictObj>();
  for (auto& [k, v] : args.kw) {
    bool is_param = false;
    for (const auto& p : m.params) is_param |= p == k;
    if (is_param) scope->Set(k, std::move(v));
    else kwargs->Set(Value::Str(k), std::move(v));
  }
  for (size_t i = 0; i < m.params.size(); ++i) {
    bool bound = false;
    for (const auto& [k, v] : scope->vars) bound |= k == m.params[i];
    if (bound) continue;
    if (m.defaults[i]) {
      DYN_ASSIGN_OR_RETURN(Value d, Eval(*m.defaults[i], scope));
      scope->Set(m.params[i], std::move(d));
    } else {
      scope->Set(m.params[i], Value::Undefined(UndefinedHint(m.params[i])));
    }
  }
  scope->Set("varargs", Value::List(std::move(varargs), true));
  scope->Set("kwargs", Value::Dict(std::move(kwargs)));
  if (fn.caller) scope->Set("caller", Value::Func(fn.caller));
  ++depth_;
  auto text = Capture(m.body, scope);
  --depth_;
  if (!text.ok()) return text.status();
  return Value::Str(std::move(*text));
}

Result<Value> Interpreter::Call(const Value& callee, Args args) {
  DYN_RETURN_IF_ERROR(Step());
  if (callee.is_undefined()) return UndefinedError(callee);
  if (callee.is_loop()) {
    // loop(items) in a recursive for loop renders the loop body over the children.
    LoopState& loop = callee.loop();
    if (!loop.stmt || !loop.stmt->recursive || args.pos.size() != 1) return TypeError("'LoopContext' is not callable");
    if (depth_ >= limits_.max_recursion) return Status::ResourceExhausted("template recursion too deep");
    std::string buffer;
    std::string* saved = out_;
    out_ = &buffer;
    ++depth_;
    auto loop_scope = loop.scope.lock();
    if (!loop_scope) return TypeError("loop is over");
    auto flow = ExecFor(*loop.stmt, loop_scope, args.pos[0], loop.depth0 + 1);
    --depth_;
    out_ = saved;
    if (!flow.ok()) return flow.status();
    return Value::Str(std::move(buffer));
  }
  if (!callee.is_callable()) return TypeError(std::string("'") + callee.TypeName() + "' object is not callable");
  const Callable& fn = callee.fn();
  if (fn.type == Callable::Type::kMacro) {
    if (fn.macro->kind == Stmt::Kind::kCallBlock) {
      // `caller(...)`: the call block's body with its own parameters.
      Callable as_macro = fn;
      return CallMacro(as_macro, std::move(args));
    }
    return CallMacro(fn, std::move(args));
  }
  if (fn.type == Callable::Type::kUnsafe) {
    return Status::InvalidArgument("access to attribute '" + fn.name + "' of '" + fn.receiver.TypeName() +
                                   "' object is unsafe.");
  }
  return CallBuiltin(*this, fn, args);
}

Result<std::vector<Value>> Interpreter::Iterate(const Value& v) {
  switch (v.kind()) {
    case Value::Kind::kUndefined: return std::vector<Value>{};
    case Value::Kind::kList: return v.list().items;
    case Value::Kind::kDict: {
      std::vector<Value> keys;
      keys.reserve(v.dict().items.size());
      for (const auto& [k, val] : v.dict().items) keys.push_back(k);
      return keys;
    }
    case Value::Kind::kString: {
      std::vector<Value> chars;
      for (auto& c : SplitCodePoints(v.str())) chars.push_back(Value::Str(std::move(c)));
      return chars;
    }
    default: return TypeError(std::string("'") + v.TypeName() + "' object is not iterable");
  }
}

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
