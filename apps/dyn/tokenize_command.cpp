// dyn tokenize / dyn detokenize: the tokenizer library's CLI.
#include "apps/dyn/commands.h"
#include "llm/tokenizer/tokenize_cli.h"

namespace dyn {

int TokenizeCommand(int argc, char** argv, bool detokenize) { return RunTokenizeCli(argc, argv, detokenize); }

}  // namespace dyn
