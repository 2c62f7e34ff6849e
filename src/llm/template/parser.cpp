// Statement parser: template text, {{ }} and {% %} blocks on top of the expression grammar.
#include <initializer_list>

#include "llm/template/expression_parser.h"

namespace dyn::tmpl {
namespace {

class Parser : public ExpressionParser {
 public:
  using ExpressionParser::ExpressionParser;

  Result<Body> ParseAll() {
    std::string end;
    DYN_ASSIGN_OR_RETURN(Body body, ParseBody({}, &end));
    if (!end.empty()) return Error("Encountered unknown tag '" + end + "'");
    return body;
  }

 private:
  // Parses statements until a block tag whose name is in `ends`; consumes that name and sets *end.
  Result<Body> ParseBody(std::initializer_list<const char*> ends, std::string* end) {
    Nest nest(stmt_depth_);
    if (nest.too_deep()) return Error("statements nested too deeply");
    Body body;
    end->clear();
    while (true) {
      const Token& t = Cur();
      if (t.type == TokenType::kEof) {
        if (ends.size() == 0) return body;
        return Error(std::string("unexpected end of template, expected '") + *ends.begin() + "'");
      }
      if (t.type == TokenType::kData) {
        auto s = MakeStmt(Stmt::Kind::kText);
        s->text = t.value;
        body.push_back(std::move(s));
        Next();
        continue;
      }
      if (t.type == TokenType::kVarBegin) {
        Next();
        auto s = MakeStmt(Stmt::Kind::kPrint);
        DYN_ASSIGN_OR_RETURN(s->expr, ParseTuple(true));
        if (Cur().type != TokenType::kVarEnd) return Error("expected end of print statement, got " + Describe());
        Next();
        body.push_back(std::move(s));
        continue;
      }
      if (t.type != TokenType::kBlockBegin) return Error("unexpected " + Describe());
      Next();
      if (Cur().type != TokenType::kName) return Error("tag name expected");
      for (const char* e : ends) {
        if (Cur().value == e) {
          *end = e;
          Next();
          return body;
        }
      }
      DYN_ASSIGN_OR_RETURN(StmtPtr stmt, ParseStatement());
      body.push_back(std::move(stmt));
    }
  }

  Result<StmtPtr> ParseStatement() {
    std::string tag = Cur().value;
    Next();
    std::string end;
    if (tag == "if") return ParseIf();
    if (tag == "for") return ParseFor();
    if (tag == "set") return ParseSet();
    if (tag == "macro") return ParseMacro();
    if (tag == "call") return ParseCallBlock();
    if (tag == "break" || tag == "continue") {
      auto s = MakeStmt(tag == "break" ? Stmt::Kind::kBreak : Stmt::Kind::kContinue);
      if (loop_depth_ == 0) return Error("'" + tag + "' outside of a loop");
      DYN_RETURN_IF_ERROR(ExpectBlockEnd());
      return s;
    }
    if (tag == "filter") {
      auto s = MakeStmt(Stmt::Kind::kFilterBlock);
      DYN_ASSIGN_OR_RETURN(s->expr, ParseFilterChain(nullptr));
      DYN_RETURN_IF_ERROR(ExpectBlockEnd());
      DYN_ASSIGN_OR_RETURN(s->body, ParseBody({"endfilter"}, &end));
      DYN_RETURN_IF_ERROR(ExpectBlockEnd());
      return s;
    }
    if (tag == "generation" || tag == "block" || tag == "with") {
      auto s = MakeStmt(Stmt::Kind::kScope);
      if (tag == "block") {
        DYN_ASSIGN_OR_RETURN(s->name, ExpectName());
        SkipName("scoped");
        SkipName("required");
      }
      while (tag == "with" && Cur().type != TokenType::kBlockEnd) {
        if (!s->assignments.empty()) DYN_RETURN_IF_ERROR(ExpectOp(","));
        DYN_ASSIGN_OR_RETURN(ExprPtr target, ParseAssignTarget(false));
        DYN_RETURN_IF_ERROR(ExpectOp("="));
        DYN_ASSIGN_OR_RETURN(ExprPtr value, ParseExpression());
        s->assignments.emplace_back(std::move(target), std::move(value));
      }
      DYN_RETURN_IF_ERROR(ExpectBlockEnd());
      std::string end_tag = "end" + tag;
      DYN_ASSIGN_OR_RETURN(s->body, ParseBody({end_tag.c_str()}, &end));
      if (tag == "block" && Cur().type == TokenType::kName) Next();
      DYN_RETURN_IF_ERROR(ExpectBlockEnd());
      return s;
    }
    --pos_;
    return Error("Encountered unknown tag '" + tag + "'");
  }

  Result<StmtPtr> ParseIf() {
    auto s = MakeStmt(Stmt::Kind::kIf);
    std::string end;
    while (true) {
      DYN_ASSIGN_OR_RETURN(ExprPtr cond, ParseTuple(false));
      DYN_RETURN_IF_ERROR(ExpectBlockEnd());
      DYN_ASSIGN_OR_RETURN(Body body, ParseBody({"elif", "else", "endif"}, &end));
      s->conds.push_back(std::move(cond));
      s->bodies.push_back(std::move(body));
      if (end == "elif") continue;
      if (end == "else") {
        DYN_RETURN_IF_ERROR(ExpectBlockEnd());
        DYN_ASSIGN_OR_RETURN(s->else_body, ParseBody({"endif"}, &end));
      }
      DYN_RETURN_IF_ERROR(ExpectBlockEnd());
      return s;
    }
  }

  Result<StmtPtr> ParseFor() {
    auto s = MakeStmt(Stmt::Kind::kFor);
    DYN_ASSIGN_OR_RETURN(s->target, ParseAssignTarget(false));
    if (!SkipName("in")) return Error("expected 'in', got " + Describe());
    DYN_ASSIGN_OR_RETURN(s->expr, ParseTuple(false));
    if (SkipName("if")) { DYN_ASSIGN_OR_RETURN(s->cond, ParseExpression()); }
    if (SkipName("recursive")) s->recursive = true;
    DYN_RETURN_IF_ERROR(ExpectBlockEnd());
    std::string end;
    ++loop_depth_;
    auto body = ParseBody({"endfor", "else"}, &end);
    --loop_depth_;
    if (!body.ok()) return body.status();
    s->body = std::move(*body);
    if (end == "else") {
      DYN_RETURN_IF_ERROR(ExpectBlockEnd());
      int saved = loop_depth_;
      loop_depth_ = 0;
      auto else_body = ParseBody({"endfor"}, &end);
      loop_depth_ = saved;
      if (!else_body.ok()) return else_body.status();
      s->else_body = std::move(*else_body);
    }
    DYN_RETURN_IF_ERROR(ExpectBlockEnd());
    return s;
  }

  Result<StmtPtr> ParseSet() {
    auto s = MakeStmt(Stmt::Kind::kSet);
    DYN_ASSIGN_OR_RETURN(s->target, ParseAssignTarget(true));
    if (SkipOp("=")) {
      DYN_ASSIGN_OR_RETURN(s->expr, ParseTuple(true));
      DYN_RETURN_IF_ERROR(ExpectBlockEnd());
      return s;
    }
    s->kind = Stmt::Kind::kSetBlock;
    if (IsOp("|")) { DYN_ASSIGN_OR_RETURN(s->expr, ParseFilterChain(nullptr)); }
    DYN_RETURN_IF_ERROR(ExpectBlockEnd());
    std::string end;
    DYN_ASSIGN_OR_RETURN(s->body, ParseBody({"endset"}, &end));
    DYN_RETURN_IF_ERROR(ExpectBlockEnd());
    return s;
  }

  Status ParseParams(Stmt& s) {
    DYN_RETURN_IF_ERROR(ExpectOp("("));
    while (!IsOp(")")) {
      if (!s.params.empty()) DYN_RETURN_IF_ERROR(ExpectOp(","));
      if (IsOp(")")) break;
      DYN_ASSIGN_OR_RETURN(std::string name, ExpectName());
      ExprPtr def;
      if (SkipOp("=")) { DYN_ASSIGN_OR_RETURN(def, ParseExpression()); }
      s.params.push_back(std::move(name));
      s.defaults.push_back(std::move(def));
    }
    Next();
    return Status::Ok();
  }

  Result<StmtPtr> ParseMacro() {
    auto s = MakeStmt(Stmt::Kind::kMacro);
    DYN_ASSIGN_OR_RETURN(s->name, ExpectName());
    DYN_RETURN_IF_ERROR(ParseParams(*s));
    DYN_RETURN_IF_ERROR(ExpectBlockEnd());
    std::string end;
    int saved = loop_depth_;
    loop_depth_ = 0;
    auto body = ParseBody({"endmacro"}, &end);
    loop_depth_ = saved;
    if (!body.ok()) return body.status();
    s->body = std::move(*body);
    if (Cur().type == TokenType::kName) Next();
    DYN_RETURN_IF_ERROR(ExpectBlockEnd());
    return s;
  }

  Result<StmtPtr> ParseCallBlock() {
    auto s = MakeStmt(Stmt::Kind::kCallBlock);
    if (IsOp("(")) DYN_RETURN_IF_ERROR(ParseParams(*s));
    DYN_ASSIGN_OR_RETURN(s->expr, ParseExpression());
    if (s->expr->kind != Expr::Kind::kCall) return Error("expected call");
    DYN_RETURN_IF_ERROR(ExpectBlockEnd());
    std::string end;
    int saved = loop_depth_;
    loop_depth_ = 0;
    auto body = ParseBody({"endcall"}, &end);
    loop_depth_ = saved;
    if (!body.ok()) return body.status();
    s->body = std::move(*body);
    DYN_RETURN_IF_ERROR(ExpectBlockEnd());
    return s;
  }

};

}  // namespace

Result<Body> ParseTemplate(const std::vector<Token>& tokens) {
  Parser parser(tokens);
  return parser.ParseAll();
}

}  // namespace dyn::tmpl
