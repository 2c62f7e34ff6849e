// Token cursor and jinja2's expression grammar (private header): operator precedence as in
// jinja2/parser.py, nesting bounded so hostile input cannot exhaust the stack. The statement
// parser (parser.cpp) extends it.
#pragma once

#include <algorithm>
#include <string>
#include <vector>

#include "base/status.h"
#include "llm/template/ast.h"
#include "llm/template/lexer.h"

namespace dyn::tmpl {

constexpr int kMaxNesting = 100;      // parser recursion (parentheses, unary operators, blocks)
constexpr int kMaxExprHeight = 256;   // expression tree height

class ExpressionParser {
 public:
  explicit ExpressionParser(const std::vector<Token>& tokens) : toks_(tokens) {}

 protected:
  // Depth guard for recursive productions.
  class Nest {
   public:
    explicit Nest(int& depth) : depth_(depth) { ++depth_; }
    ~Nest() { --depth_; }
    bool too_deep() const { return depth_ > kMaxNesting; }

   private:
    int& depth_;
  };

  const Token& Cur() const { return toks_[pos_]; }
  const Token& Peek(size_t n = 1) const { return toks_[std::min(pos_ + n, toks_.size() - 1)]; }
  void Next() {
    if (pos_ + 1 < toks_.size()) ++pos_;
  }
  bool IsOp(const char* op) const { return Cur().type == TokenType::kOp && Cur().value == op; }
  bool IsName(const char* name) const { return Cur().type == TokenType::kName && Cur().value == name; }
  bool SkipOp(const char* op) {
    if (!IsOp(op)) return false;
    Next();
    return true;
  }
  bool SkipName(const char* name) {
    if (!IsName(name)) return false;
    Next();
    return true;
  }
  Status Error(const std::string& message) const {
    return Status::InvalidArgument("template syntax error: " + message + " (line " + std::to_string(Cur().line) + ")");
  }
  std::string Describe() const {
    switch (Cur().type) {
      case TokenType::kEof: return "end of template";
      case TokenType::kBlockEnd: return "end of statement block";
      case TokenType::kVarEnd: return "end of print statement";
      default: return "'" + Cur().value + "'";
    }
  }
  Status ExpectOp(const char* op) {
    if (SkipOp(op)) return Status::Ok();
    return Error(std::string("expected '") + op + "', got " + Describe());
  }
  Status ExpectBlockEnd() {
    if (Cur().type == TokenType::kBlockEnd) {
      Next();
      return Status::Ok();
    }
    return Error("expected end of statement block, got " + Describe());
  }
  Result<std::string> ExpectName() {
    if (Cur().type != TokenType::kName) return Error("expected name, got " + Describe());
    std::string name = Cur().value;
    Next();
    return name;
  }

  // Records a composite node's height and rejects trees too tall to evaluate or destroy
  // recursively (left-deep chains such as 1+1+1+... are built by loops, not recursion).
  Status Seal(Expr& e) const {
    int height = 1;
    for (const auto& c : e.children) {
      if (c) height = std::max(height, c->height + 1);
    }
    for (const auto& kv : e.kwargs) height = std::max(height, kv.second->height + 1);
    e.height = height;
    if (height > kMaxExprHeight) return Error("expression too deeply nested");
    return Status::Ok();
  }

  ExprPtr Make(Expr::Kind kind) {
    auto e = std::make_unique<Expr>();
    e->kind = kind;
    e->line = Cur().line;
    return e;
  }
  StmtPtr MakeStmt(Stmt::Kind kind) {
    auto s = std::make_unique<Stmt>();
    s->kind = kind;
    s->line = Cur().line;
    return s;
  }


  // name | name.attr (with_namespace) | name, name, ... | (name, name)
  Result<ExprPtr> ParseAssignTarget(bool with_namespace) {
    auto one = [&]() -> Result<ExprPtr> {
      if (SkipOp("(")) {
        DYN_ASSIGN_OR_RETURN(ExprPtr inner, ParseAssignTarget(false));
        DYN_RETURN_IF_ERROR(ExpectOp(")"));
        return inner;
      }
      auto e = Make(Expr::Kind::kName);
      DYN_ASSIGN_OR_RETURN(e->name, ExpectName());
      if (with_namespace && SkipOp(".")) {
        auto attr = Make(Expr::Kind::kGetAttr);
        DYN_ASSIGN_OR_RETURN(attr->name, ExpectName());
        attr->children.push_back(std::move(e));
        return attr;
      }
      return e;
    };
    DYN_ASSIGN_OR_RETURN(ExprPtr first, one());
    if (!IsOp(",")) return first;
    auto tuple = Make(Expr::Kind::kTuple);
    tuple->children.push_back(std::move(first));
    while (SkipOp(",")) {
      if (Cur().type != TokenType::kName && !IsOp("(")) break;
      DYN_ASSIGN_OR_RETURN(ExprPtr next, one());
      tuple->children.push_back(std::move(next));
    }
    return tuple;
  }

  bool AtTupleEnd() const {
    const Token& t = Cur();
    if (t.type == TokenType::kVarEnd || t.type == TokenType::kBlockEnd || t.type == TokenType::kEof) return true;
    if (t.type == TokenType::kOp && (t.value == ")" || t.value == "]" || t.value == "}" || t.value == "=")) return true;
    return t.type == TokenType::kName && (t.value == "in" || t.value == "recursive" || t.value == "if");
  }

  // expr, expr, ... -> a tuple when a comma appears.
  Result<ExprPtr> ParseTuple(bool with_condexpr) {
    auto one = [&]() { return with_condexpr ? ParseExpression() : ParseOr(); };
    int line = Cur().line;
    DYN_ASSIGN_OR_RETURN(ExprPtr first, one());
    if (!IsOp(",")) return first;
    auto tuple = Make(Expr::Kind::kTuple);
    tuple->line = line;
    tuple->children.push_back(std::move(first));
    while (SkipOp(",")) {
      if (AtTupleEnd()) break;
      DYN_ASSIGN_OR_RETURN(ExprPtr next, one());
      tuple->children.push_back(std::move(next));
    }
    DYN_RETURN_IF_ERROR(Seal(*tuple));
    return tuple;
  }

  Result<ExprPtr> ParseExpression() {
    Nest nest(expr_depth_);
    if (nest.too_deep()) return Error("expression nested too deeply");
    DYN_ASSIGN_OR_RETURN(ExprPtr value, ParseOr());
    while (SkipName("if")) {
      auto cond = Make(Expr::Kind::kCondExpr);
      DYN_ASSIGN_OR_RETURN(ExprPtr test, ParseOr());
      ExprPtr otherwise;
      if (SkipName("else")) { DYN_ASSIGN_OR_RETURN(otherwise, ParseExpression()); }
      cond->children.push_back(std::move(value));
      cond->children.push_back(std::move(test));
      cond->children.push_back(std::move(otherwise));
      DYN_RETURN_IF_ERROR(Seal(*cond));
      value = std::move(cond);
    }
    return value;
  }

  Result<ExprPtr> Binary(Expr::Kind kind, std::string op, ExprPtr a, ExprPtr b) {
    auto e = Make(kind);
    e->name = std::move(op);
    e->children.push_back(std::move(a));
    e->children.push_back(std::move(b));
    DYN_RETURN_IF_ERROR(Seal(*e));
    return e;
  }

  Result<ExprPtr> ParseOr() {
    DYN_ASSIGN_OR_RETURN(ExprPtr left, ParseAnd());
    while (SkipName("or")) {
      DYN_ASSIGN_OR_RETURN(ExprPtr right, ParseAnd());
      DYN_ASSIGN_OR_RETURN(left, Binary(Expr::Kind::kOr, "or", std::move(left), std::move(right)));
    }
    return left;
  }

  Result<ExprPtr> ParseAnd() {
    DYN_ASSIGN_OR_RETURN(ExprPtr left, ParseNot());
    while (SkipName("and")) {
      DYN_ASSIGN_OR_RETURN(ExprPtr right, ParseNot());
      DYN_ASSIGN_OR_RETURN(left, Binary(Expr::Kind::kAnd, "and", std::move(left), std::move(right)));
    }
    return left;
  }

  Result<ExprPtr> ParseNot() {
    Nest nest(expr_depth_);
    if (nest.too_deep()) return Error("expression nested too deeply");
    if (SkipName("not")) {
      auto e = Make(Expr::Kind::kNot);
      DYN_ASSIGN_OR_RETURN(ExprPtr inner, ParseNot());
      e->children.push_back(std::move(inner));
      DYN_RETURN_IF_ERROR(Seal(*e));
      return e;
    }
    return ParseCompare();
  }

  Result<ExprPtr> ParseCompare() {
    DYN_ASSIGN_OR_RETURN(ExprPtr first, ParseMath1());
    ExprPtr cmp;
    while (true) {
      std::string op;
      const Token& t = Cur();
      if (t.type == TokenType::kOp &&
          (t.value == "==" || t.value == "!=" || t.value == "<" || t.value == ">" || t.value == "<=" || t.value == ">=")) {
        op = t.value;
        Next();
      } else if (IsName("in")) {
        op = "in";
        Next();
      } else if (IsName("not") && Peek().type == TokenType::kName && Peek().value == "in") {
        op = "notin";
        Next();
        Next();
      } else {
        break;
      }
      DYN_ASSIGN_OR_RETURN(ExprPtr rhs, ParseMath1());
      if (!cmp) {
        cmp = Make(Expr::Kind::kCompare);
        cmp->children.push_back(std::move(first));
      }
      cmp->ops.push_back(op);
      cmp->children.push_back(std::move(rhs));
    }
    if (cmp) DYN_RETURN_IF_ERROR(Seal(*cmp));
    return cmp ? std::move(cmp) : std::move(first);
  }

  Result<ExprPtr> ParseMath1() {
    DYN_ASSIGN_OR_RETURN(ExprPtr left, ParseConcat());
    while (IsOp("+") || IsOp("-")) {
      std::string op = Cur().value;
      Next();
      DYN_ASSIGN_OR_RETURN(ExprPtr right, ParseConcat());
      DYN_ASSIGN_OR_RETURN(left, Binary(Expr::Kind::kBinary, op, std::move(left), std::move(right)));
    }
    return left;
  }

  Result<ExprPtr> ParseConcat() {
    DYN_ASSIGN_OR_RETURN(ExprPtr left, ParseMath2());
    while (SkipOp("~")) {
      DYN_ASSIGN_OR_RETURN(ExprPtr right, ParseMath2());
      DYN_ASSIGN_OR_RETURN(left, Binary(Expr::Kind::kBinary, "~", std::move(left), std::move(right)));
    }
    return left;
  }

  Result<ExprPtr> ParseMath2() {
    DYN_ASSIGN_OR_RETURN(ExprPtr left, ParsePow());
    while (IsOp("*") || IsOp("/") || IsOp("//") || IsOp("%")) {
      std::string op = Cur().value;
      Next();
      DYN_ASSIGN_OR_RETURN(ExprPtr right, ParsePow());
      DYN_ASSIGN_OR_RETURN(left, Binary(Expr::Kind::kBinary, op, std::move(left), std::move(right)));
    }
    return left;
  }

  Result<ExprPtr> ParsePow() {
    DYN_ASSIGN_OR_RETURN(ExprPtr left, ParseUnary(true));
    while (SkipOp("**")) {
      DYN_ASSIGN_OR_RETURN(ExprPtr right, ParseUnary(true));
      DYN_ASSIGN_OR_RETURN(left, Binary(Expr::Kind::kBinary, "**", std::move(left), std::move(right)));
    }
    return left;
  }

  Result<ExprPtr> ParseUnary(bool with_filter) {
    Nest nest(expr_depth_);
    if (nest.too_deep()) return Error("expression nested too deeply");
    ExprPtr node;
    if (IsOp("-") || IsOp("+")) {
      node = Make(IsOp("-") ? Expr::Kind::kNeg : Expr::Kind::kPos);
      Next();
      DYN_ASSIGN_OR_RETURN(ExprPtr inner, ParseUnary(false));
      node->children.push_back(std::move(inner));
      DYN_RETURN_IF_ERROR(Seal(*node));
    } else {
      DYN_ASSIGN_OR_RETURN(node, ParsePrimary());
    }
    DYN_ASSIGN_OR_RETURN(node, ParsePostfix(std::move(node)));
    if (with_filter) { DYN_ASSIGN_OR_RETURN(node, ParseFilterExpr(std::move(node))); }
    return node;
  }

  Result<ExprPtr> ParsePrimary() {
    const Token& t = Cur();
    if (t.type == TokenType::kName) {
      auto e = Make(Expr::Kind::kLiteral);
      const std::string& n = t.value;
      if (n == "true" || n == "True") e->value = Value::Bool(true);
      else if (n == "false" || n == "False") e->value = Value::Bool(false);
      else if (n == "none" || n == "None") e->value = Value::None();
      else {
        e->kind = Expr::Kind::kName;
        e->name = n;
      }
      Next();
      return e;
    }
    if (t.type == TokenType::kString) {
      std::string s;
      while (Cur().type == TokenType::kString) {  // adjacent literals concatenate
        s += Cur().value;
        Next();
      }
      auto e = Make(Expr::Kind::kLiteral);
      e->value = Value::Str(std::move(s));
      return e;
    }
    if (t.type == TokenType::kInt || t.type == TokenType::kFloat) {
      auto e = Make(Expr::Kind::kLiteral);
      e->value = t.type == TokenType::kInt ? Value::Int(t.int_value) : Value::Float(t.float_value);
      Next();
      return e;
    }
    if (SkipOp("(")) {
      if (SkipOp(")")) return Make(Expr::Kind::kTuple);
      DYN_ASSIGN_OR_RETURN(ExprPtr e, ParseTuple(true));
      DYN_RETURN_IF_ERROR(ExpectOp(")"));
      return e;
    }
    if (IsOp("[") || IsOp("{")) {
      bool is_dict = IsOp("{");
      const char* close = is_dict ? "}" : "]";
      auto e = Make(is_dict ? Expr::Kind::kDict : Expr::Kind::kList);
      Next();
      while (!IsOp(close)) {
        if (!e->children.empty()) DYN_RETURN_IF_ERROR(ExpectOp(","));
        if (IsOp(close)) break;
        DYN_ASSIGN_OR_RETURN(ExprPtr item, ParseExpression());
        e->children.push_back(std::move(item));
        if (is_dict) {
          DYN_RETURN_IF_ERROR(ExpectOp(":"));
          DYN_ASSIGN_OR_RETURN(ExprPtr value, ParseExpression());
          e->children.push_back(std::move(value));
        }
      }
      Next();
      DYN_RETURN_IF_ERROR(Seal(*e));
      return e;
    }
    return Error("unexpected " + Describe());
  }

  Result<ExprPtr> ParsePostfix(ExprPtr node) {
    while (true) {
      if (SkipOp(".")) {
        auto e = Make(Expr::Kind::kGetAttr);
        if (Cur().type == TokenType::kName) {
          e->name = Cur().value;
        } else if (Cur().type == TokenType::kInt) {
          e->kind = Expr::Kind::kGetItem;
          auto idx = Make(Expr::Kind::kLiteral);
          idx->value = Value::Int(Cur().int_value);
          e->children.push_back(std::move(node));
          e->children.push_back(std::move(idx));
          Next();
          DYN_RETURN_IF_ERROR(Seal(*e));
          node = std::move(e);
          continue;
        } else {
          return Error("expected name or number after '.'");
        }
        Next();
        e->children.push_back(std::move(node));
        DYN_RETURN_IF_ERROR(Seal(*e));
        node = std::move(e);
      } else if (IsOp("[")) {
        DYN_ASSIGN_OR_RETURN(node, ParseSubscript(std::move(node)));
      } else if (IsOp("(")) {
        DYN_ASSIGN_OR_RETURN(node, ParseCall(std::move(node)));
      } else {
        return node;
      }
    }
  }

  Result<ExprPtr> ParseSubscript(ExprPtr node) {
    Next();  // [
    ExprPtr parts[3];
    bool is_slice = false;
    int part = 0;
    while (!IsOp("]")) {
      if (SkipOp(":")) {
        is_slice = true;
        if (++part > 2) return Error("too many ':' in slice");
        continue;
      }
      if (parts[part]) return Error("expected ']', got " + Describe());
      DYN_ASSIGN_OR_RETURN(parts[part], ParseExpression());
    }
    Next();
    auto e = Make(is_slice ? Expr::Kind::kSlice : Expr::Kind::kGetItem);
    e->children.push_back(std::move(node));
    if (!is_slice && !parts[0]) return Error("expected subscript expression");
    for (int i = 0; i < (is_slice ? 3 : 1); ++i) e->children.push_back(std::move(parts[i]));
    DYN_RETURN_IF_ERROR(Seal(*e));
    return e;
  }

  Status ParseArgs(Expr& e) {
    DYN_RETURN_IF_ERROR(ExpectOp("("));
    bool first = true;
    while (!IsOp(")")) {
      if (!first) DYN_RETURN_IF_ERROR(ExpectOp(","));
      first = false;
      if (IsOp(")")) break;
      if (Cur().type == TokenType::kName && Peek().type == TokenType::kOp && Peek().value == "=") {
        std::string key = Cur().value;
        Next();
        Next();
        DYN_ASSIGN_OR_RETURN(ExprPtr value, ParseExpression());
        e.kwargs.emplace_back(std::move(key), std::move(value));
        continue;
      }
      if (!e.kwargs.empty()) return Error("positional argument follows keyword argument");
      DYN_ASSIGN_OR_RETURN(ExprPtr arg, ParseExpression());
      e.children.push_back(std::move(arg));
    }
    Next();
    return Status::Ok();
  }

  Result<ExprPtr> ParseCall(ExprPtr callee) {
    auto e = Make(Expr::Kind::kCall);
    e->children.push_back(std::move(callee));
    DYN_RETURN_IF_ERROR(ParseArgs(*e));
    DYN_RETURN_IF_ERROR(Seal(*e));
    return e;
  }

  Result<std::string> ParseDottedName() {
    DYN_ASSIGN_OR_RETURN(std::string name, ExpectName());
    while (SkipOp(".")) {
      DYN_ASSIGN_OR_RETURN(std::string part, ExpectName());
      name += "." + part;
    }
    return name;
  }

  // A filter chain `| f(args) | g` applied to `input` (null inside filter blocks).
  Result<ExprPtr> ParseFilterChain(ExprPtr input) {
    bool first = true;
    while (first || IsOp("|")) {
      if (!(first && !input && !IsOp("|"))) DYN_RETURN_IF_ERROR(ExpectOp("|"));
      first = false;
      auto e = Make(Expr::Kind::kFilter);
      DYN_ASSIGN_OR_RETURN(e->name, ParseDottedName());
      e->children.push_back(std::move(input));
      if (IsOp("(")) DYN_RETURN_IF_ERROR(ParseArgs(*e));
      DYN_RETURN_IF_ERROR(Seal(*e));
      input = std::move(e);
    }
    return input;
  }

  Result<ExprPtr> ParseFilterExpr(ExprPtr node) {
    while (true) {
      if (IsOp("|")) {
        Next();
        auto e = Make(Expr::Kind::kFilter);
        DYN_ASSIGN_OR_RETURN(e->name, ParseDottedName());
        e->children.push_back(std::move(node));
        if (IsOp("(")) DYN_RETURN_IF_ERROR(ParseArgs(*e));
        DYN_RETURN_IF_ERROR(Seal(*e));
        node = std::move(e);
      } else if (IsName("is")) {
        Next();
        auto e = Make(Expr::Kind::kTest);
        e->negated = SkipName("not");
        DYN_ASSIGN_OR_RETURN(e->name, ParseDottedName());
        e->children.push_back(std::move(node));
        const Token& t = Cur();
        bool bare_arg = t.type == TokenType::kString || t.type == TokenType::kInt || t.type == TokenType::kFloat ||
                        (t.type == TokenType::kOp && (t.value == "[" || t.value == "{")) ||
                        (t.type == TokenType::kName && t.value != "else" && t.value != "or" && t.value != "and");
        if (IsOp("(")) {
          DYN_RETURN_IF_ERROR(ParseArgs(*e));
        } else if (bare_arg) {
          DYN_ASSIGN_OR_RETURN(ExprPtr arg, ParsePrimary());
          DYN_ASSIGN_OR_RETURN(arg, ParsePostfix(std::move(arg)));
          e->children.push_back(std::move(arg));
        }
        DYN_RETURN_IF_ERROR(Seal(*e));
        node = std::move(e);
      } else if (IsOp("(")) {
        DYN_ASSIGN_OR_RETURN(node, ParseCall(std::move(node)));
      } else {
        return node;
      }
    }
  }


  const std::vector<Token>& toks_;
  size_t pos_ = 0;
  int expr_depth_ = 0;
  int stmt_depth_ = 0;
  int loop_depth_ = 0;
};

}  // namespace dyn::tmpl
