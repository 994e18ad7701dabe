"""Tenant isolation under every change (issue 14 item 2): three tenants whose VMs have the
same addresses, ports and MACs, each VM 1 streaming UDP to its VM 2 (and back) with a
per-tenant nonce in every payload, while the node goes through: flow misses (a new
source port per packet), flow hits, rule changes of every tenant (during and after),
flow flushes, and an agent killed with SIGKILL and started again. Delivery is judged by
the nonces each VM received, not by reachability: every payload a VM got carries its
own tenant's nonce, and in every phase each tenant's traffic arrived.

XDPFLOW_LONG=1 holds each phase ten times as long and changes rules ten times as often."""
from __future__ import annotations

import collections
import json
import os
import secrets
import signal
import time

import pytest

from netns_lab.lab import VM_IP
from netns_lab.traffic import RECEIVER, _in_ns, _Proc

pytestmark = pytest.mark.lab

LONG = os.environ.get("XDPFLOW_LONG") == "1"
PHASE_SECONDS = 10.0 if LONG else 1.0
TENANTS = {"blue": 10, "red": 20, "green": 30}
FWD, BACK = 7000, 7001

# Sends "TENANT:NONCE:PHASE:N" to DST:PORT at RATE a second; each stdin line names the
# next phase; in phase "miss" every packet leaves from a new socket (a new source port:
# a new flow, a miss). At EOF prints how many it sent per phase.
SENDER = r'''
import json, select, socket, sys, time
dst, port, rate, tenant, nonce = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5]
fixed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
phase, sent, n, t0 = "start", {}, 0, time.monotonic()
print("ready", flush=True)
while True:
    wait = max(0.0, t0 + n / rate - time.monotonic())
    if select.select([sys.stdin], [], [], wait)[0]:
        line = sys.stdin.readline()
        if not line:
            break
        phase = line.strip()
        continue
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM) if phase == "miss" else fixed
    try:
        s.sendto(f"{tenant}:{nonce}:{phase}:{n}".encode(), (dst, port))
        sent[phase] = sent.get(phase, 0) + 1
    except OSError:
        pass
    if s is not fixed:
        s.close()
    n += 1
print(json.dumps(sent), flush=True)
'''

def state():
    tenants = [{"name": t, "id": tid} for t, tid in TENANTS.items()]
    ports, eps, rules = [], [], []
    for t in TENANTS:
        for i in (1, 2):
            ports.append({"name": f"{t[0]}vm{i}", "tenant": t})
            eps.append({"tenant": t, "ip": VM_IP[i], "port": f"{t[0]}vm{i}",
                        "mac": f"02:00:00:00:00:0{i}"})
        base = TENANTS[t] * 10
        rules += [{"id": base + 1, "tenant": t, "priority": 100, "action": "allow",
                   "src": "10.0.0.1/32", "dst": "10.0.0.2/32", "proto": "udp", "dport": FWD},
                  {"id": base + 2, "tenant": t, "priority": 100, "action": "allow",
                   "src": "10.0.0.2/32", "dst": "10.0.0.1/32", "proto": "udp", "dport": BACK}]
    return {"tenants": tenants, "ports": ports, "endpoints": eps, "rules": rules}


@pytest.fixture(scope="module")
def node(module_lab):
    lab = module_lab
    for t in TENANTS:
        for i in (1, 2):
            # The same address and MAC in every tenant (VM_IP / VM_MAC by index).
            lab.add_vm(t, i, port=f"{t[0]}vm{i}")
    lab.write_config()
    lab.start_agent()
    path = lab.dir / "isolation.toml"
    from netns_lab.lab import toml_tables
    path.write_text(toml_tables("", state()))
    lab.ok("apply", str(path))
    return lab


def change_rules(lab, rounds: int):
    """Every tenant's rules changed in turn: a wider rule added above, then removed (each
    change is a new generation of that tenant's classifier)."""
    for k in range(rounds):
        for t, tid in TENANTS.items():
            rid = str(tid * 10 + 5)
            lab.ok("rule", "add", "--tenant", t, "--id", rid, "--priority", str(200 + k),
                   "--src", "10.0.0.0/24", "--proto", "udp", "--action", "allow")
            lab.ok("rule", "del", rid)


def test_no_tenant_ever_receives_anothers_traffic(node):
    lab = node
    nonce = {t: secrets.token_hex(8) for t in TENANTS}
    procs, senders = [], []
    try:
        for t in TENANTS:
            vm1, vm2 = lab.vm(t, 1), lab.vm(t, 2)
            for src, dst, port in ((vm1, vm2, FWD), (vm2, vm1, BACK)):
                procs.append((t, dst, port, _Proc(_in_ns(dst.name, RECEIVER, port),
                                                  f"receiver {t}/{dst.port}")))
                s = _Proc(_in_ns(src.name, SENDER, dst.ip, port, 150, t, nonce[t]),
                          f"sender {t}/{src.port}")
                senders.append(s)

        def phase(name, action=None):
            for s in senders:
                s.p.stdin.write(name + "\n")
                s.p.stdin.flush()
            if action is not None:
                action()
            time.sleep(PHASE_SECONDS)

        phase("miss")
        phase("hit")
        phase("change", lambda: change_rules(lab, 10 if LONG else 2))
        phase("after-change")
        phase("flush", lambda: [lab.ok("flow", "flush", *args)
                                for args in ([], ["--tenant", "red"], [])])
        phase("after-flush")

        def restart():
            lab.proc.send_signal(signal.SIGKILL)
            lab.proc.wait(10)
            lab.start_agent()
        phase("restart", restart)
        phase("after-restart")
        sent = [s.finish() for s in senders]
        received = [(t, dst, port, p.finish()["tagged"]) for t, dst, port, p in procs]
    finally:
        for s in senders:
            s.kill()
        for *_, p in procs:
            p.kill()

    phases = ("miss", "hit", "change", "after-change", "flush", "after-flush", "restart",
              "after-restart")
    assert all(s.get(ph) for s in sent for ph in phases), sent
    for t, dst, port, got in received:
        strangers = {k: n for k, n in got.items() if not k.startswith(f"{t}:{nonce[t]}:")}
        assert not strangers, f"{t}/{dst.port}:{port} received other tenants' payloads: " \
                              f"{strangers}"
        by_phase = collections.Counter({k.split(":")[2]: n for k, n in got.items()})
        missing = [ph for ph in phases if not by_phase[ph]]
        assert not missing, f"{t}/{dst.port}:{port}: nothing arrived in {missing}: {got}"
    log = lab.log_text()
    assert "Traceback" not in log, log[-3000:]
