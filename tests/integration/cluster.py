"""Real distributed dyn on one machine for integration tests: etcd, nats-server, `dyn worker`
processes and a `dyn frontend`, each on free loopback ports, with their logs under build/."""
import os
import shutil
import signal
import subprocess
import tempfile
import time

import httpx

from dyn_server import REPO, dyn_bin, free_port

LOG_DIR = os.path.join(REPO, "build", "cluster-logs")


def _wait(pred, timeout, what, proc=None, logs=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {logs() if logs else ''}")
        try:
            if pred():
                return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what} not ready in {timeout}s: {logs() if logs else ''}")


class Proc:
    """A child process with its output in a log file."""

    def __init__(self, name, cmd, env=None):
        os.makedirs(LOG_DIR, exist_ok=True)
        self.name = name
        self.cmd = cmd
        self.log_path = os.path.join(LOG_DIR, f"{name}-{os.getpid()}-{time.time_ns()}.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})

    def logs(self):
        with open(self.log_path) as f:
            return f.read()[-6000:]

    def alive(self):
        return self.proc.poll() is None

    def signal(self, sig):
        if self.alive():
            self.proc.send_signal(sig)

    def kill(self):
        self.signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout=20):
        if self.alive():
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


class Etcd:
    def __init__(self, client_port=None, peer_port=None):
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self.url = f"http://127.0.0.1:{self.client_port}"
        self.proc = None
        self.data_dir = None
        self.start()

    def start(self, fresh=True):
        if fresh or self.data_dir is None:
            if self.data_dir:
                shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = tempfile.mkdtemp(prefix="dyn-etcd-")
        peer = f"http://127.0.0.1:{self.peer_port}"
        self.proc = Proc("etcd", [
            shutil.which("etcd") or "/usr/bin/etcd", "--data-dir", self.data_dir, "--name", "default",
            "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"default={peer}"])
        _wait(lambda: httpx.get(self.url + "/health", timeout=1).status_code == 200, 30, "etcd",
              self.proc.proc, self.proc.logs)

    def keys(self, prefix):
        import base64
        key = base64.b64encode(prefix.encode()).decode()
        end = base64.b64encode(prefix[:-1].encode() + bytes([ord(prefix[-1]) + 1])).decode()
        r = httpx.post(self.url + "/v3/kv/range", json={"key": key, "range_end": end, "keys_only": True}, timeout=2)
        return [base64.b64decode(kv["key"]).decode() for kv in r.json().get("kvs", [])]

    def kill(self):
        self.proc.kill()

    def stop(self):
        if self.proc:
            self.proc.stop()
        if self.data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)


class Nats:
    def __init__(self, port=None):
        self.port = port or free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.start()

    def start(self):
        self.proc = Proc("nats", [shutil.which("nats-server") or "/usr/sbin/nats-server",
                                  "-a", "127.0.0.1", "-p", str(self.port)])
        import socket

        def up():
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        _wait(up, 20, "nats-server", self.proc.proc, self.proc.logs)

    def kill(self):
        self.proc.kill()

    def stop(self):
        self.proc.stop()


class Worker(Proc):
    """`dyn worker` with its local HTTP port (OpenAI API + /metrics) for reading its state."""

    def __init__(self, discovery, *args, name="worker", lease_ttl=2):
        self.http_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        super().__init__(name, [dyn_bin(), "worker", "--discovery", discovery, "--host", "127.0.0.1",
                                "--http-port", str(self.http_port), "--lease-ttl", str(lease_ttl), *args])
        _wait(lambda: httpx.get(self.url + "/health", timeout=1).status_code == 200, 60, name,
              self.proc, self.logs)
        _wait(lambda: "registered in" in self.logs(), 30, name + " registration", self.proc, self.logs)

    def metrics(self):
        out = {}
        for line in httpx.get(self.url + "/metrics", timeout=5).text.splitlines():
            if line.startswith("dyn_engine_"):
                name, value = line.rsplit(" ", 1)
                out[name.split("{")[0]] = float(value)
        return out


class Frontend(Proc):
    def __init__(self, discovery, *args):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__("frontend", [dyn_bin(), "frontend", "--discovery", discovery, "--host", "127.0.0.1",
                                      "--port", str(self.port), *args])
        _wait(lambda: httpx.get(self.url + "/health", timeout=1).status_code == 200, 30, "frontend",
              self.proc, self.logs)

    def models(self):
        return [m["id"] for m in httpx.get(self.url + "/v1/models", timeout=5).json()["data"]]

    def wait_model(self, name, timeout=30):
        _wait(lambda: name in self.models(), timeout, f"model {name} on the frontend", self.proc, self.logs)

    def metric(self, name, model=None):
        for line in httpx.get(self.url + "/metrics", timeout=5).text.splitlines():
            if line.startswith(name) and (model is None or f'model="{model}"' in line):
                return float(line.rsplit(" ", 1)[1])
        return None

    def wait_kv_events(self, at_least, timeout=20, quiet=0.3):
        """Waits until the KV router has applied at least `at_least` worker KV events in all and
        none has arrived for `quiet` s (events travel through NATS or ZMQ, asynchronously)."""
        name = "dyn_router_kv_events_applied_total"
        deadline = time.time() + timeout
        last, since = None, time.time()
        while time.time() < deadline:
            value = self.metric(name) or 0
            if value != last:
                last, since = value, time.time()
            elif value >= at_least and time.time() - since >= quiet:
                return value
            time.sleep(0.05)
        raise RuntimeError(f"KV events at the router: {last} applied, wanted {at_least}: {self.logs()}")
