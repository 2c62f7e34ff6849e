// PNG plots of a dyn bench JSON file, drawn by matplotlib: the binary carries the plotting script
// and runs it with $DYN_PYTHON, else python3 (falling back to /usr/bin/python3 when the first has
// no matplotlib, e.g. a pyenv shim next to Debian's python3-matplotlib).
//
// Files written to the directory: latency_cdf.png (TTFT, ITL, inter-chunk gap and request
// latency CDFs, one line per run), sweep.png (throughput and TTFT/ITL against concurrency, when
// there is more than one run), timeline_<n>.png (each request of run n: start, first token, end).
#pragma once

#include <string>
#include <vector>

#include "base/status.h"

namespace dyn::loadgen {

// The embedded script (python3 SCRIPT REPORT.json OUT_DIR).
const char* PlotScript();

// Runs the script on `json_path`; fails with a message naming what is missing (python3 or
// matplotlib) or the script's exit status. `written` gets the PNG paths it printed.
Status WritePlots(const std::string& json_path, const std::string& dir, std::vector<std::string>* written);

}  // namespace dyn::loadgen
