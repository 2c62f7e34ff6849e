"""`dyn run` refuses bad engine settings at start-up with a clear message and a non-zero exit,
before it loads anything or binds a port."""
import os
import subprocess

import pytest

from dyn_server import SMOLLM2, dyn_bin, free_port

if not os.path.exists(dyn_bin()):
    pytest.skip(f"dyn binary not found at {dyn_bin()}", allow_module_level=True)
if not os.path.exists(SMOLLM2):
    pytest.skip(f"model not found at {SMOLLM2}", allow_module_level=True)


def run(*args):
    cmd = [dyn_bin(), "run", "--model", SMOLLM2, "--port", str(free_port()), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("value", ["1.5", "0", "-0.2", "nan"])
def test_gpu_memory_utilization_out_of_range(value):
    p = run("--gpu-memory-utilization", value)
    assert p.returncode != 0
    assert "--gpu-memory-utilization must be in (0, 1]" in p.stderr + p.stdout


def test_unknown_device():
    p = run("--device", "tpu")
    assert p.returncode != 0
    assert "tpu" in p.stderr + p.stdout
