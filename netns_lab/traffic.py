"""Real traffic between lab VMs (netns_lab.lab.VM): small Python servers, clients and a
paced UDP stream, each run as its own process inside a VM's network namespace
(`nsenter --net`)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

from .netns import run

# A TCP or UDP server: answers every message with "IDENT:message" and, when its stdin
# closes, prints what it received as one JSON list.
SERVER = r'''
import json, select, socket, sys
proto, port, ident = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if proto == "tcp":
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(16)
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
got = []
print("ready", flush=True)
while True:
    r, _, _ = select.select([s, sys.stdin], [], [])
    if sys.stdin in r and not sys.stdin.readline():
        break
    if s not in r:
        continue
    if proto == "tcp":
        c, addr = s.accept()
        c.settimeout(2)
        try:
            data = c.recv(1000)
            c.sendall(ident.encode() + b":" + data)
        except OSError:
            data = b""
        c.close()
    else:
        data, addr = s.recvfrom(4096)
        s.sendto(ident.encode() + b":" + data, addr)
    got.append({"src": addr[0], "sport": addr[1], "data": data.decode(errors="replace")})
print(json.dumps(got), flush=True)
'''

# One exchange: send MESSAGE, wait for the answer; prints {"ok": ..., "reply"/"error"}.
CLIENT = r'''
import json, socket, sys
proto, dst, port, sport, msg, timeout = (sys.argv[1], sys.argv[2], int(sys.argv[3]),
                                         int(sys.argv[4]), sys.argv[5], float(sys.argv[6]))
try:
    if proto == "tcp":
        c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if sport:
            c.bind(("0.0.0.0", sport))
        c.settimeout(timeout)
        c.connect((dst, port))
        c.sendall(msg.encode())
        reply = c.recv(1000)
        c.close()
    else:
        c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        if sport:
            c.bind(("0.0.0.0", sport))
        c.settimeout(timeout / 3)
        reply = None
        for _ in range(3):
            c.sendto(msg.encode(), (dst, port))
            try:
                reply, _ = c.recvfrom(4096)
                break
            except socket.timeout:
                continue
        if reply is None:
            raise TimeoutError("no reply")
    print(json.dumps({"ok": True, "reply": reply.decode(errors="replace")}))
except Exception as e:
    print(json.dumps({"ok": False, "error": repr(e)}))
'''

# A paced stream of numbered datagrams until stdin closes; prints how many were sent.
SENDER = r'''
import json, select, socket, sys, time
dst, port, sport, rate = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", sport))
s.sendto(b"warm-up", (dst, port))          # resolves the neighbour before the count starts
time.sleep(0.3)
print("ready", flush=True)
n, errors, t0 = 0, 0, time.monotonic()
while True:
    due = t0 + n / rate
    wait = max(0.0, due - time.monotonic())
    if select.select([sys.stdin], [], [], wait)[0] and not sys.stdin.readline():
        break
    try:
        s.sendto(b"%d" % n, (dst, port))
        n += 1
    except OSError:
        errors += 1
print(json.dumps({"sent": n, "errors": errors}), flush=True)
'''

# Counts the numbered datagrams it receives until stdin closes (then drains for a moment);
# "TAG:N" ones are counted by TAG ("tagged": the tenant isolation test's nonces).
RECEIVER = r'''
import json, select, socket, sys, time
port = int(sys.argv[1])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.bind(("0.0.0.0", port))
print("ready", flush=True)
seen, dups, other, tagged, closing = set(), 0, 0, {}, None
while True:
    timeout = None if closing is None else max(0.0, closing - time.monotonic())
    r, _, _ = select.select([s] + ([sys.stdin] if closing is None else []), [], [], timeout)
    if not r:
        break
    if sys.stdin in r and not sys.stdin.readline():
        closing = time.monotonic() + 0.5
    if s in r:
        data, _ = s.recvfrom(4096)
        if data.isdigit():
            n = int(data)
            dups += n in seen
            seen.add(n)
        elif data.rpartition(b":")[2].isdigit():
            tag = data.rpartition(b":")[0].decode(errors="replace")
            tagged[tag] = tagged.get(tag, 0) + 1
        else:
            other += 1
top = max(seen) if seen else -1
missing = [i for i in range(top + 1) if i not in seen]
print(json.dumps({"received": len(seen), "max": top, "dups": dups, "other": other,
                  "missing": missing[:50], "missing_count": len(missing),
                  "tagged": tagged}), flush=True)
'''


def _script(script: str, *args: Any) -> List[str]:
    return [sys.executable, "-c", script, *[str(a) for a in args]]


def _in_ns(ns: str, script: str, *args: Any) -> List[str]:
    """For a process that runs alongside: netns.run's `nsenter --net`, without waiting."""
    return ["nsenter", f"--net=/run/netns/{ns}", "--", *_script(script, *args)]


class _Proc:
    """A helper process that prints "ready", works until its stdin closes, then prints
    one JSON document."""

    def __init__(self, cmd: List[str], what: str):
        self.what = what
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        line = self.p.stdout.readline()
        if line.strip() != "ready":
            self.p.kill()
            raise AssertionError(f"{what} did not start: {line!r} {self.p.stderr.read()}")
        self._result: Any = None

    def finish(self, timeout: float = 10) -> Any:
        if self._result is None:
            try:
                out, err = self.p.communicate("", timeout=timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                raise AssertionError(f"{self.what} did not finish") from None
            lines = out.strip().splitlines()
            assert self.p.returncode == 0 and lines, f"{self.what} failed: {out} {err}"
            self._result = json.loads(lines[-1])
        return self._result

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()


class Server(_Proc):
    def __init__(self, vm, proto: str, port: int, ident: Optional[str] = None):
        self.ident = ident or f"{vm.tenant}-vm{vm.index}"
        super().__init__(_in_ns(vm.name, SERVER, proto, port, self.ident),
                         f"{proto} server on {vm.tenant}/vm{vm.index}:{port}")

    def received(self) -> List[Dict[str, Any]]:
        return self.finish()


def exchange(vm, proto: str, dst: str, port: int, message: str, sport: int = 0,
             timeout: float = 1.5) -> Dict[str, Any]:
    """One request/answer from a VM; {"ok": True, "reply": ...} or {"ok": False, ...}."""
    p = run(_script(CLIENT, proto, dst, port, sport, message, timeout), ns=vm.name,
            check=False, timeout=timeout * 3 + 10)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def ping(vm, dst: str, count: int = 1, wait: float = 1.0) -> bool:
    """ICMP echo from a VM: True when an answer came back."""
    p = run(["ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", str(wait), dst],
            ns=vm.name, check=False, timeout=count * wait + 10)
    return p.returncode == 0


class Stream:
    """A numbered UDP stream from one VM to another at `rate` datagrams per second."""

    def __init__(self, src_vm, dst_vm, port: int, sport: int, rate: float = 2000):
        self.rx = _Proc(_in_ns(dst_vm.name, RECEIVER, port), "stream receiver")
        try:
            self.tx = _Proc(_in_ns(src_vm.name, SENDER, dst_vm.ip, port, sport, rate),
                            "stream sender")
        except BaseException:
            self.rx.kill()
            raise
        self.started = time.monotonic()

    def stop(self) -> Dict[str, Any]:
        sent = self.tx.finish()
        time.sleep(0.2)
        got = self.rx.finish()
        return {**sent, **got, "seconds": round(time.monotonic() - self.started, 2)}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.tx.kill()
        self.rx.kill()


# Receives one TCP connection to the end and prints its length and SHA-256.
SINK = r'''
import hashlib, json, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(1)
s.settimeout(float(sys.argv[2]))
print("ready", flush=True)
c, peer = s.accept()
c.settimeout(float(sys.argv[2]))
h, n = hashlib.sha256(), 0
while True:
    b = c.recv(1 << 16)
    if not b:
        break
    h.update(b)
    n += len(b)
print(json.dumps({"bytes": n, "sha256": h.hexdigest(), "peer": peer[0]}), flush=True)
'''

# Sends N pseudo-random bytes (seeded: the same on every path) and prints what it sent.
SOURCE = r'''
import hashlib, json, random, socket, sys, time
dst, port, n, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
data = random.Random(9).randbytes(n)
t0 = time.monotonic()
c = socket.create_connection((dst, port), timeout=timeout)
c.sendall(data)
c.shutdown(socket.SHUT_WR)
c.recv(1)
c.close()
print(json.dumps({"bytes": n, "sha256": hashlib.sha256(data).hexdigest(),
                  "seconds": round(time.monotonic() - t0, 3)}))
'''


def tcp_transfer(src_ns: str, dst_ns: str, dst_ip: str, port: int, nbytes: int,
                 timeout: float = 60) -> Dict[str, Any]:
    """A real TCP connection from one VM namespace to another carrying `nbytes`;
    {"sent": {bytes, sha256, seconds}, "received": {bytes, sha256}, "peer": the source
    address the receiver saw (a translated one through NAT)}."""
    with _Proc(_in_ns(dst_ns, SINK, port, timeout), "tcp sink") as sink:
        p = run(_script(SOURCE, dst_ip, port, nbytes, timeout), ns=src_ns, check=False,
                timeout=timeout + 10)
        if p.returncode != 0:
            raise AssertionError(f"tcp source failed: {p.stderr.strip()}")
        received = dict(sink.finish(timeout))
        peer = received.pop("peer")
        return {"sent": json.loads(p.stdout.strip().splitlines()[-1]), "received": received,
                "peer": peer}
