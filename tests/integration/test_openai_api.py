"""The OpenAI-compatible API of `dyn run`, through the official `openai` client and raw HTTP.

Runs against the binary in $DYN_BIN (default build/apps/dyn/dyn) with the echo engine (which
streams the prompt's tokens back, so every expected output is computable with the HF `tokenizers`
library) on the stories260K tokenizer, plus a smoke test of the native engine.
"""
import json
import os
import re
import signal
import subprocess
import tempfile
import time

import httpx
import openai
import pytest

from dyn_server import free_port

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
STORIES = os.path.abspath(os.path.join(REPO, "..", "shared", "models", "stories260K", "hf"))
DYN_BIN = os.environ.get("DYN_BIN", os.path.join(REPO, "build", "apps", "dyn", "dyn"))
MODEL = "stories-echo"
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if enable_thinking %}think: {% endif %}{% if add_generation_prompt %}assistant:{% endif %}")

if not os.path.exists(DYN_BIN):
    pytest.skip(f"dyn binary not found at {DYN_BIN} (build it, or set DYN_BIN)", allow_module_level=True)


class Server:
    """`dyn run` on a free loopback port, ready once GET /health answers 200."""

    def __init__(self, *args, timeout=60):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="dyn-openai-", suffix=".log", delete=False)
        cmd = [DYN_BIN, "run", "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dyn exited with {self.proc.returncode}: {self.logs()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"dyn did not become healthy in {timeout}s: {self.logs()}")

    def logs(self):
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()[-4000:]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def template_file():
    with tempfile.NamedTemporaryFile("w", suffix=".jinja", delete=False) as f:
        f.write(CHAT_TEMPLATE)
    yield f.name
    os.unlink(f.name)


@pytest.fixture(scope="module")
def server(template_file):
    s = Server("--model", STORIES, "--engine", "echo", "--served-model-name", MODEL,
               "--chat-template", template_file)
    yield s
    assert s.proc.poll() is None, "server died during the tests: " + s.logs()
    assert s.stop() == 0


@pytest.fixture(scope="module")
def slow_server(template_file):
    s = Server("--model", STORIES, "--engine", "echo", "--served-model-name", MODEL,
               "--chat-template", template_file, "--echo-delay-ms", "5")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def hf_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    return tokenizers.Tokenizer.from_file(os.path.join(STORIES, "tokenizer.json"))


def echo_text(tok, prompt_ids, max_tokens):
    """What the echo engine's tokens detokenize to, in the context of the prompt (as vLLM does)."""
    generated = [prompt_ids[i % len(prompt_ids)] for i in range(max_tokens)]
    full = tok.decode(prompt_ids + generated, skip_special_tokens=True)
    head = tok.decode(prompt_ids, skip_special_tokens=True)
    return full[len(head):]


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_completion_echoes_prompt_tokens(client, hf_tokenizer):
    prompt = "Once upon a time, there was a little dog"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=11)
    ids = hf_tokenizer.encode(prompt).ids
    assert r.choices[0].text == echo_text(hf_tokenizer, ids, 11)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == 11
    assert r.usage.total_tokens == len(ids) + 11
    assert r.id.startswith("cmpl-")
    assert r.model == MODEL


def test_completion_stream_equals_non_stream(client):
    kwargs = dict(model=MODEL, prompt="The cat sat on the mat", max_tokens=20)
    whole = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert len({c.id for c in chunks}) == 1


def test_chat(client, hf_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=9)
    prompt = "<s>system: Be brief.\nuser: Tell me a story\nassistant:"
    ids = hf_tokenizer.encode(prompt, add_special_tokens=False).ids
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == echo_text(hf_tokenizer, ids, 9)
    assert r.usage.prompt_tokens == len(ids)
    assert r.id.startswith("chatcmpl-")

    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=9, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage.prompt_tokens == len(ids)


def test_chat_template_kwargs(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    plain = httpx.post(server.url + "/tokenize", json=body).json()
    thinking = httpx.post(server.url + "/tokenize", json={**body, "chat_template_kwargs": {"enable_thinking": True}}).json()
    assert thinking["count"] > plain["count"]
    text = httpx.post(server.url + "/detokenize", json={"model": MODEL, "tokens": thinking["tokens"]}).json()["prompt"]
    assert text.endswith("think: assistant:")


def test_n_and_prompt_lists(client):
    r = client.completions.create(model=MODEL, prompt=["a cat", "the dog ran"], n=2, max_tokens=3)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text
    assert r.choices[1].text != r.choices[2].text
    r = client.completions.create(model=MODEL, prompt=[1, 300, 301, 302], max_tokens=4)
    assert r.usage.prompt_tokens == 4


def test_stop_strings(client):
    kwargs = dict(model=MODEL, prompt="Once upon a time there was a girl named Lily", max_tokens=40)
    whole = client.completions.create(**kwargs).choices[0].text
    stop = whole[10:14]
    expected = whole[:whole.find(stop)]
    r = client.completions.create(**kwargs, stop=[stop, "zzzz"])
    assert r.choices[0].text == expected
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kwargs, stop=stop, stream=True))
    assert streamed == expected
    r = client.completions.create(**kwargs, stop=stop, extra_body={"include_stop_str_in_output": True})
    assert r.choices[0].text == expected + stop


def test_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    assert all(len(c.top_logprobs) == 3 and c.bytes == list(c.token.encode()) for c in content)
    r = client.completions.create(model=MODEL, prompt="a cat sat", max_tokens=4, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4


def test_max_completion_tokens_wins(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                       max_completion_tokens=6)
    assert r.usage.completion_tokens == 6


@pytest.mark.parametrize("kwargs,param", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"temperature": 5}, "temperature"),
    ({"n": 0}, "n"),
    ({"top_p": 0}, "top_p"),
])
def test_bad_parameters(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", **kwargs)
    assert e.value.status_code == 400
    assert e.value.body["param"] == param


def test_unknown_model(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])


def test_raw_http_errors(server):
    url = server.url
    cases = [
        ("POST", "/v1/completions", b'{"model": "x",', 400),
        ("POST", "/v1/completions", b'{"model": "' + MODEL.encode() + b'", "prompt": "\xff\xfe"}', 400),
        ("POST", "/v1/completions", json.dumps({"model": MODEL, "prompt": "hi", "stream": "yes"}).encode(), 400),
        ("POST", "/v1/completions", json.dumps({"model": MODEL}).encode(), 400),
        ("GET", "/v1/completions", b"", 405),
        ("GET", "/nope", b"", 404),
        ("POST", "/v1/completions", b'{"model":"' + MODEL.encode() + b'","prompt":"' + b"a" * (9 << 20) + b'"}', 413),
    ]
    for method, path, body, status in cases:
        r = httpx.request(method, url + path, content=body, headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == status, (path, body[:40], r.text)
        err = r.json()["error"]
        assert set(err) >= {"message", "type", "param", "code"} and err["message"]
    assert httpx.get(url + "/health").status_code == 200


def test_context_length_error(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=10 ** 9)
    assert e.value.body["code"] == "context_length_exceeded"
    assert re.search(r"\d+", e.value.body["message"])


def test_tokenize_detokenize(server, hf_tokenizer):
    r = httpx.post(server.url + "/tokenize", json={"model": MODEL, "prompt": "Lily liked the sun"}).json()
    assert r["tokens"] == hf_tokenizer.encode("Lily liked the sun").ids
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] > 0
    d = httpx.post(server.url + "/detokenize", json={"model": MODEL, "tokens": r["tokens"]}).json()
    assert d["prompt"] == hf_tokenizer.decode(r["tokens"], skip_special_tokens=False)


def test_request_ids(server):
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 1},
                   headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r2 = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 1})
    assert r2.headers["x-request-id"] and r2.json()["id"] != r.json()["id"]


def _engine_running(url):
    text = httpx.get(url + "/metrics").text
    m = re.search(r'^dyn_engine_running_requests\{model="[^"]+"\} (\d+)$', text, re.M)
    return int(m.group(1)) if m else None


def test_disconnect_cancels_engine_request(slow_server):
    body = {"model": MODEL, "prompt": "once upon a time", "max_tokens": 5000, "stream": True}
    with httpx.Client(timeout=10) as c:
        with c.stream("POST", slow_server.url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            assert _engine_running(slow_server.url) == 1
    deadline = time.time() + 5
    while time.time() < deadline and _engine_running(slow_server.url) != 0:
        time.sleep(0.05)
    assert _engine_running(slow_server.url) == 0
    assert 'status="499"' in httpx.get(slow_server.url + "/metrics").text


def test_metrics(server, client):
    client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    text = httpx.get(server.url + "/metrics").text
    for name in ["dyn_frontend_requests_total", "dyn_frontend_inflight_requests", "dyn_frontend_time_to_first_token_seconds_bucket",
                 "dyn_frontend_inter_token_latency_seconds_bucket", "dyn_frontend_input_tokens_total",
                 "dyn_frontend_output_tokens_total", "dyn_frontend_cached_tokens_total", "dyn_engine_running_requests"]:
        assert name in text, name
    assert re.search(r'dyn_frontend_requests_total\{endpoint="/v1/completions",status="200"\} [1-9]', text)


def test_native_engine_smoke():
    """The native engine behind the same API: greedy is deterministic; streaming equals non-streaming."""
    try:
        s = Server("--model", STORIES, "--engine", "native", "--served-model-name", "stories", timeout=120)
    except RuntimeError as e:
        pytest.fail(str(e))
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        kwargs = dict(model="stories", prompt="Once upon a time", max_tokens=24, temperature=0)
        a = c.completions.create(**kwargs)
        b = c.completions.create(**kwargs)
        assert a.choices[0].text == b.choices[0].text and a.choices[0].text
        assert "".join(ch.choices[0].text for ch in c.completions.create(**kwargs, stream=True)) == a.choices[0].text
    finally:
        s.stop()
