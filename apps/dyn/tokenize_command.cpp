// dyn tokenize / dyn detokenize: the tokenizer library's CLI.
#include "apps/dyn/commands.h"
#include "llm/tokenizer/tokenize_cli.h"

namespace dyn {
namespace {

int TokenizeCommand(int argc, char** argv) { return RunTokenizeCli(argc, argv, /*detokenize=*/false); }
int DetokenizeCommand(int argc, char** argv) { return RunTokenizeCli(argc, argv, /*detokenize=*/true); }

}  // namespace

DYN_REGISTER_COMMAND("tokenize", "text -> token ids with a model's tokenizer", 40, &TokenizeCommand);
DYN_REGISTER_COMMAND("detokenize", "token ids -> text", 41, &DetokenizeCommand);

}  // namespace dyn
