"""Starts real `dyn` processes for integration tests and stops them afterwards."""
import os
import random
import signal
import socket
import subprocess
import time

import httpx

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SHARED = os.path.abspath(os.path.join(REPO, "..", "shared"))
STORIES = os.path.join(SHARED, "models", "stories260K", "hf")
SMOLLM2 = os.path.join(REPO, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")


def dyn_bin():
    return os.environ.get("DYN_BIN", os.path.join(REPO, "build", "apps", "dyn", "dyn"))


_handed_out = set()
_rng = random.Random()  # seeded from the OS: parallel test processes draw different ports


def _ephemeral_low():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port():
    """A loopback port free now for a server started next. Drawn below the kernel's ephemeral
    range: a port the kernel picks for `bind(0)` is an ephemeral one, and before the server binds
    it another process's outgoing connection (to etcd, NATS, a worker) can take it as its source
    port ("Address already in use" in CI). Not handed out twice by this process."""
    low = _ephemeral_low()
    for _ in range(500):
        port = _rng.randrange(10000, low) if low > 11000 else 0
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            port = s.getsockname()[1]
        _handed_out.add(port)
        return port
    raise RuntimeError("no free loopback port")


class DynServer:
    """`dyn run` on a free loopback port; `url` is its base URL once it answers /health."""

    def __init__(self, *args, env=None, timeout=120):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [dyn_bin(), "run", "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.log_path = os.path.join(REPO, "build", f"dyn-test-{self.port}.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dyn exited with {self.proc.returncode}: {self.logs()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"dyn did not become healthy in {timeout}s: {self.logs()}")

    def logs(self):
        with open(self.log_path) as f:
            return f.read()[-4000:]

    def alive(self):
        return self.proc.poll() is None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode
