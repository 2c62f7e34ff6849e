// `dyn tokenize` / `dyn detokenize`: command-line access to the tokenizer.
//
//   dyn tokenize   --model PATH [--text TEXT | --jsonl] [--no-special]
//       prints the ids of each input as a JSON array, one line per input. --no-special: do not
//       add the post-processor's tokens (BOS/EOS).
//   dyn detokenize --model PATH [--ids 1,2,3 | --jsonl] [--skip-special]
//       prints the decoded text of each input as a JSON string, one line per input.
// PATH is a directory holding tokenizer.json (+ tokenizer_config.json), a tokenizer.json file, or
// a .gguf file. --jsonl reads stdin: one JSON string (tokenize) or JSON array of ids
// (detokenize) per line. Without --text/--ids/--jsonl, stdin is read as one text (tokenize).
#pragma once

namespace dyn {

// argv[0] is the subcommand's name (ignored); options follow. Returns the process exit code
// (0 ok, 1 runtime error, 2 usage error).
int RunTokenizeCli(int argc, char** argv, bool detokenize);

}  // namespace dyn
