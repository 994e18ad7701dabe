"""Found by the hostile-client tests (issue 14 item 5): with its listen queue full, a unix
socket refuses a connect with a timeout at once (EAGAIN), and 200 `xdpflowctl` at once were
told "cannot reach the agent ... is the agent running?". The client now waits for room."""
from __future__ import annotations

import concurrent.futures
import json
import socket
import threading
import time

import pytest

from agent.api import ApiClient, ApiError

pytestmark = pytest.mark.unit


def test_a_client_waits_for_room_in_a_full_listen_queue(tmp_path):
    path = str(tmp_path / "agent.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    n = 6

    def serve():
        time.sleep(0.5)               # busy: the queue fills meanwhile
        for _ in range(n):
            c, _ = srv.accept()
            c.recv(65536)
            c.sendall(json.dumps({"ok": True, "result": "served"}).encode() + b"\n")
            c.close()

    t = threading.Thread(target=serve)
    t.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            got = list(pool.map(lambda _: ApiClient(path, timeout=10).call("status"), range(n)))
        assert got == ["served"] * n
    finally:
        t.join(15)
        srv.close()


def test_a_queue_that_stays_full_is_busy_not_gone(tmp_path):
    path = str(tmp_path / "agent.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(0)
    held = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(2)]
    try:
        for h in held:                # fill the queue (never accepted)
            h.setblocking(False)
            try:
                h.connect(path)
            except BlockingIOError:
                pass
        with pytest.raises(ApiError, match="busy"):
            ApiClient(path, timeout=0.5).call("status")
    finally:
        for h in held:
            h.close()
        srv.close()
