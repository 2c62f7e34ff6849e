"""Frontend and workers as separate processes on a real etcd (and nats-server): routing, spread,
worker death (kill -9, SIGSTOP), draining, client disconnects, etcd and nats-server restarts."""
import asyncio
import os
import shutil
import signal
import time

import httpx
import openai
import pytest

from cluster import Frontend, Nats, Worker, _wait
from dyn_server import SMOLLM2, STORIES

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None and not os.path.exists("/usr/bin/etcd"),
                                reason="etcd is not installed (scripts/setup.sh installs it)")

PROMPTS = [f"Once upon a time there was a {w}" for w in
           ["cat", "dog", "girl", "boy", "tree", "bird", "fish", "king", "queen", "frog", "star", "ball"]]


def native_worker(etcd, procs, *extra, name="worker"):
    w = Worker(f"etcd:{etcd.url}", "--model", STORIES, "--served-model-name", "stories", "--threads", "1",
               *extra, name=name)
    procs.append(w)
    return w


def frontend(etcd, procs, *extra):
    f = Frontend(f"etcd:{etcd.url}", *extra)
    procs.append(f)
    return f


async def stream_one(client, prompt, max_tokens, started=None, model="stories"):
    text = ""
    got_first = False
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             stream=True, extra_body={"ignore_eos": True})
    async for chunk in stream:
        text += chunk.choices[0].text
        if not got_first and started is not None:
            got_first = True
            started.release()
    return text


def client_for(url):
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)


def reference_texts(url, prompts, max_tokens):
    async def run():
        c = client_for(url)
        return [await stream_one(c, p, max_tokens) for p in prompts]
    return asyncio.run(run())


def wait_instances(fe, n, timeout=30):
    _wait(lambda: f"({n} in all)" in fe.logs(), timeout, f"{n} instances on the frontend", fe.proc, fe.logs)


def test_300_concurrent_streams_round_robin(etcd, procs):
    workers = [native_worker(etcd, procs, name=f"w{i}") for i in range(3)]
    fe = frontend(etcd, procs, "--router-mode", "round-robin")
    fe.wait_model("stories")
    wait_instances(fe, 3)
    max_tokens = 24
    refs = reference_texts(fe.url, PROMPTS, max_tokens)
    before = [w.metrics()["dyn_engine_generated_tokens_total"] for w in workers]

    async def run():
        c = client_for(fe.url)
        return await asyncio.gather(*[stream_one(c, PROMPTS[i % len(PROMPTS)], max_tokens) for i in range(300)],
                                    return_exceptions=True)
    results = asyncio.run(run())
    errors = [r for r in results if isinstance(r, Exception)]
    assert not errors, errors[:3]
    for i, text in enumerate(results):
        assert text == refs[i % len(PROMPTS)]
    # Round-robin: exactly 100 requests each, ignore_eos: exactly max_tokens tokens each.
    served = [w.metrics()["dyn_engine_generated_tokens_total"] - b for w, b in zip(workers, before)]
    assert served == [100 * max_tokens] * 3


def test_echo_workers_least_loaded_and_random(etcd, procs):
    workers = [Worker(f"etcd:{etcd.url}", "--model", STORIES, "--served-model-name", "echo", "--engine", "echo",
                      "--echo-delay-ms", "2", name=f"echo{i}") for i in range(3)]
    procs.extend(workers)
    fe = frontend(etcd, procs, "--router-mode", "least-loaded")
    fe.wait_model("echo")
    wait_instances(fe, 3)

    async def run():
        c = client_for(fe.url)
        return await asyncio.gather(*[stream_one(c, PROMPTS[i % len(PROMPTS)], 16, model="echo") for i in range(90)])
    texts = asyncio.run(run())
    assert all(t for t in texts)
    served = [w.metrics()["dyn_engine_generated_tokens_total"] for w in workers]
    # Least-loaded with 90 concurrent streams of equal length: every worker takes a fair share.
    assert all(s >= 16 * 20 for s in served), served


def test_kill9_worker_mid_stream_migrates(etcd, procs):
    workers = [native_worker(etcd, procs, "--max-num-seqs", "2", name=f"w{i}") for i in range(3)]
    fe = frontend(etcd, procs)
    fe.wait_model("stories")
    wait_instances(fe, 3)
    max_tokens = 400
    refs = reference_texts(fe.url, PROMPTS[:6], max_tokens)

    async def run():
        c = client_for(fe.url)
        started = asyncio.Semaphore(0)
        tasks = [asyncio.create_task(stream_one(c, PROMPTS[i % 6], max_tokens, started)) for i in range(24)]
        await started.acquire()  # streams are running
        workers[0].kill()
        return await asyncio.gather(*tasks, return_exceptions=True)
    results = asyncio.run(run())
    errors = [r for r in results if isinstance(r, Exception)]
    assert not errors, errors[:3]
    for i, text in enumerate(results):
        assert text == refs[i % 6], f"stream {i} differs after migration"
    assert fe.metric("dyn_engine_migrations_total", "stories") > 0
    # The dead worker's lease (2 s) expires: new requests all go to the living ones.
    _wait(lambda: "(2 left)" in fe.logs(), 10, "dead worker removed", fe.proc, fe.logs)
    alive_before = sum(w.metrics()["dyn_engine_generated_tokens_total"] for w in workers[1:])
    short = reference_texts(fe.url, PROMPTS[:4], 8)
    assert all(refs[i].startswith(short[i]) for i in range(4))
    assert sum(w.metrics()["dyn_engine_generated_tokens_total"] for w in workers[1:]) - alive_before == 4 * 8


def test_sigstop_worker_is_routed_around(etcd, procs):
    workers = [native_worker(etcd, procs, "--max-num-seqs", "2", name=f"w{i}") for i in range(2)]
    fe = frontend(etcd, procs)
    fe.wait_model("stories")
    wait_instances(fe, 2)
    max_tokens = 400
    refs = reference_texts(fe.url, PROMPTS[:4], max_tokens)

    async def run():
        c = client_for(fe.url)
        started = asyncio.Semaphore(0)
        tasks = [asyncio.create_task(stream_one(c, PROMPTS[i % 4], max_tokens, started)) for i in range(12)]
        await started.acquire()
        workers[0].signal(signal.SIGSTOP)
        return await asyncio.gather(*tasks, return_exceptions=True)
    try:
        t0 = time.time()
        results = asyncio.run(run())
        errors = [r for r in results if isinstance(r, Exception)]
        assert not errors, errors[:3]
        for i, text in enumerate(results):
            assert text == refs[i % 4]
        assert time.time() - t0 < 30
        assert fe.metric("dyn_engine_migrations_total", "stories") > 0
        _wait(lambda: "(1 left)" in fe.logs(), 10, "stopped worker removed", fe.proc, fe.logs)
        assert len(reference_texts(fe.url, PROMPTS[:3], 4)) == 3
    finally:
        workers[0].signal(signal.SIGCONT)


def test_client_disconnect_frees_worker(etcd, procs):
    # SmolLM2 (135M) rather than stories260K: slow enough on CPU that the streams are still running
    # when the client goes away.
    w = Worker(f"etcd:{etcd.url}", "--model", SMOLLM2, "--served-model-name", "stories", "--threads", "1",
               "--max-num-seqs", "8")
    procs.append(w)
    fe = frontend(etcd, procs)
    fe.wait_model("stories")
    idle = w.metrics()
    assert idle["dyn_engine_running_requests"] == 0 and idle["dyn_engine_kv_blocks_used"] == 0

    with httpx.Client(timeout=30) as http:
        streams = []
        for i in range(8):
            ctx = http.stream("POST", fe.url + "/v1/completions", json={
                "model": "stories", "prompt": PROMPTS[i], "max_tokens": 480, "stream": True, "ignore_eos": True})
            r = ctx.__enter__()
            lines = r.iter_lines()  # kept: a dropped generator closes the response
            first = next(lines)
            assert first.startswith("data: ") and '"text"' in first, first
            streams.append((ctx, r, lines))
        busy = w.metrics()
        assert busy["dyn_engine_running_requests"] == 8
        assert busy["dyn_engine_kv_blocks_used"] > 0
        for ctx, r, _ in streams:
            r.close()
            ctx.__exit__(None, None, None)

    def idle_again():
        m = w.metrics()
        return m["dyn_engine_running_requests"] == 0 and m["dyn_engine_waiting_requests"] == 0 and m["dyn_engine_kv_blocks_used"] == 0
    _wait(idle_again, 10, "worker back to idle", w.proc, w.logs)
    # Far fewer tokens than 8 x 480 were generated: the streams were cut short.
    assert w.metrics()["dyn_engine_generated_tokens_total"] < 8 * 480


def test_sigterm_drains_then_exits(etcd, procs):
    workers = [native_worker(etcd, procs, "--max-num-seqs", "2", name=f"w{i}") for i in range(2)]
    fe = frontend(etcd, procs)
    fe.wait_model("stories")
    wait_instances(fe, 2)
    refs = reference_texts(fe.url, PROMPTS[:4], 300)

    async def run():
        c = client_for(fe.url)
        started = asyncio.Semaphore(0)
        tasks = [asyncio.create_task(stream_one(c, PROMPTS[i % 4], 300, started)) for i in range(8)]
        await started.acquire()
        workers[0].signal(signal.SIGTERM)
        return await asyncio.gather(*tasks, return_exceptions=True)
    results = asyncio.run(run())
    assert not [r for r in results if isinstance(r, Exception)]
    assert [t for t in results] == [refs[i % 4] for i in range(8)]
    assert workers[0].proc.wait(timeout=30) == 0
    assert len(etcd.keys("dyn/instances/")) == 1


def test_etcd_restart_keeps_serving(etcd, procs):
    workers = [native_worker(etcd, procs, name=f"w{i}") for i in range(2)]
    fe = frontend(etcd, procs)
    fe.wait_model("stories")
    wait_instances(fe, 2)
    refs = reference_texts(fe.url, PROMPTS[:3], 16)
    etcd.kill()
    assert reference_texts(fe.url, PROMPTS[:3], 16) == refs  # served while etcd is down
    etcd.start(fresh=True)  # all etcd state is lost: workers must register again
    _wait(lambda: len(etcd.keys("dyn/instances/")) == 2, 15, "workers re-registered")
    assert reference_texts(fe.url, PROMPTS[:3], 16) == refs
    late = native_worker(etcd, procs, name="late")
    wait_instances(fe, 3)
    before = late.metrics()["dyn_engine_generated_tokens_total"]
    reference_texts(fe.url, PROMPTS[:6], 4)
    assert late.metrics()["dyn_engine_generated_tokens_total"] > before  # the late worker gets requests


@pytest.mark.skipif(shutil.which("nats-server") is None and not os.path.exists("/usr/sbin/nats-server"),
                    reason="nats-server is not installed (scripts/setup.sh installs it)")
def test_nats_restart_keeps_serving(etcd, procs):
    nats = Nats()
    try:
        workers = [native_worker(etcd, procs, "--event-plane", nats.url, name=f"w{i}") for i in range(2)]
        fe = frontend(etcd, procs, "--event-plane", nats.url, "--router-mode", "least-loaded")
        fe.wait_model("stories")
        wait_instances(fe, 2)
        reports = lambda: fe.logs().count("load reports from instance")  # noqa: E731
        _wait(lambda: reports() >= 2, 10, "load reports over NATS", fe.proc, fe.logs)
        refs = reference_texts(fe.url, PROMPTS[:3], 16)
        nats.kill()
        assert reference_texts(fe.url, PROMPTS[:3], 16) == refs  # served while NATS is down
        time.sleep(3.5)  # long enough for the frontend to notice the reports stopped
        seen = reports()
        nats.start()
        _wait(lambda: reports() >= seen + 2, 20, "load reports after the NATS restart", fe.proc, fe.logs)
        late = native_worker(etcd, procs, "--event-plane", nats.url, name="late")
        wait_instances(fe, 3)
        _wait(lambda: reports() >= seen + 3, 10, "load reports of the late worker", fe.proc, fe.logs)
        assert reference_texts(fe.url, PROMPTS[:3], 16) == refs
    finally:
        nats.stop()


def test_kv_router_sends_shared_prefixes_to_the_worker_that_has_them(etcd, procs):
    workers = [native_worker(etcd, procs, name=f"w{i}") for i in range(2)]
    fe = frontend(etcd, procs, "--router-mode", os.environ.get("DYN_TEST_KV_MODE", "kv"))
    fe.wait_model("stories")
    wait_instances(fe, 2)
    stems = [" ".join([f"{w} went to the {p} to see the {w} and the {p}." for _ in range(4)])
             for w, p in [("Tom", "park"), ("Lily", "shop"), ("Sam", "sea")]]
    for stem in stems:  # first sight of each prefix: no cache anywhere
        reference_texts(fe.url, [stem], 2)
    cached_before = sum(w.metrics()["dyn_engine_cached_prompt_tokens_total"] for w in workers)
    for stem in stems:  # the same prefixes again, longer: the router sends each where it is cached
        reference_texts(fe.url, [stem + " Then they went home."], 2)
    cached = sum(w.metrics()["dyn_engine_cached_prompt_tokens_total"] for w in workers) - cached_before
    # Each stem is well over 4 blocks of 16 tokens. Round-robin (3 stems, 2 workers) would send
    # every second request to the other worker and hit nothing.
    assert cached >= 3 * 4 * 16, cached
    served = [w.metrics()["dyn_engine_generated_tokens_total"] for w in workers]
    assert min(served) > 0, served  # distinct prefixes still spread over both workers


@pytest.mark.skipif(shutil.which("nats-server") is None and not os.path.exists("/usr/sbin/nats-server"),
                    reason="nats-server is not installed (scripts/setup.sh installs it)")
def test_kv_router_follows_workers_kv_events(etcd, procs):
    nats = Nats()
    try:
        workers = [native_worker(etcd, procs, "--event-plane", nats.url, name=f"w{i}") for i in range(2)]
        fe = frontend(etcd, procs, "--router-mode", "kv", "--event-plane", nats.url, "--kv-events=" + os.environ.get("DYN_TEST_KV_EVENTS", "true"))
        fe.wait_model("stories")
        wait_instances(fe, 2)
        stems = [" ".join([f"{w} saw a {p} and the {p} saw {w}." for _ in range(6)])
                 for w, p in [("Ben", "cat"), ("Amy", "owl"), ("Kim", "fox")]]
        # Fill worker 1's cache behind the frontend's back (its own local API): only its KV events
        # can tell the router where these prefixes are.
        applied = fe.metric("dyn_router_kv_events_applied_total") or 0
        reference_texts(workers[1].url, stems, 2)
        if os.environ.get("DYN_TEST_KV_EVENTS", "true") == "true":
            fe.wait_kv_events(applied + 3)  # a stored event per prompt at least, through NATS
        else:
            time.sleep(0.5)
        before = [w.metrics() for w in workers]
        reference_texts(fe.url, [s + " The end." for s in stems], 2)
        after = [w.metrics() for w in workers]
        assert after[0]["dyn_engine_generated_tokens_total"] == before[0]["dyn_engine_generated_tokens_total"]
        hits = after[1]["dyn_engine_cached_prompt_tokens_total"] - before[1]["dyn_engine_cached_prompt_tokens_total"]
        assert hits >= 3 * 4 * 16, hits  # each stem is over 4 blocks of 16 tokens
    finally:
        nats.stop()


@pytest.mark.skipif(shutil.which("nats-server") is None and not os.path.exists("/usr/sbin/nats-server"),
                    reason="nats-server is not installed (scripts/setup.sh installs it)")
def test_kv_router_with_mocker_workers(etcd, procs):
    nats = Nats()
    try:
        workers = [Worker(f"etcd:{etcd.url}", "--model", STORIES, "--served-model-name", "mock", "--engine", "mocker",
                          "--speedup-ratio", "100", "--block-size", "32", "--event-plane", nats.url, name=f"m{i}")
                   for i in range(2)]
        procs.extend(workers)
        fe = frontend(etcd, procs, "--router-mode", "kv", "--event-plane", nats.url)
        fe.wait_model("mock")
        wait_instances(fe, 2)
        stems = [" ".join([f"{w} went to the {p} with a {p}." for _ in range(12)])
                 for w, p in [("Tom", "park"), ("Lily", "shop"), ("Sam", "sea")]]
        applied = fe.metric("dyn_router_kv_events_applied_total") or 0
        for s in stems:
            asyncio.run(stream_one(client_for(fe.url), s, 4, model="mock"))
        fe.wait_kv_events(applied + 3)  # the mockers' stored events, through NATS
        before = sum(w.metrics()["dyn_engine_cached_prompt_tokens_total"] for w in workers)
        for s in stems:
            asyncio.run(stream_one(client_for(fe.url), s + " The end.", 4, model="mock"))
        hits = sum(w.metrics()["dyn_engine_cached_prompt_tokens_total"] for w in workers) - before
        assert hits >= 3 * 3 * 32, hits  # every stem is several 32-token blocks, all found again
        served = [w.metrics()["dyn_engine_generated_tokens_total"] for w in workers]
        assert sum(served) == 6 * 4 and min(served) > 0, served  # exactly max_tokens each, both used
    finally:
        nats.stop()


def test_many_mocker_instances_in_one_process(etcd, procs):
    fleet = Worker(f"etcd:{etcd.url}", "--model", STORIES, "--served-model-name", "mock", "--engine", "mocker",
                   "--speedup-ratio", "1000", "--workers", "4", name="fleet")
    procs.append(fleet)
    fe = frontend(etcd, procs, "--router-mode", "round-robin")
    fe.wait_model("mock")
    wait_instances(fe, 4)
    assert len(etcd.keys("dyn/instances/")) == 4

    async def run():
        c = client_for(fe.url)
        return await asyncio.gather(*[stream_one(c, PROMPTS[i % len(PROMPTS)], 8, model="mock") for i in range(40)])
    texts = asyncio.run(run())
    assert len(texts) == 40
    # Round-robin over 4 instances: the first instance (the one with the local HTTP port) got 10.
    assert fleet.metrics()["dyn_engine_generated_tokens_total"] == 10 * 8
    fleet.stop()
    _wait(lambda: len(etcd.keys("dyn/instances/")) == 0, 10, "fleet deregistered")
