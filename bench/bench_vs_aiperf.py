#!/usr/bin/env python3
"""dyn bench vs NVIDIA aiperf against the same `dyn run` server and workload.

For each engine (SmolLM2 on the native engine, and the echo engine) it starts `dyn run`, then
alternates dyn bench and aiperf runs (the order flips every repeat so neither always goes first),
each at fixed concurrency with ISL/OSL fixed, ignore_eos, streaming completions, and compares
the medians over repeats of: median TTFT, median ITL, output token throughput. Usage:

  .venv-aiperf/bin/python bench/bench_vs_aiperf.py [--repeats 3] [--engines native,echo]

Needs aiperf (pip install aiperf, e.g. into .venv-aiperf) and the `gguf` and `tokenizers`
packages in the interpreter running this script (aiperf brings tokenizers): aiperf synthesizes
text prompts with a Hugging Face tokenizer, so SmolLM2's tokenizer is exported from the GGUF file
to tokenizer.json first, and both tools then send prompts of the same length in the same tokens.
"""
import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
GGUF = os.path.join(REPO, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
ECHO_DELAY_MS = 10  # the echo engine paced like a real decode step


def export_tokenizer(gguf_path, out_dir):
    """SmolLM2's byte-level BPE from the GGUF vocabulary, as a Hugging Face tokenizer dir."""
    from gguf import GGUFReader
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    if os.path.exists(os.path.join(out_dir, "tokenizer.json")):
        return out_dir
    r = GGUFReader(gguf_path)
    def strings(key):
        f = r.fields[key]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
    tokens = strings("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in strings("tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tokens[1], "eos_token": tokens[2],
                   "unk_token": tokens[0], "model_max_length": 8192}, f)
    return out_dir


def server_ttft(url):
    """(sum, count) of the server's own TTFT histogram: what the server saw, no client in it."""
    text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    vals = {}
    for line in text.splitlines():
        for k in ("sum", "count"):
            if line.startswith(f"dyn_frontend_time_to_first_token_seconds_{k} "):
                vals[k] = float(line.split()[1])
    return vals.get("sum", 0.0), vals.get("count", 0.0)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinned(cpus, cmd):
    """cmd run on the given CPUs only (taskset), so the server and the client do not share cores."""
    return (["taskset", "-c", cpus] if cpus else []) + cmd


def start_server(a, engine, port, log_path):
    cmd = pinned(a.server_cpus, [a.dyn, "run", "--model", GGUF, "--engine", engine, "--host", "127.0.0.1",
                                 "--port", str(port), "--served-model-name", "smollm2"])
    if engine == "native" and a.server_threads:
        cmd += ["--threads", str(a.server_threads)]
    if engine == "mocker":
        # Dynamo's timing model slowed down to GPU-like latencies in real time (TTFT of hundreds of
        # ms, ITL of tens): a server whose latencies do not depend on sharing 2 cores with the clients.
        cmd += ["--speedup-ratio", str(a.mocker_speedup), "--block-size", "16"]
    if engine == "echo":
        cmd += ["--echo-delay-ms", str(ECHO_DELAY_MS)]
    proc = subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    for _ in range(600):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc, cmd
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start; see " + log_path)


def run_dyn_bench(a, url, seed, out):
    cmd = pinned(a.client_cpus, [a.dyn, "bench", "--url", url, "--model", "smollm2", "--endpoint", "completions",
           "--concurrency", str(a.concurrency), "--num-requests", str(a.requests),
           "--warmup-requests", str(a.warmup), "--input-tokens", str(a.isl), "--output-tokens", str(a.osl),
           "--seed", str(seed), "--json", out, "--no-progress"])
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    s = json.load(open(out))["runs"][0]["summary"]
    return cmd, {"ttft_p50": s["ttft_ms"]["p50"], "itl_p50": s["itl_ms"]["p50"],
                 "out_tps": s["output_token_throughput"], "isl": s["input_tokens"]["mean"],
                 "osl": s["output_tokens"]["mean"], "errors": s["errors"]}


def run_aiperf(a, url, seed, out_dir, tokenizer):
    cmd = pinned(a.client_cpus, [a.aiperf, "profile", "--model", "smollm2", "--url", url, "--endpoint-type", "completions",
           "--streaming", "--concurrency", str(a.concurrency), "--request-count", str(a.requests),
           "--warmup-request-count", str(a.warmup),
           "--prompt-input-tokens-mean", str(a.isl), "--prompt-input-tokens-stddev", "0",
           "--prompt-output-tokens-mean", str(a.osl), "--prompt-output-tokens-stddev", "0",
           "--extra-inputs", "ignore_eos:true", "--extra-inputs", f"min_tokens:{a.osl}",
           "--tokenizer", tokenizer, "--use-server-token-count", "--random-seed", str(seed),
           "--output-artifact-dir", out_dir, "--ui-type", "none"])
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    m = json.load(open(os.path.join(out_dir, "profile_export_aiperf.json")))
    def get(name, stat):
        v = m[name] if name in m else m["records"][name]
        return v[stat]
    return cmd, {"ttft_p50": get("time_to_first_token", "p50"), "itl_p50": get("inter_token_latency", "p50"),
                 "out_tps": get("output_token_throughput", "avg"),
                 "isl": get("input_sequence_length", "avg"), "osl": get("output_sequence_length", "avg"),
                 "errors": 0}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dyn", default=os.path.join(REPO, "build", "apps", "dyn", "dyn"))
    p.add_argument("--aiperf", default=os.path.join(REPO, ".venv-aiperf", "bin", "aiperf"))
    p.add_argument("--engines", default="native,echo")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--isl", type=int, default=128)
    p.add_argument("--osl", type=int, default=64)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--out", default="/tmp/bench_vs_aiperf")
    p.add_argument("--server-cpus", default="", help="taskset CPU list for the server (e.g. 0)")
    p.add_argument("--client-cpus", default="", help="taskset CPU list for either client (e.g. 1)")
    p.add_argument("--server-threads", type=int, default=0, help="native engine threads (0: all)")
    p.add_argument("--mocker-speedup", type=float, default=0.1, help="mocker engine: simulated / real time")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    tokenizer = export_tokenizer(GGUF, os.path.join(a.out, "smollm2-tokenizer"))
    results = {}
    for engine in a.engines.split(","):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc, server_cmd = start_server(a, engine, port, os.path.join(a.out, f"server-{engine}.log"))
        print("server:", " ".join(server_cmd), flush=True)
        runs = {"dyn bench": [], "aiperf": []}
        try:
            for rep in range(a.repeats):
                order = ["dyn bench", "aiperf"] if rep % 2 == 0 else ["aiperf", "dyn bench"]
                for tool in order:
                    before = server_ttft(url)
                    if tool == "dyn bench":
                        cmd, r = run_dyn_bench(a, url, rep, os.path.join(a.out, f"dyn-{engine}-{rep}.json"))
                    else:
                        cmd, r = run_aiperf(a, url, rep, os.path.join(a.out, f"aiperf-{engine}-{rep}"), tokenizer)
                    after = server_ttft(url)
                    n = after[1] - before[1]
                    r["server_ttft_mean"] = 1000 * (after[0] - before[0]) / n if n else 0.0
                    runs[tool].append(r)
                    print(f"{engine} rep {rep} {tool:9s}: TTFT p50 {r['ttft_p50']:.2f} ms  ITL p50 {r['itl_p50']:.3f} ms  "
                          f"out {r['out_tps']:.1f} tok/s  server-side mean TTFT {r['server_ttft_mean']:.2f} ms  ISL {r['isl']:.1f} OSL {r['osl']:.1f}", flush=True)
                    if rep == 0:
                        print("   ", " ".join(cmd), flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        med = {tool: {k: statistics.median(r[k] for r in rs) for k in ("ttft_p50", "itl_p50", "out_tps", "isl", "osl", "server_ttft_mean")}
               for tool, rs in runs.items()}
        results[engine] = {"runs": runs, "median": med}
    print()
    print("| engine | metric | dyn bench | aiperf | dyn/aiperf |")
    print("|---|---|---:|---:|---:|")
    for engine, res in results.items():
        d, q = res["median"]["dyn bench"], res["median"]["aiperf"]
        for key, name in (("ttft_p50", "median TTFT (ms)"), ("itl_p50", "median ITL (ms)"),
                          ("out_tps", "output tokens/s"), ("server_ttft_mean", "server-side mean TTFT (ms)"), ("isl", "input tokens"), ("osl", "output tokens")):
            print(f"| {engine} | {name} | {d[key]:.3f} | {q[key]:.3f} | {d[key] / q[key]:.3f} |")
    json.dump(results, open(os.path.join(a.out, "results.json"), "w"), indent=1)


if __name__ == "__main__":
    sys.exit(main())
