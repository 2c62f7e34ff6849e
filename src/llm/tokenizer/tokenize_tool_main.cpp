// dyn_tokenize_tool tokenize|detokenize ...: the tokenizer CLI without the rest of dyn.
#include <cstring>
#include <iostream>

#include "llm/tokenizer/tokenize_cli.h"

int main(int argc, char** argv) {
  if (argc < 2 || (std::strcmp(argv[1], "tokenize") != 0 && std::strcmp(argv[1], "detokenize") != 0)) {
    std::cerr << "usage: dyn_tokenize_tool tokenize|detokenize --model PATH ...\n";
    return 2;
  }
  return dyn::RunTokenizeCli(argc - 1, argv + 1, std::strcmp(argv[1], "detokenize") == 0);
}
