// The plain-program mode of dyn's fuzz targets (built without libFuzzer): feeds each file named on
// the command line to LLVMFuzzerTestOneInput, e.g. to replay a crash input or a seed corpus.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>

#include "base/file.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

namespace dyn {

// Returns the process exit code: 1 if a file cannot be read.
inline int ReplayFuzzInputs(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    auto data = ReadFile(argv[i]);
    if (!data.ok()) {
      std::fprintf(stderr, "%s\n", data.status().ToString().c_str());
      return 1;
    }
    LLVMFuzzerTestOneInput(reinterpret_cast<const uint8_t*>(data->data()), data->size());
  }
  return 0;
}

}  // namespace dyn
