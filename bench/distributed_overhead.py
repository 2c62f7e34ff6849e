#!/usr/bin/env python3
"""Request-plane overhead, side by side: dyn (in-process and frontend + worker over TCP) vs NVIDIA
Dynamo (frontend + mocker over its TCP request plane), same client, same prompts, in one run.

Engines that do no work make the framework the whole cost:
  dyn-run       `dyn run --engine echo`: HTTP + preprocessing + engine in one process (reference)
  dyn-dist      `dyn frontend` + one `dyn worker --engine echo`, file discovery, TCP request plane
  dynamo        `python -m dynamo.frontend` + `python -m dynamo.mocker --speedup-ratio 1e9`,
                file discovery, TCP request plane, ZMQ event plane (no etcd, no NATS)

Client: one asyncio process with httpx, streaming /v1/completions, prompt of ~64 tokens,
max_tokens 16, ignore_eos, closed loop at each concurrency. Per system and level it reports
requests/s, request latency p50/p99, TTFT p50/p99 (first SSE event with a choice), SSE events per
request, and CPU seconds per 1000 requests used by the servers and by the client (all processes
share this machine's cores, the client included). "Added" latency = latency - dyn-run's at the
same level.

    .venv/bin/python bench/distributed_overhead.py            # Dynamo from .venv-dynamo
"""
import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
STORIES = os.path.abspath(os.path.join(REPO, "..", "shared", "models", "stories260K", "hf"))

# ~64 tokens with the stories260K tokenizer (checked against usage.prompt_tokens at run time).
PROMPT_WORDS = ("Once upon a time there was a little girl named Lily who loved to play in the park "
                "with her dog and her big red ball and one day the sun was shining and the birds were "
                "singing in the tall green trees").split()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    """utime + stime of a process and its threads (children are separate processes)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_model_dir(root):
    """stories260K with a trivial chat template: Dynamo's frontend refuses a model card without
    one (even for /v1/completions). Both systems read this same directory."""
    d = os.path.join(root, "model")
    os.makedirs(d, exist_ok=True)
    for f in ("config.json", "generation_config.json", "tokenizer.json", "model.safetensors"):
        if os.path.exists(os.path.join(STORIES, f)):
            shutil.copy(os.path.join(STORIES, f), d)
    cfg = json.load(open(os.path.join(STORIES, "tokenizer_config.json")))
    cfg["chat_template"] = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    json.dump(cfg, open(os.path.join(d, "tokenizer_config.json"), "w"), indent=1)
    return d


class Proc:
    def __init__(self, name, cmd, log_dir, env=None):
        self.name, self.cmd = name, cmd
        self.log_path = os.path.join(log_dir, f"{name}.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})

    def tail(self):
        with open(self.log_path) as f:
            return f.read()[-3000:]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class System:
    """Processes of one system under test, and the URL of its OpenAI API."""

    def __init__(self, name, procs, port):
        self.name, self.procs, self.port = name, procs, port
        self.url = f"http://127.0.0.1:{port}"
        self.model = None

    def wait_ready(self, timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            for p in self.procs:
                if p.proc.poll() is not None:
                    raise RuntimeError(f"{p.name} exited {p.proc.returncode}:\n{p.tail()}")
            try:
                r = httpx.get(self.url + "/v1/models", timeout=1)
                if r.status_code == 200 and r.json().get("data"):
                    self.model = r.json()["data"][0]["id"]
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready in {timeout}s:\n" + "\n".join(p.tail() for p in self.procs))

    def cpu(self):
        return sum(cpu_seconds(p.proc.pid) for p in self.procs)

    def stop(self):
        for p in reversed(self.procs):
            p.stop()


def start_system(name, args, model_dir, work):
    port = free_port()
    logs = os.path.join(work, "logs")
    os.makedirs(logs, exist_ok=True)
    dyn = args.dyn_bin
    if name == "dyn-run":
        procs = [Proc(name, [dyn, "run", "--engine", "echo", "--model", model_dir,
                             "--host", "127.0.0.1", "--port", str(port)], logs)]
    elif name == "dyn-dist":
        disc = "file:" + os.path.join(work, "dyn-discovery")
        procs = [Proc("dyn-worker", [dyn, "worker", "--engine", "echo", "--model", model_dir,
                                     "--discovery", disc, "--host", "127.0.0.1"], logs),
                 Proc("dyn-frontend", [dyn, "frontend", "--discovery", disc, "--host", "127.0.0.1",
                                       "--port", str(port)], logs)]
    elif name == "dynamo":
        kv = os.path.join(work, "dynamo-kv")
        os.makedirs(kv, exist_ok=True)
        # DYN_LOG=warn: the frontend logs two INFO lines per request by default; dyn logs none.
        env = {"DYN_FILE_KV": kv, "DYN_LOG": args.dynamo_log}
        common = ["--discovery-backend", "file", "--request-plane", "tcp", "--event-plane", "zmq"]
        py = args.dynamo_python
        procs = [Proc("dynamo-frontend", [py, "-m", "dynamo.frontend", *common, "--http-host", "127.0.0.1",
                                          "--http-port", str(port), "--router-mode", "round-robin"], logs, env),
                 Proc("dynamo-mocker", [py, "-m", "dynamo.mocker", "--model-path", model_dir, *common,
                                        "--speedup-ratio", str(args.mocker_speedup)], logs, env)]
    else:
        raise ValueError(name)
    s = System(name, procs, port)
    try:
        s.wait_ready()
    except Exception:
        s.stop()
        raise
    return s


async def one_request(client, system, prompt, max_tokens):
    body = {"model": system.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, events, text_events, usage = None, 0, 0, None
    async with client.stream("POST", system.url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{system.name}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            events += 1
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk.get("choices"):
                if ttft is None:
                    ttft = time.perf_counter() - t0
                if chunk["choices"][0].get("text"):
                    text_events += 1
    lat = time.perf_counter() - t0
    return {"lat": lat, "ttft": ttft if ttft is not None else lat, "events": events,
            "text_events": text_events, "usage": usage}


async def drive(system, prompt, concurrency, n, max_tokens):
    remaining = [n]
    results = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        async def loop():
            while remaining[0] > 0:
                remaining[0] -= 1
                results.append(await one_request(client, system, prompt, max_tokens))
        t0 = time.perf_counter()
        await asyncio.gather(*[loop() for _ in range(concurrency)])
        wall = time.perf_counter() - t0
    return results, wall


def pct(values, q):
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


def run_level(system, prompt, concurrency, args):
    asyncio.run(drive(system, prompt, concurrency, args.warmup, args.max_tokens))
    # Background CPU (pollers, metrics loops) while idle, to tell it apart from per-request work.
    idle0 = system.cpu()
    time.sleep(args.idle_s)
    idle_frac = (system.cpu() - idle0) / args.idle_s
    per0 = {p.name: cpu_seconds(p.proc.pid) for p in system.procs}
    srv0, cli0 = system.cpu(), time.process_time()
    results, wall = asyncio.run(drive(system, prompt, concurrency, args.requests, args.max_tokens))
    srv_cpu, cli_cpu = system.cpu() - srv0, time.process_time() - cli0
    per_proc = {p.name: 1000 * (cpu_seconds(p.proc.pid) - per0[p.name]) / args.requests for p in system.procs}
    lat = [r["lat"] * 1000 for r in results]
    ttft = [r["ttft"] * 1000 for r in results]
    usage = next((r["usage"] for r in results if r["usage"]), None) or {}
    return {"concurrency": concurrency, "requests": len(results), "wall_s": wall,
            "req_per_s": len(results) / wall,
            "lat_p50_ms": statistics.median(lat), "lat_p99_ms": pct(lat, 0.99),
            "ttft_p50_ms": statistics.median(ttft), "ttft_p99_ms": pct(ttft, 0.99),
            "sse_events_per_req": statistics.mean(r["events"] for r in results),
            "text_events_per_req": statistics.mean(r["text_events"] for r in results),
            "prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens"),
            "server_cpu_s_per_1k": 1000 * srv_cpu / len(results),
            "client_cpu_s_per_1k": 1000 * cli_cpu / len(results),
            "server_idle_cpu_frac": idle_frac, "cpu_s_per_1k_by_process": per_proc}


def version_of(py, module):
    try:
        out = subprocess.run([py, "-c", f"import importlib.metadata as m; print(m.version('{module}'))"],
                             capture_output=True, text=True, timeout=60)
        return out.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--systems", default="dyn-run,dyn-dist,dynamo")
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--requests", type=int, default=2000, help="measured requests per level")
    ap.add_argument("--warmup", type=int, default=200, help="requests per level before measuring")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--prompt-words", type=int, default=len(PROMPT_WORDS))
    ap.add_argument("--dyn-bin", default=os.path.join(REPO, "build", "apps", "dyn", "dyn"))
    ap.add_argument("--dynamo-python", default=os.path.join(REPO, ".venv-dynamo", "bin", "python"))
    ap.add_argument("--mocker-speedup", type=float, default=1e9,
                    help="mocker --speedup-ratio (0 is documented as 'infinite' but measured ~100 ms/request)")
    ap.add_argument("--idle-s", type=float, default=3.0, help="idle seconds to measure background CPU")
    ap.add_argument("--dynamo-log", default="warn", help="DYN_LOG for the Dynamo processes")
    ap.add_argument("--out", default=os.path.join(REPO, "build", "distributed_overhead.json"))
    args = ap.parse_args()

    levels = [int(c) for c in args.concurrency.split(",")]
    prompt = " ".join((PROMPT_WORDS * 4)[:args.prompt_words])
    work = tempfile.mkdtemp(prefix="dyn-overhead-")
    model_dir = make_model_dir(work)
    report = {"cpu": open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(": \t"),
              "cores": os.cpu_count(), "max_tokens": args.max_tokens, "requests_per_level": args.requests,
              "warmup_per_level": args.warmup, "mocker_speedup": args.mocker_speedup,
              "ai_dynamo": version_of(args.dynamo_python, "ai-dynamo"),
              "ai_dynamo_runtime": version_of(args.dynamo_python, "ai-dynamo-runtime"),
              "httpx": httpx.__version__, "python": sys.version.split()[0], "systems": {}}
    for name in args.systems.split(","):
        t0 = time.time()
        system = start_system(name, args, model_dir, work)
        entry = {"startup_s": time.time() - t0, "cmd": [p.cmd for p in system.procs], "levels": []}
        try:
            for c in levels:
                res = run_level(system, prompt, c, args)
                entry["levels"].append(res)
                print(f"{name:9s} conc {c:3d}: {res['req_per_s']:8.1f} req/s  lat p50 {res['lat_p50_ms']:7.2f} "
                      f"p99 {res['lat_p99_ms']:7.2f}  ttft p50 {res['ttft_p50_ms']:7.2f} ms  "
                      f"events/req {res['sse_events_per_req']:.1f}", flush=True)
        finally:
            system.stop()
        report["systems"][name] = entry
    shutil.rmtree(work, ignore_errors=True)

    ref = {lv["concurrency"]: lv for lv in report["systems"].get("dyn-run", {}).get("levels", [])}
    print("\n| system | conc | req/s | lat p50 ms | lat p99 ms | TTFT p50 ms | TTFT p99 ms | added p50 ms "
          "| added p99 ms | SSE ev/req | server CPU s/1k req | idle server CPU % | client CPU s/1k req |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, entry in report["systems"].items():
        for lv in entry["levels"]:
            r = ref.get(lv["concurrency"])
            lv["added_p50_ms"] = lv["lat_p50_ms"] - r["lat_p50_ms"] if r else None
            lv["added_p99_ms"] = lv["lat_p99_ms"] - r["lat_p99_ms"] if r else None
            add = (f"{lv['added_p50_ms']:.2f} | {lv['added_p99_ms']:.2f}" if r else "- | -")
            print(f"| {name} | {lv['concurrency']} | {lv['req_per_s']:,.0f} | {lv['lat_p50_ms']:.2f} | "
                  f"{lv['lat_p99_ms']:.2f} | {lv['ttft_p50_ms']:.2f} | {lv['ttft_p99_ms']:.2f} | {add} | "
                  f"{lv['sse_events_per_req']:.1f} | {lv['server_cpu_s_per_1k']:.2f} | "
                  f"{100 * lv['server_idle_cpu_frac']:.1f} | "
                  f"{lv['client_cpu_s_per_1k']:.2f} |")
    if "dyn-dist" in report["systems"] and "dynamo" in report["systems"]:
        print("\ndyn-dist / dynamo:")
        for a, b in zip(report["systems"]["dyn-dist"]["levels"], report["systems"]["dynamo"]["levels"]):
            print(f"  conc {a['concurrency']:3d}: req/s x{a['req_per_s'] / b['req_per_s']:.2f}, "
                  f"lat p50 {a['lat_p50_ms'] / b['lat_p50_ms']:.2f}, p99 {a['lat_p99_ms'] / b['lat_p99_ms']:.2f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
