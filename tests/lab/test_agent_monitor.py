"""`xdpflowctl monitor` against a real agent: a denied packet from a VM shows up with its
tenant, port, rule and reason within a second and an allowed one does not; a test-run
flood of a million denied packets gives events at the configured rate, counts the rest as
lost, and leaves the agent answering. Also `rule list --stats` and `top` on real counters.

Rules (blue, default drop):  1  prio 100  allow icmp 10.0.0.1 -> 10.0.0.2
                             4  prio 200  deny  tcp dport 5202
                             9  prio 50   allow udp dport 9999 (never matched)"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time

import pytest

from agent import bpfsys
from agent.netns import entered
from netns_lab.lab import CTL
from netns_lab.traffic import exchange, ping

pytestmark = pytest.mark.lab

RATE = 1000          # monitor.rate_limit, events a second per CPU (the default)


@pytest.fixture(scope="module")
def net(module_lab):
    lab = module_lab
    lab.two_tenants()
    for vm in lab.vms.values():
        # No IPv6 chatter (router solicitations, MLD: multicast drops) to race the
        # packets under test to a `--type drop --count 1` monitor.
        lab.vm_run(vm, ["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                        "net.ipv6.conf.default.disable_ipv6=1",
                        "net.ipv6.conf.eth0.disable_ipv6=1"], check=True)
    lab.write_config()
    with open(lab.config, "a") as f:
        f.write(f"\n[monitor]\nrate_limit = {RATE}\n")
    lab.start_agent()
    lab.ok("apply", "-", input=_state_toml(lab))
    return lab


def _state_toml(lab) -> str:
    from netns_lab.lab import toml_tables
    state = lab.base_state()
    state["rules"] = [
        {"id": 1, "tenant": "blue", "priority": 100, "src": "10.0.0.1/32",
         "dst": "10.0.0.2/32", "proto": "icmp", "action": "allow"},
        {"id": 4, "tenant": "blue", "priority": 200, "proto": "tcp", "dport": "5202",
         "action": "deny"},
        {"id": 9, "tenant": "blue", "priority": 50, "proto": "udp", "dport": "9999",
         "action": "allow"},
    ]
    return toml_tables("", state)


class Monitor:
    """`xdpflowctl --json monitor ...` as a process; ready once it is subscribed."""

    def __init__(self, lab, *args: str):
        self.p = subprocess.Popen([CTL, "--socket", lab.socket, "--json", "monitor", *args],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.p.stderr.readline()
        assert line.startswith("monitoring"), (line, self.p.stderr.read())

    def finish(self, timeout: float = 30):
        out, err = self.p.communicate(timeout=timeout)
        assert self.p.returncode == 0, err
        return [json.loads(x) for x in out.splitlines()], err

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(5)


def test_a_denied_packet_is_seen_within_a_second_and_an_allowed_one_is_not(net):
    vm1, vm2 = net.vm("blue", 1), net.vm("blue", 2)
    mon = Monitor(net, "--type", "drop", "--count", "1", "--duration", "30")
    try:
        assert ping(vm1, vm2.ip)                       # allowed by rule 1: no drop event
        sent = time.time()
        threading.Thread(target=exchange, args=(vm1, "tcp", vm2.ip, 5202, "x"),
                         kwargs={"timeout": 0.5}, daemon=True).start()      # rule 4
        line = mon.p.stdout.readline()
        shown = time.time()
        (ev,), err = [json.loads(line)], mon.finish()[1]
    finally:
        mon.kill()
    assert (ev["tenant"], ev["port"], ev["verdict"], ev["reason"], ev["rule"]) == \
        ("blue", vm1.port, "drop", "rule_deny", 4), ev
    assert (ev["proto"], ev["src"], ev["dst"], ev["dport"]) == ("tcp", vm1.ip, vm2.ip, 5202)
    # ev["time"] is when the datapath saw the packet (its clock): after our send, and on
    # the monitor's output within a second of it.
    assert sent - 0.05 <= ev["time"] <= shown, (sent, ev["time"], shown)
    assert shown - ev["time"] < 1.0, (ev["time"], shown)
    assert "1 event" in err


def _lost(lab, reason):
    m = re.search(r'^xdpflow_monitor_events_lost_total\{reason="%s"\} (\S+)$' % reason,
                  lab.metrics(), re.M)
    return float(m.group(1))


def test_a_million_denied_packets_give_events_at_the_cap_and_count_the_rest(net):
    vm1, vm2 = net.vm("blue", 1), net.vm("blue", 2)
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether
    pkt = bytes(Ether(src=vm1.mac, dst=vm1.port_mac) /
                IP(src=vm1.ip, dst=vm2.ip) / TCP(sport=41000, dport=5202, flags="S"))
    lost0 = _lost(net, "rate_cap") + _lost(net, "ring_full")
    mon = Monitor(net, "--type", "drop", "--reason", "rule_deny", "--duration", "10")
    try:
        flood = _flood(net, vm1, pkt, 1_000_000)
        # The agent answers while the flood runs.
        t0 = time.monotonic()
        status = net.ctl("status", timeout=10)
        answered = time.monotonic() - t0
        flood["thread"].join(60)
        assert not flood["thread"].is_alive()
        events, err = mon.finish()
    finally:
        mon.kill()
    assert status.code == 0 and answered < 5, (status, answered)
    assert flood["rc"] == 1                                       # XDP_DROP
    ours = [e for e in events if e.get("sport") == 41000]
    # A tenth of a second of burst, then RATE a second, on the one CPU the test run used.
    cap = RATE * (flood["seconds"] + 0.1) + RATE // 10 + 5
    assert RATE // 10 <= len(ours) <= cap, (len(ours), flood)
    assert all(e["rule"] == 4 and e["reason"] == "rule_deny" for e in ours)
    lost = _lost(net, "rate_cap") + _lost(net, "ring_full") - lost0
    assert lost >= 1_000_000 - cap, (lost, len(ours))
    # Every packet of the flood is accounted for: shown, or lost to the cap, the ring or
    # this monitor's own slowness (as its last line says).
    m = re.search(r"lost: (\d+) to the rate limit, (\d+) to a full ring, (\d+) not read",
                  err)
    assert m, err
    assert len(ours) + sum(int(x) for x in m.groups()) == 1_000_000, (len(ours), err)
    assert net.ctl("status", timeout=5).code == 0


def _flood(lab, vm, pkt: bytes, repeat: int) -> dict:
    """BPF_PROG_TEST_RUN of the agent's program, `repeat` times on one CPU, in a thread
    (so the caller can talk to the agent meanwhile); returns the thread and its result."""
    prog_id = lab.ok("status")["program_id"]
    out: dict = {}

    def run():
        fd = bpfsys.prog_fd_by_id(prog_id)
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
        try:
            with entered(lab.node):
                import socket
                t0 = time.monotonic()
                out["rc"], _, _ = bpfsys.test_run(fd, pkt, ifindex=socket.if_nametoindex(
                    vm.port), repeat=repeat)
                out["seconds"] = time.monotonic() - t0
        finally:
            os.close(fd)
    out["thread"] = threading.Thread(target=run)
    out["thread"].start()
    return out


def test_a_client_that_reads_nothing_loses_events_and_never_blocks_the_agent(net):
    from agent.api import ApiClient
    vm1, vm2 = net.vm("blue", 1), net.vm("blue", 2)
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether
    pkt = bytes(Ether(src=vm1.mac, dst=vm1.port_mac) /
                IP(src=vm1.ip, dst=vm2.ip) / TCP(sport=41001, dport=5202, flags="S"))
    client0 = _lost(net, "client")
    stuck = ApiClient(net.socket).stream("monitor", {"type": "drop"})   # never read
    try:
        flood = _flood(net, vm1, pkt, 3_000_000)
        slowest = 0.0
        while flood["thread"].is_alive():
            t0 = time.monotonic()
            assert net.ctl("status", timeout=10).code == 0
            slowest = max(slowest, time.monotonic() - t0)
        flood["thread"].join()
        assert slowest < 5, slowest
    finally:
        stuck.close()
    deadline = time.monotonic() + 10          # counted when the agent sees it leave
    while _lost(net, "client") == client0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _lost(net, "client") > client0
    assert net.ctl("status", timeout=5).code == 0


def test_rule_list_stats_shows_hits_and_rules_that_never_matched(net):
    vm1, vm2 = net.vm("blue", 1), net.vm("blue", 2)
    before = time.time()
    exchange(vm1, "tcp", vm2.ip, 5202, "x", timeout=0.3)
    rules = {r["id"]: r for r in net.ok("rule", "list", "--stats", "--tenant", "blue")}
    assert rules[4]["hits"] >= 1 and rules[4]["last_hit"] >= before - 1
    assert rules[9]["hits"] == 0 and rules[9]["last_hit"] is None
    text = net.ctl("rule", "list", "--stats", json=False).stdout
    assert re.search(r"never matched: (\d+, )*9$", text, re.M), text


def test_top_ranks_the_busy_flow_first(net):
    vm1, vm2 = net.vm("blue", 1), net.vm("blue", 2)
    assert ping(vm1, vm2.ip, count=1)                   # a quiet flow
    net.ok("top", "--once")                             # first sample
    p = subprocess.Popen(["nsenter", f"--net=/run/netns/{vm1.name}", "ping", "-n", "-q",
                          "-i", "0.01", "-c", "150", vm2.ip],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        top = net.ok("top", "--once", "--tenant", "blue")
    finally:
        p.wait(20)
    first = top["flows"][0]
    assert (first["proto"], first["src"], first["dst"]) in (
        ("icmp", vm1.ip, vm2.ip), ("icmp", vm2.ip, vm1.ip)), top
    assert first["pps"] > 20, first
    assert top["sampled"] >= 2


def test_the_lab_finds_the_events_of_one_packet_by_what_it_carries(net):
    """What the lab's compare calls for each mismatching send (netns_lab.events)."""
    from netns_lab.events import EventRecorder
    vm1, vm2 = net.vm("blue", 1), net.vm("blue", 2)
    with EventRecorder(net.socket) as rec:
        exchange(vm1, "udp", vm2.ip, 7777, "nonce-denied-7777", timeout=0.3)   # no rule
        assert ping(vm1, vm2.ip)                                                # rule 1
        rec.stop()
    evs = rec.events_for(b"nonce-denied-7777")     # the UDP client sends it again unanswered
    assert evs, rec.events
    for ev in evs:
        assert (ev["verdict"], ev["reason"], ev["rule"], ev["port"]) == \
            ("drop", "default", None, vm1.port)
        assert (ev["proto"], ev["src"], ev["dst"], ev["dport"]) == \
            ("udp", vm1.ip, vm2.ip, 7777)
    # The allowed ping: redirected both ways (the request by rule 1 or its flow).
    pings = [e for e in rec.events if describe(e).get("proto") == "icmp"]
    assert {e["verdict"] for e in pings} == {"redirect"}, pings
    assert rec.events_for(b"no such bytes") == []
    assert not rec.error


def describe(ev):
    from agent.monitor import describe_packet
    return describe_packet(ev["packet"])


def test_a_monitor_keeps_streaming_across_a_datapath_rebuild(net):
    """Last in the module: SIGHUP with a new flow-table size replaces the program (and its
    ring); a monitor already listening gets the new program's events."""
    vm1, vm2 = net.vm("blue", 1), net.vm("blue", 2)
    before = net.ok("status")["program_id"]
    mon = Monitor(net, "--type", "drop", "--reason", "rule_deny", "--count", "1",
                  "--duration", "60")
    try:
        text = net.config.read_text()
        assert "flow_table_size = 65536" in text
        net.config.write_text(text.replace("flow_table_size = 65536",
                                           "flow_table_size = 131072"))
        net.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        # `status` waits while the reload compiles (9 s quiet, over 30 s on a busy
        # machine): the deadline bounds the wait, not one call's timeout.
        while net.ok("status", timeout=120)["program_id"] == before:
            assert time.monotonic() < deadline, "the program was not replaced"
            time.sleep(0.2)
        exchange(vm1, "tcp", vm2.ip, 5202, "x", timeout=0.5)
        (ev,), err = mon.finish(timeout=60)
    finally:
        mon.kill()
    assert (ev["reason"], ev["rule"], ev["dport"]) == ("rule_deny", 4, 5202)
