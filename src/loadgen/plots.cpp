#include "loadgen/plots.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>

namespace dyn::loadgen {

const char* PlotScript() {
  return R"PY(
import json, os, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

report = json.load(open(sys.argv[1]))
out = sys.argv[2]
runs = report["runs"]
model = report.get("config", {}).get("model", "")
written = []

def measured(run):
    return [r for r in run["requests"] if not r["warmup"]]

def ok(run):
    return [r for r in measured(run) if not r["error_kind"]]

def cdf(ax, values, label):
    values = sorted(v for v in values if v is not None and v >= 0)
    if not values:
        return
    n = len(values)
    ax.step(values, [(i + 1) / n for i in range(n)], where="post", label=label)

def save(fig, name):
    path = os.path.join(out, name)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    written.append(path)

# Latency CDFs.
fig, axes = plt.subplots(2, 2, figsize=(12, 8))
panels = [("Time to first token", "TTFT (ms)", lambda rs: [r["ttft_ms"] for r in rs]),
          ("Inter-token latency (per request)", "ITL (ms)", lambda rs: [r["itl_ms"] for r in rs]),
          ("Gap between streamed chunks", "gap (ms)",
           lambda rs: [b - a for r in rs for a, b in zip(r["chunk_ms"], r["chunk_ms"][1:])]),
          ("Request latency", "end-to-end latency (ms)", lambda rs: [r["e2e_ms"] for r in rs])]
for ax, (title, xlabel, get) in zip(axes.flat, panels):
    for run in runs:
        cdf(ax, get(ok(run)), run["label"])
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of requests" if "Gap" not in title else "fraction of gaps")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    if ax.has_data():
        ax.legend(fontsize=8)
fig.suptitle(f"dyn bench latency CDFs {model}")
fig.tight_layout()
save(fig, "latency_cdf.png")

# Sweep: throughput and latency against concurrency.
sweep = [r for r in runs if r["concurrency"] > 0]
if len(sweep) > 1:
    sweep.sort(key=lambda r: r["concurrency"])
    c = [r["concurrency"] for r in sweep]
    s = [r["summary"] for r in sweep]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    ax.plot(c, [x["output_token_throughput"] for x in s], "o-", label="output tokens/s")
    ax.set_xlabel("concurrency (requests in flight)")
    ax.set_ylabel("output tokens/s")
    ax2 = ax.twinx()
    ax2.plot(c, [x["request_throughput"] for x in s], "s--", color="tab:orange", label="requests/s")
    ax2.set_ylabel("requests/s")
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [l.get_label() for l in lines], loc="upper left")
    ax.set_title("Throughput")
    ax = axes[1]
    for p in ("p50", "p90", "p99"):
        ax.plot(c, [x["ttft_ms"][p] for x in s], "o-", label=f"TTFT {p}")
    ax.set_xlabel("concurrency (requests in flight)")
    ax.set_ylabel("time to first token (ms)")
    ax.set_title("TTFT")
    ax.legend()
    ax = axes[2]
    for p in ("p50", "p90", "p99"):
        ax.plot(c, [x["itl_ms"][p] for x in s], "o-", label=f"ITL {p}")
    ax.set_xlabel("concurrency (requests in flight)")
    ax.set_ylabel("inter-token latency (ms)")
    ax.set_title("ITL")
    ax.legend()
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(c)
        ax.set_xticklabels([str(x) for x in c])
        ax.grid(alpha=0.3)
    fig.suptitle(f"dyn bench sweep {model}")
    fig.tight_layout()
    save(fig, "sweep.png")

# Per-request timeline of each run: a bar from send to end, queue/prefill part (to the first
# token) darker than the decode part.
for n, run in enumerate(runs):
    rs = sorted(measured(run), key=lambda r: r["start_ms"])
    if not rs:
        continue
    t0 = rs[0]["start_ms"]
    fig, ax = plt.subplots(figsize=(12, max(3, min(12, 0.05 * len(rs) + 2))))
    for y, r in enumerate(rs):
        s = (r["start_ms"] - t0) / 1000
        end = s + max(r["e2e_ms"], 0) / 1000
        if r["error_kind"]:
            ax.plot([s, max(end, s + 0.001)], [y, y], color="tab:red", lw=1.5)
            continue
        f = s + max(r["ttft_ms"], 0) / 1000
        ax.plot([s, f], [y, y], color="tab:orange", lw=1.5)
        ax.plot([f, end], [y, y], color="tab:blue", lw=1.5)
    ax.plot([], [], color="tab:orange", label="waiting for first token")
    ax.plot([], [], color="tab:blue", label="streaming tokens")
    ax.plot([], [], color="tab:red", label="error")
    ax.set_xlabel("time since the first measured request (s)")
    ax.set_ylabel("request (in order sent)")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"Request timeline: {run['label']} {model}")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    save(fig, f"timeline_{n}.png")

for p in written:
    print(p)
)PY";
}

namespace {

std::string Quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

bool HasMatplotlib(const std::string& python) {
  const std::string cmd = Quote(python) + " -c 'import matplotlib' >/dev/null 2>&1";
  return std::system(cmd.c_str()) == 0;
}

}  // namespace

Status WritePlots(const std::string& json_path, const std::string& dir, std::vector<std::string>* written) {
  std::vector<std::string> candidates;
  if (const char* env = std::getenv("DYN_PYTHON"); env && *env) candidates.push_back(env);
  candidates.push_back("python3");
  candidates.push_back("/usr/bin/python3");
  std::string python;
  bool any_python = false;
  for (const std::string& c : candidates) {
    if (std::system((Quote(c) + " -c '' >/dev/null 2>&1").c_str()) != 0) continue;
    any_python = true;
    if (HasMatplotlib(c)) {
      python = c;
      break;
    }
  }
  if (!any_python) return Status::Unavailable("plots need python3, which was not found (set DYN_PYTHON)");
  if (python.empty())
    return Status::Unavailable(
        "plots need matplotlib: apt-get install python3-matplotlib (or pip install matplotlib, or set DYN_PYTHON)");
  ::mkdir(dir.c_str(), 0755);
  char script_path[] = "/tmp/dyn_bench_plot_XXXXXX";
  const int fd = ::mkstemp(script_path);
  if (fd < 0) return Status::IoError("cannot create a temporary file for the plot script");
  ::close(fd);
  {
    std::ofstream f(script_path);
    f << PlotScript();
  }
  const std::string cmd = Quote(python) + " " + Quote(script_path) + " " + Quote(json_path) + " " + Quote(dir);
  FILE* p = ::popen(cmd.c_str(), "r");
  if (!p) {
    ::unlink(script_path);
    return Status::IoError("cannot run " + python);
  }
  char line[4096];
  while (std::fgets(line, sizeof line, p)) {
    std::string s(line);
    while (!s.empty() && (s.back() == '\n' || s.back() == '\r')) s.pop_back();
    if (!s.empty() && written) written->push_back(s);
  }
  const int rc = ::pclose(p);
  ::unlink(script_path);
  if (rc != 0) return Status::Internal("the plot script failed (exit status " + std::to_string(rc) + ")");
  return Status::Ok();
}

}  // namespace dyn::loadgen
