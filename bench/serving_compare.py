#!/usr/bin/env python3
"""Side-by-side serving benchmark: dyn vs llama-cpp-python's server on the same GGUF file, same
client, same prompts, in one run. Prints a table and writes JSON.

Measures, per server: load time (spawn -> first successful /v1/models), resident memory after
load and at the end (VmRSS/VmHWM), decode tokens/s at concurrency 1, and at each concurrency:
output tokens/s, TTFT p50/p90, per-request decode rate. Greedy, streaming /v1/completions.

    .venv/bin/python bench/serving_compare.py --model models/SmolLM2-135M-Instruct.Q4_1.gguf
"""
import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_mem_mb(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) / 1024
    return out


def load_prompts(n, seed_words=120):
    data = json.load(open(os.path.join(REPO, "..", "shared", "traces", "sharegpt", "ShareGPT_V3_filtered_1000.json")))
    prompts = []
    for item in data:
        text = item["conversations"][0]["value"]
        words = text.split()
        if len(words) < 8:
            continue
        prompts.append(" ".join(words[:seed_words]))
        if len(prompts) == n:
            break
    return prompts


class Server:
    def __init__(self, name, cmd, port, env=None):
        self.name, self.port = name, port
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(os.path.join(REPO, "build", f"bench-{name}.log"), "w")
        t0 = time.time()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited: see build/bench-{name}.log")
            try:
                r = httpx.get(self.url + "/v1/models", timeout=1)
                if r.status_code == 200:
                    self.model = r.json()["data"][0]["id"]
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.load_s = time.time() - t0
        self.mem_after_load = proc_mem_mb(self.proc.pid)

    def stop(self):
        self.mem_end = proc_mem_mb(self.proc.pid)
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def one_request(client, server, prompt, max_tokens):
    t0 = time.perf_counter()
    ttft, n_chunks, usage, stamps = None, 0, None, []
    body = {"model": server.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", server.url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{server.name}: HTTP {r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk.get("choices") and (chunk["choices"][0].get("text") or ""):
                now = time.perf_counter()
                if ttft is None:
                    ttft = now - t0
                stamps.append(now)
                n_chunks += 1
    end = time.perf_counter()
    out_tokens = usage["completion_tokens"] if usage else n_chunks
    decode_s = (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return {"ttft": ttft or (end - t0), "e2e": end - t0, "out_tokens": out_tokens,
            "decode_tps": (out_tokens - 1) / decode_s if decode_s > 0 else None}


async def run_level(server, prompts, concurrency, max_tokens):
    queue = list(prompts)
    results = []
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency * 2)) as client:
        async def worker():
            while queue:
                p = queue.pop(0)
                results.append(await one_request(client, server, p, max_tokens))
        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        wall = time.perf_counter() - t0
    ttfts = sorted(r["ttft"] for r in results)
    rates = [r["decode_tps"] for r in results if r["decode_tps"]]
    return {"concurrency": concurrency, "requests": len(results), "wall_s": wall,
            "output_tokens": sum(r["out_tokens"] for r in results),
            "output_tps": sum(r["out_tokens"] for r in results) / wall,
            "ttft_p50_ms": 1000 * statistics.median(ttfts),
            "ttft_p90_ms": 1000 * ttfts[int(0.9 * (len(ttfts) - 1))],
            "decode_tps_per_request_p50": statistics.median(rates) if rates else None}


def run_server(name, args, levels):
    """Starts one server, measures every level, stops it; returns its entry."""
    port = free_port()
    if name == "dyn":
        cmd = [args.dyn_bin, "run", "--model", args.model, "--host", "127.0.0.1", "--port", str(port),
               "--threads", str(args.threads)]
    else:
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", args.model, "--host", "127.0.0.1",
               "--port", str(port), "--n_threads", str(args.threads), "--n_ctx", "4096",
               "--interrupt_requests", "False"]  # queue concurrent requests instead of cutting them off
    server = Server(name, cmd, port)
    entry = {"load_s": server.load_s, "rss_after_load_mb": server.mem_after_load.get("VmRSS"),
             "loadavg_start": os.getloadavg()[0]}
    # Warm up, then measure each level on the same prompts.
    asyncio.run(run_level(server, load_prompts(2), 1, 8))
    entry["levels"] = []
    for c in levels:
        n = max(args.requests_per_level, c) if c > 1 else max(4, args.requests_per_level // 4)
        entry["levels"].append(asyncio.run(run_level(server, load_prompts(n), c, args.max_tokens)))
    server.stop()
    entry["rss_end_mb"] = server.mem_end.get("VmRSS")
    entry["rss_peak_mb"] = server.mem_end.get("VmHWM")
    entry["loadavg_end"] = os.getloadavg()[0]
    return entry


METRICS = ["output_tps", "ttft_p50_ms", "ttft_p90_ms", "decode_tps_per_request_p50"]


def median_entry(runs):
    """Per-metric medians over the repeats of one server."""
    out = {k: statistics.median(r[k] for r in runs) for k in ("load_s", "rss_after_load_mb")}
    out["levels"] = []
    for i, lv in enumerate(runs[0]["levels"]):
        m = {"concurrency": lv["concurrency"]}
        for k in METRICS:
            vals = [r["levels"][i][k] for r in runs if r["levels"][i][k] is not None]
            m[k] = statistics.median(vals) if vals else None
        out["levels"].append(m)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(REPO, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--dyn-bin", default=os.path.join(REPO, "build", "apps", "dyn", "dyn"))
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests-per-level", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--servers", default="dyn,llama.cpp")
    ap.add_argument("--repeats", type=int, default=1,
                    help="rounds; the servers alternate (ABBA...) and the table shows medians over rounds")
    ap.add_argument("--out", default=os.path.join(REPO, "build", "serving_compare.json"))
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    names = args.servers.split(",")
    report = {"model": os.path.basename(args.model), "threads": args.threads, "max_tokens": args.max_tokens,
              "cpu": open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(": "),
              "repeats": args.repeats, "rounds": [], "servers": {}}
    for r in range(args.repeats):
        order = names if r % 2 == 0 else names[::-1]
        rnd = {}
        for name in order:
            rnd[name] = run_server(name, args, levels)
            lv0 = rnd[name]["levels"][0]
            print(f"round {r + 1}: {name:10} conc {lv0['concurrency']}: decode {lv0['decode_tps_per_request_p50'] or 0:.1f} tok/s/req, "
                  f"out {lv0['output_tps']:.1f} tok/s (load average {rnd[name]['loadavg_start']:.1f} -> {rnd[name]['loadavg_end']:.1f})",
                  flush=True)
        report["rounds"].append(rnd)
    for name in names:
        report["servers"][name] = median_entry([rnd[name] for rnd in report["rounds"]])
    report["model_file_mb"] = os.path.getsize(args.model) / 2**20
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"model {report['model']} ({report['model_file_mb']:.1f} MiB), {args.threads} threads, {report['cpu']}, "
          f"medians over {args.repeats} round(s)")
    print(f"{'server':10} {'load s':>7} {'RSS MiB':>8} {'conc':>5} {'out tok/s':>10} {'TTFT p50 ms':>12} {'TTFT p90 ms':>12} {'decode tok/s/req':>17}")
    for name, e in report["servers"].items():
        for lv in e["levels"]:
            print(f"{name:10} {e['load_s']:7.2f} {e['rss_after_load_mb']:8.1f} {lv['concurrency']:5d} {lv['output_tps']:10.1f} "
                  f"{lv['ttft_p50_ms']:12.1f} {lv['ttft_p90_ms']:12.1f} {lv['decode_tps_per_request_p50'] or 0:17.1f}")
    if set(names) >= {"dyn", "llama.cpp"}:
        # Ratios within each round (the two servers ran back to back), then their median.
        for i, c in enumerate(levels):
            def ratio(key):
                vals = []
                for rnd in report["rounds"]:
                    a, b = rnd["dyn"]["levels"][i][key], rnd["llama.cpp"]["levels"][i][key]
                    if a and b:
                        vals.append(a / b)
                return vals
            dec, out = ratio("decode_tps_per_request_p50"), ratio("output_tps")
            print(f"conc {c}: dyn / llama.cpp decode tok/s per request: median {statistics.median(dec) if dec else 0:.2f}x "
                  f"(rounds: {' '.join(f'{x:.2f}' for x in dec)}); output tok/s: median {statistics.median(out) if out else 0:.2f}x")


if __name__ == "__main__":
    main()
