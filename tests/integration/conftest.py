import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402

from cluster import Etcd  # noqa: E402


@pytest.fixture
def etcd():
    """A fresh etcd on free loopback ports, stopped (and its data removed) after the test."""
    e = Etcd()
    yield e
    e.stop()


@pytest.fixture
def procs():
    """Processes a test starts (append them); stopped in reverse order after the test."""
    started = []
    yield started
    for p in reversed(started):
        p.stop()
