"""Shared by every tier: this directory on sys.path (pytest's rootdir import mode puts a
conftest's directory there), so tests import `fuzzing` (Hypothesis helpers of the fuzz
tests, issue 14); and the lock on the one global switch two tiers touch."""
from __future__ import annotations

import fcntl
import os
import tempfile
import time

import pytest

# BPF run-time statistics are global: on for every program while any process holds a
# BPF_ENABLE_STATS fd. The bpf tier asserts they stop when its fd is closed; a lab agent
# with [metrics] bpf_stats = true holds one. `bash setup.sh test` runs those tiers at once
# (.ci/tiers), so both take this lock (a file lock: other processes, and runs of other
# checkouts on the machine, see it too; the kernel drops it when the holder dies).
BPF_STATS_LOCK = os.path.join(tempfile.gettempdir(), "xdpflow-tests-bpf-stats.lock")
BPF_STATS_WAIT = 900.0     # longer than any module holding it; then a named failure


@pytest.fixture(scope="module")
def bpf_stats_to_ourselves():
    """Nobody else's BPF_ENABLE_STATS fd (of a test run that takes this lock) is open
    while the module runs."""
    fd = os.open(BPF_STATS_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline = time.monotonic() + BPF_STATS_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"{BPF_STATS_LOCK} held by another test run for "
                                f"{BPF_STATS_WAIT:.0f}s")
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)         # closing the fd releases the lock
