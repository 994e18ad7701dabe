"""Small traffic probes run inside VM namespaces with the venv's Python: a TCP connect
with an echo, a UDP request/reply, and a steady numbered UDP stream with its counter."""
from __future__ import annotations

import json
import time

TCP_SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", {port})); s.listen(8); s.settimeout({seconds})
print("ready", flush=True)
try:
    while True:
        c, _ = s.accept(); c.settimeout(2)
        data = c.recv(100); c.sendall(b"echo:" + data); c.close()
except socket.timeout:
    pass
"""

TCP_CLIENT = """
import socket, json
s = socket.socket(); s.settimeout({timeout})
try:
    s.connect(("{dst}", {port})); s.sendall(b"hello"); r = s.recv(100)
    print(json.dumps({{"ok": r == b"echo:hello"}}))
except OSError as e:
    print(json.dumps({{"ok": False, "error": str(e)}}))
"""

UDP_SERVER = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", {port}))
s.settimeout({seconds}); print("ready", flush=True)
try:
    while True:
        d, a = s.recvfrom(2048); s.sendto(b"echo:" + d, a)
except socket.timeout:
    pass
"""

UDP_CLIENT = """
import socket, json
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout({timeout})
ok = False
for _ in range(3):
    s.sendto(b"hello", ("{dst}", {port}))
    try:
        d, _ = s.recvfrom(2048); ok = d == b"echo:hello"; break
    except socket.timeout:
        pass
print(json.dumps({{"ok": ok}}))
"""

STREAM_RECEIVER = """
import socket, json, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", {port}))
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.settimeout({idle}); print("ready", flush=True)
seen = set()
try:
    while True:
        d, _ = s.recvfrom(64)
        seen.add(int(d))
except socket.timeout:
    pass
print(json.dumps({{"received": len(seen), "max": max(seen) if seen else -1}}))
"""

STREAM_SENDER = """
import socket, json, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
n, rate, t0 = {count}, {rate}, time.monotonic()
for i in range(n):
    s.sendto(str(i).encode(), ("{dst}", {port}))
    delay = t0 + (i + 1) / rate - time.monotonic()
    if delay > 0:
        time.sleep(delay)
print(json.dumps({{"sent": n}}))
"""


def _wait_ready(proc, timeout=10):
    deadline = time.monotonic() + timeout
    line = proc.stdout.readline()
    if "ready" not in line or time.monotonic() > deadline:
        raise RuntimeError(f"probe server did not start: {line!r} {proc.stderr.read()}")


def tcp_probe(lab, src_vm, dst_vm, port: int, timeout: float = 1.5) -> bool:
    srv = lab.vm_python(dst_vm, TCP_SERVER.format(port=port, seconds=timeout + 3),
                        background=True)
    try:
        _wait_ready(srv)
        r = lab.vm_python(src_vm, TCP_CLIENT.format(dst=dst_vm.ip, port=port, timeout=timeout))
        return json.loads(r.stdout or '{"ok": false}')["ok"]
    finally:
        srv.kill()
        srv.wait()


def udp_probe(lab, src_vm, dst_vm, port: int, timeout: float = 0.5) -> bool:
    srv = lab.vm_python(dst_vm, UDP_SERVER.format(port=port, seconds=3 * timeout + 3),
                        background=True)
    try:
        _wait_ready(srv)
        r = lab.vm_python(src_vm, UDP_CLIENT.format(dst=dst_vm.ip, port=port, timeout=timeout))
        return json.loads(r.stdout or '{"ok": false}')["ok"]
    finally:
        srv.kill()
        srv.wait()


def ping(lab, src_vm, dst_vm, count: int = 2) -> bool:
    r = lab.vm_run(src_vm, ["ping", "-c", str(count), "-W", "1", "-i", "0.2", dst_vm.ip])
    return r.returncode == 0


class Stream:
    """A numbered UDP stream src -> dst at `rate` packets/s; result() says sent/received."""

    def __init__(self, lab, src_vm, dst_vm, port: int, count: int, rate: int):
        self.rx = lab.vm_python(dst_vm, STREAM_RECEIVER.format(port=port, idle=3),
                                background=True)
        _wait_ready(self.rx)
        self.tx = lab.vm_python(src_vm, STREAM_SENDER.format(dst=dst_vm.ip, port=port,
                                                             count=count, rate=rate),
                                background=True)

    def result(self, timeout: float = 120) -> dict:
        out_tx, _ = self.tx.communicate(timeout=timeout)
        out_rx, _ = self.rx.communicate(timeout=timeout)
        res = json.loads(out_tx.strip().splitlines()[-1])
        res.update(json.loads(out_rx.strip().splitlines()[-1]))
        res["lost"] = res["sent"] - res["received"]
        return res
