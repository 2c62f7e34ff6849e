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
  stack_top_ = reinterpret_cast<uintptr_t>(__builtin_frame_address(0));
  auto flow = ExecBody(body, globals);
  out_ = nullptr;
  closures_.clear();
  for (const auto& weak : namespaces_) {
    if (auto ns = weak.lock()) ns->items.clear();
  }
  namespaces_.clear();
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

Status Interpreter::EnterFrame() {
  const auto here = reinterpret_cast<uintptr_t>(__builtin_frame_address(0));
  if (eval_depth_ >= kMaxEvalDepth || (stack_top_ > here && stack_top_ - here > kMaxEvalStackBytes)) {
    return Status::ResourceExhausted("template evaluation nested too deeply");
  }
  ++eval_depth_;
  return Status::Ok();
}

Result<Interpreter::Flow> Interpreter::Exec(const Stmt& s, const std::shared_ptr<Scope>& scope) {
  DYN_RETURN_IF_ERROR(EnterFrame());
  struct Unwind {
    int& depth;
    ~Unwind() { --depth; }
  } unwind{eval_depth_};
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

}  // namespace dyn::tmpl
