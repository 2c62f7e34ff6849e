"""Starts real `dyn` processes for integration tests and stops them afterwards."""
import os
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


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
