// jinja2's builtin tests, the predicates of `x is name` (jinja2/tests.py), with Python semantics.
#include <cmath>

#include "llm/template/interpreter.h"

namespace dyn::tmpl {

bool HasTest(std::string_view name) {
  static const char* const kTests[] = {
      "defined", "undefined", "none", "string", "number", "integer", "float", "mapping", "iterable", "sequence",
      "boolean", "true", "false", "callable", "even", "odd", "divisibleby", "eq", "equalto", "==", "ne", "!=",
      "lt", "lessthan", "<", "gt", "greaterthan", ">", "le", "<=", "ge", ">=", "in", "sameas", "lower", "upper",
      "escaped", "filter", "test"};
  for (const char* t : kTests) {
    if (name == t) return true;
  }
  return false;
}

Result<bool> ApplyTest(Interpreter& in, const std::string& name, const Value& v, const Args& a) {
  const Value* arg = a.Get(0, "");
  auto need_arg = [&]() -> Status {
    return arg ? Status::Ok() : Status::InvalidArgument("test '" + name + "' needs an argument");
  };
  if (name == "defined") return !v.is_undefined();
  if (name == "undefined") return v.is_undefined();
  if (name == "none") return v.is_none();
  if (name == "string") return v.is_string();
  if (name == "number") return v.is_number();
  if (name == "integer") return v.kind() == Value::Kind::kInt;
  if (name == "float") return v.is_float();
  if (name == "mapping") return v.is_dict();
  if (name == "iterable") return v.is_undefined() || v.is_string() || v.is_list() || v.is_dict();
  if (name == "sequence") return v.is_undefined() || v.is_string() || v.is_list() || v.is_dict();
  if (name == "boolean") return v.is_bool();
  if (name == "true") return v.is_bool() && v.as_bool();
  if (name == "false") return v.is_bool() && !v.as_bool();
  if (name == "callable") return v.is_callable() || v.is_loop();
  if (name == "escaped") return false;
  if (name == "lower" || name == "upper") return CaseIs(v.ToStr(), name == "upper");
  if (name == "even" || name == "odd" || name == "divisibleby") {
    if (v.is_undefined()) return Status::InvalidArgument(v.str().empty() ? "value is undefined" : v.str());
    int64_t d = 2;
    if (name == "divisibleby") {
      DYN_RETURN_IF_ERROR(need_arg());
      if (!arg->is_int()) return Status::InvalidArgument("divisibleby expects an integer");
      d = arg->as_int();
      if (d == 0) return Status::InvalidArgument("integer division or modulo by zero");
    }
    if (!v.is_int()) {
      if (!v.is_float()) return Status::InvalidArgument(std::string("unsupported operand type for %: '") + v.TypeName() + "'");
      double m = std::fmod(v.as_double(), static_cast<double>(d));
      return name == "odd" ? m != 0 : m == 0;
    }
    int64_t m = v.as_int() % d;
    return name == "odd" ? m != 0 : m == 0;
  }
  if (name == "eq" || name == "equalto" || name == "==") { DYN_RETURN_IF_ERROR(need_arg()); return v.Equals(*arg); }
  if (name == "ne" || name == "!=") { DYN_RETURN_IF_ERROR(need_arg()); return !v.Equals(*arg); }
  if (name == "lt" || name == "lessthan" || name == "<") { DYN_RETURN_IF_ERROR(need_arg()); return Less(v, *arg); }
  if (name == "gt" || name == "greaterthan" || name == ">") { DYN_RETURN_IF_ERROR(need_arg()); return Less(*arg, v); }
  if (name == "le" || name == "<=") { DYN_RETURN_IF_ERROR(need_arg()); DYN_ASSIGN_OR_RETURN(bool gt, Less(*arg, v)); return !gt; }
  if (name == "ge" || name == ">=") { DYN_RETURN_IF_ERROR(need_arg()); DYN_ASSIGN_OR_RETURN(bool lt, Less(v, *arg)); return !lt; }
  if (name == "sameas") {
    DYN_RETURN_IF_ERROR(need_arg());
    if (v.kind() != arg->kind()) return false;
    if (v.is_list()) return &v.list() == &arg->list();
    if (v.is_dict() || v.is_namespace()) return &v.dict() == &arg->dict();
    return v.Equals(*arg);
  }
  if (name == "in") {
    DYN_RETURN_IF_ERROR(need_arg());
    const Value& seq = *arg;
    if (seq.is_string()) {
      if (!v.is_string()) return Status::InvalidArgument(std::string("'in <string>' requires string as left operand, not ") + v.TypeName());
      return seq.str().find(v.str()) != std::string::npos;
    }
    if (seq.is_list()) {
      DYN_RETURN_IF_ERROR(in.Step(seq.list().items.size() / 16));
      for (const auto& item : seq.list().items) {
        if (item.Equals(v)) return true;
      }
      return false;
    }
    if (seq.is_dict()) return seq.dict().Find(v) != nullptr;
    if (seq.is_undefined()) return false;
    return Status::InvalidArgument(std::string("argument of type '") + seq.TypeName() + "' is not iterable");
  }
  if (name == "filter" || name == "test") {
    DYN_RETURN_IF_ERROR(need_arg());
    return v.is_string() && (name == "test" ? HasTest(v.str()) : HasFilter(v.str()));
  }
  return Status::InvalidArgument("No test named '" + name + "'.");
}

}  // namespace dyn::tmpl
