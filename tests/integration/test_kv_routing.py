"""KV-aware routing end to end: `dyn run --workers N --router kv` (in-process mocker workers), the
worker id in responses, busy thresholds (503), and a frontend that starts after its workers
learning their caches from their KV dumps (real etcd + nats-server)."""
import os
import re
import shutil
import time

import httpx
import pytest

from cluster import Etcd, Frontend, Nats, Worker, _wait
from dyn_server import STORIES, DynServer

HAVE_CLUSTER = (shutil.which("etcd") or os.path.exists("/usr/bin/etcd")) and \
    (shutil.which("nats-server") or os.path.exists("/usr/sbin/nats-server"))

# Prompts of ~300 tokens that share nothing with each other, each sent with several endings.
STEMS = [" ".join([f"{w} went to the {p} with a {p} and {n} friends." for _ in range(14)])
         for w, p, n in [("Tom", "park", "two"), ("Lily", "shop", "six"), ("Sam", "sea", "ten"),
                         ("Ann", "zoo", "four")]]


def complete(url, prompt, max_tokens=4, stream=False, model="mock"):
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": stream}
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    return r


def worker_of(r):
    wid = r.headers.get("x-dyn-worker-id")
    assert wid is not None, r.headers
    return int(wid)


def metric(url, name):
    for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(name):
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.fixture
def kv_run():
    s = DynServer("--model", STORIES, "--served-model-name", "mock", "--engine", "mocker", "--workers", "4",
                  "--router", "kv", "--block-size", "16", "--speedup-ratio", "100")
    yield s
    s.stop()


def test_in_process_kv_router_keeps_each_prefix_on_one_worker(kv_run):
    owners = {}
    for round_ in range(3):
        for i, stem in enumerate(STEMS):
            r = complete(kv_run.url, stem + f" Ending {round_}.")
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["usage"]["completion_tokens"] == 4
            wid = worker_of(r)
            nv = body["nvext"]["worker_id"]
            assert nv["prefill_worker_id"] == wid and nv["decode_worker_id"] == wid
            owners.setdefault(i, set()).add(wid)
            if round_ > 0:  # the prefix was found again in that worker's cache
                assert body["usage"]["prompt_tokens_details"]["cached_tokens"] >= 250, body["usage"]
    assert all(len(ws) == 1 for ws in owners.values()), owners
    # Load spreads: four unrelated prefixes do not all land on one worker.
    assert len({next(iter(ws)) for ws in owners.values()}) >= 2, owners
    assert metric(kv_run.url, "dyn_router_decisions_total") == 12
    assert metric(kv_run.url, "dyn_router_kv_events_applied_total") > 0


def test_streaming_response_names_its_worker(kv_run):
    with httpx.stream("POST", kv_run.url + "/v1/completions", timeout=60,
                      json={"model": "mock", "prompt": STEMS[0], "max_tokens": 3, "stream": True}) as r:
        assert r.status_code == 200
        wid = worker_of(r)
        text = r.read().decode()
    m = re.search(r'"nvext":\{"worker_id":\{"prefill_worker_id":(\d+),"decode_worker_id":(\d+)\}\}', text)
    assert m and int(m.group(1)) == wid == int(m.group(2)), text[:600]
    assert text.rstrip().endswith("data: [DONE]")


def test_round_robin_spreads_the_same_prefix():
    s = DynServer("--model", STORIES, "--served-model-name", "mock", "--engine", "mocker", "--workers", "3",
                  "--router", "round-robin", "--block-size", "16", "--speedup-ratio", "100")
    try:
        seen = [worker_of(complete(s.url, STEMS[0] + f" {i}")) for i in range(6)]
        assert sorted(set(seen)) == [1, 2, 3], seen
    finally:
        s.stop()


def test_all_workers_busy_gets_503_and_is_counted():
    # Threshold 0: a worker with any KV block in use is busy. Two slow streams occupy both
    # workers; a third request finds no free worker.
    s = DynServer("--model", STORIES, "--served-model-name", "mock", "--engine", "mocker", "--workers", "2",
                  "--router", "kv", "--block-size", "16", "--speedup-ratio", "1",
                  "--active-decode-blocks-threshold", "0")
    try:
        streams = []
        for stem in STEMS[:2]:
            cm = httpx.stream("POST", s.url + "/v1/completions", timeout=120,
                              json={"model": "mock", "prompt": stem, "max_tokens": 400, "stream": True})
            r = cm.__enter__()
            assert r.status_code == 200
            streams.append((cm, r))
        busy = {worker_of(r) for _, r in streams}
        assert busy == {1, 2}, busy
        time.sleep(0.5)  # load reports (every 100 ms) show both workers' KV in use
        r = complete(s.url, STEMS[2])
        assert r.status_code == 503, r.text
        err = r.json()["error"]
        assert "busy" in err["message"], err
        assert metric(s.url, "dyn_router_rejections_total") == 1
        for cm, _ in streams:
            cm.__exit__(None, None, None)  # disconnect: the streams are cancelled
        _wait(lambda: complete(s.url, STEMS[3], max_tokens=2).status_code == 200, 20, "a worker free again")
    finally:
        s.stop()


@pytest.mark.skipif(not HAVE_CLUSTER, reason="etcd and nats-server are needed (scripts/setup.sh installs them)")
def test_frontend_started_after_workers_learns_their_caches_from_dumps():
    etcd, nats, procs = Etcd(), Nats(), []
    try:
        fleet = Worker(f"etcd:{etcd.url}", "--model", STORIES, "--served-model-name", "mock", "--engine", "mocker",
                       "--speedup-ratio", "100", "--block-size", "16", "--workers", "2", "--event-plane", nats.url,
                       name="fleet")
        procs.append(fleet)
        fe = Frontend(f"etcd:{etcd.url}", "--router", "kv", "--event-plane", nats.url)
        procs.append(fe)
        fe.wait_model("mock")
        _wait(lambda: fe.metric("dyn_router_kv_dumps_applied_total") == 2, 20, "initial dumps", fe.proc, fe.logs)
        owners = {i: worker_of(complete(fe.url, stem)) for i, stem in enumerate(STEMS)}
        assert len(set(owners.values())) == 2, owners
        time.sleep(0.5)  # the workers' KV events reach the old frontend; they do not matter below
        fe.stop()
        procs.remove(fe)
        # A new frontend never saw those events: only the workers' dumps can tell it.
        fe2 = Frontend(f"etcd:{etcd.url}", "--router", "kv", "--event-plane", nats.url)
        procs.append(fe2)
        fe2.wait_model("mock")
        _wait(lambda: fe2.metric("dyn_router_kv_dumps_applied_total") == 2, 20, "dumps", fe2.proc, fe2.logs)
        for i, stem in enumerate(STEMS):
            r = complete(fe2.url, stem + " Again.")
            assert worker_of(r) == owners[i], (i, owners)
            assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= 250
    finally:
        for p in reversed(procs):
            p.stop()
        nats.stop()
        etcd.stop()


@pytest.mark.skipif(not HAVE_CLUSTER, reason="etcd and nats-server are needed (scripts/setup.sh installs them)")
def test_external_engine_kv_events_from_zmq_steer_routing():
    """A vLLM-style ZMQ publisher (real pyzmq + msgpack, vLLM's wire format) announces blocks for a
    worker; the frontend routes prompts with those prefixes to it although its own engine never
    computed them."""
    import msgpack
    import zmq
    from dyn_server import free_port
    etcd, nats, procs = Etcd(), Nats(), []
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    port = free_port()
    pub.bind(f"tcp://127.0.0.1:{port}")
    try:
        ext = Worker(f"etcd:{etcd.url}", "--model", STORIES, "--served-model-name", "mock", "--engine", "mocker",
                     "--speedup-ratio", "100", "--event-plane", nats.url,
                     "--kv-events-zmq", f"tcp://127.0.0.1:{port}", name="external")
        procs.append(ext)
        own = Worker(f"etcd:{etcd.url}", "--model", STORIES, "--served-model-name", "mock", "--engine", "mocker",
                     "--speedup-ratio", "100", "--block-size", "16", "--event-plane", nats.url, name="own")
        procs.append(own)
        ext_id = int(re.search(r"KV events of instance (\d+) come from", ext.logs()).group(1))
        fe = Frontend(f"etcd:{etcd.url}", "--router", "kv", "--event-plane", nats.url)
        procs.append(fe)
        fe.wait_model("mock")
        _wait(lambda: fe.metric("dyn_router_kv_dumps_applied_total") == 2, 20, "dumps", fe.proc, fe.logs)
        time.sleep(0.5)  # ZMQ subscriptions propagate asynchronously

        def tokens(text):
            return httpx.post(fe.url + "/tokenize", json={"model": "mock", "prompt": text}, timeout=10).json()["tokens"]

        next_hash = 1 << 62
        for seq, stem in enumerate(STEMS[:3]):
            ids = tokens(stem)
            n = len(ids) // 64  # the mocker's (and so the router's) block size is 64
            hashes = list(range(next_hash, next_hash + n))
            next_hash += n
            event = ["BlockStored", hashes, None, ids[:n * 64], 64, None, "GPU", None]
            pub.send_multipart([b"kv-events", seq.to_bytes(8, "big"), msgpack.packb([time.time(), [event], None])])
        _wait(lambda: fe.metric("dyn_router_kv_events_applied_total") >= 3, 10, "zmq events at the router",
              fe.proc, fe.logs)
        for stem in STEMS[:3]:
            r = complete(fe.url, stem + " And then?")
            assert r.status_code == 200, r.text
            assert worker_of(r) == ext_id
    finally:
        for p in reversed(procs):
            p.stop()
        pub.close(0)
        ctx.term()
        nats.stop()
        etcd.stop()


@pytest.mark.skipif(not HAVE_CLUSTER, reason="etcd and nats-server are needed (scripts/setup.sh installs them)")
@pytest.mark.parametrize("kv_events", ["true", "false"])
def test_frontend_kv_router_with_two_mocker_workers(kv_events):
    """`dyn frontend --router kv` and two mocker workers in another process over etcd and NATS:
    prompts sharing a prefix go to the worker that holds it, with the workers' KV events and in
    approximate mode (no events: the router remembers where it sent each prefix)."""
    etcd, nats, procs = Etcd(), Nats(), []
    try:
        fleet = Worker(f"etcd:{etcd.url}", "--model", STORIES, "--served-model-name", "mock", "--engine", "mocker",
                       "--speedup-ratio", "100", "--block-size", "16", "--workers", "2", "--event-plane", nats.url,
                       name="fleet")
        procs.append(fleet)
        fe = Frontend(f"etcd:{etcd.url}", "--router", "kv", "--event-plane", nats.url, "--kv-events=" + kv_events)
        procs.append(fe)
        fe.wait_model("mock")
        _wait(lambda: len(etcd.keys("dyn/instances/")) == 2, 20, "two instances")
        time.sleep(1)  # the frontend has both
        owners = {}
        for round_ in range(3):
            for i, stem in enumerate(STEMS):
                r = complete(fe.url, stem + f" Part {round_}.")
                assert r.status_code == 200, r.text
                owners.setdefault(i, set()).add(worker_of(r))
                if round_ > 0:
                    assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= 250
            time.sleep(0.3)  # events travel through NATS
        assert all(len(ws) == 1 for ws in owners.values()), owners
        assert len({next(iter(ws)) for ws in owners.values()}) == 2, owners  # both workers used
        applied = fe.metric("dyn_router_kv_events_applied_total")
        if kv_events == "true":
            assert applied > 0
    finally:
        for p in reversed(procs):
            p.stop()
        nats.stop()
        etcd.stop()
