// Template syntax tree (private header). Nodes are plain structs owned by their parents.
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "base/status.h"
#include "llm/template/value.h"

namespace dyn::tmpl {

struct Expr;
using ExprPtr = std::unique_ptr<Expr>;

struct Expr {
  enum class Kind : uint8_t {
    kLiteral,   // value
    kName,      // name
    kList,      // children
    kTuple,     // children
    kDict,      // children: key0, value0, key1, value1, ...
    kGetAttr,   // children[0].name
    kGetItem,   // children[0][children[1]]
    kSlice,     // children[0][children[1]:children[2]:children[3]] (null parts omitted)
    kCall,      // children[0](children[1..], kwargs)
    kFilter,    // children[0] | name(children[1..], kwargs); children[0] null in filter blocks
    kTest,      // children[0] is [not] name(children[1..], kwargs); negated
    kNeg,       // -children[0]
    kPos,       // +children[0]
    kNot,       // not children[0]
    kBinary,    // children[0] op children[1]: + - * / // % ** ~
    kAnd,
    kOr,
    kCompare,   // children[0] ops[0] children[1] ops[1] children[2] ...
    kCondExpr,  // children[0] if children[1] else children[2] (children[2] may be null)
  };
  Kind kind;
  int line = 0;
  Value value;
  std::string name;  // name, attribute, filter/test, or binary operator
  bool negated = false;
  int height = 1;  // longest path to a leaf (see ExpressionParser::Seal)
  std::vector<ExprPtr> children;
  std::vector<std::pair<std::string, ExprPtr>> kwargs;
  std::vector<std::string> ops;  // kCompare: "==", "!=", "<", ">", "<=", ">=", "in", "notin"
};

struct Stmt;
using StmtPtr = std::unique_ptr<Stmt>;
using Body = std::vector<StmtPtr>;

struct Stmt {
  enum class Kind : uint8_t {
    kText,        // text
    kPrint,       // {{ expr }}
    kIf,          // conds[i] -> bodies[i]; else_body
    kFor,         // for target in expr [if cond] body [else else_body]
    kSet,         // set target = expr
    kSetBlock,    // set target [| filter] body endset (filter in expr, input null)
    kMacro,       // macro name(params=defaults) body
    kCallBlock,   // call[(params)] expr body endcall
    kFilterBlock, // filter expr body endfilter
    kBreak,
    kContinue,
    kScope,       // generation / block / with: body in a new scope (with: assignments first)
  };
  Kind kind;
  int line = 0;
  std::string text;
  std::string name;
  ExprPtr target;
  ExprPtr expr;
  ExprPtr cond;
  bool recursive = false;
  std::vector<ExprPtr> conds;
  std::vector<Body> bodies;
  Body body;
  Body else_body;
  std::vector<std::string> params;
  std::vector<ExprPtr> defaults;  // aligned with params (null when none)
  std::vector<std::pair<ExprPtr, ExprPtr>> assignments;  // with: target = expr
};

// Parses a token stream into a template body.
struct Token;
Result<Body> ParseTemplate(const std::vector<Token>& tokens);

}  // namespace dyn::tmpl
