"""The agent driven only through xdpflowctl, with real ICMP, TCP and UDP between VMs of two
tenants that use the same addresses and MACs.

Rules (default verdict: drop):
  blue  1  prio 100  allow icmp       10.0.0.1 -> 10.0.0.2
  blue  2  prio 100  allow tcp 5200-5209  10.0.0.1 -> 10.0.0.2
  blue  3  prio 100  allow udp 5300   10.0.0.1 -> 10.0.0.2
  blue  4  prio 200  deny  tcp 5202   (beats rule 2)
  red  10  prio 100  allow udp 5300   (any to any)
Replies come back through the stateful flows, with no rule for them."""
from __future__ import annotations

import pytest

from netns_lab.lab import TENANTS
from netns_lab.traffic import Server, exchange, ping

pytestmark = pytest.mark.lab

RULES = [
    ("blue", ["--id", "1", "--priority", "100", "--src", "10.0.0.1/32", "--dst", "10.0.0.2/32",
              "--proto", "icmp", "--action", "allow", "--comment", "ping vm1->vm2"]),
    ("blue", ["--id", "2", "--priority", "100", "--src", "10.0.0.1/32", "--dst", "10.0.0.2/32",
              "--proto", "tcp", "--dport", "5200-5209", "--action", "allow"]),
    ("blue", ["--id", "3", "--priority", "100", "--src", "10.0.0.1/32", "--dst", "10.0.0.2/32",
              "--proto", "udp", "--dport", "5300", "--action", "allow"]),
    ("blue", ["--id", "4", "--priority", "200", "--proto", "tcp", "--dport", "5202",
              "--action", "deny"]),
    ("red", ["--id", "10", "--priority", "100", "--proto", "udp", "--dport", "5300",
             "--action", "allow"]),
]


@pytest.fixture(scope="module")
def net(module_lab):
    lab = module_lab
    lab.two_tenants()
    lab.write_config()                       # no [state]: everything below comes from ctl
    lab.start_agent()
    for name, tid in TENANTS.items():
        lab.ok("tenant", "add", name, "--id", str(tid))
    for vm in lab.vms.values():
        lab.ok("port", "add", vm.port, "--tenant", vm.tenant)
    for vm in lab.vms.values():
        lab.ok("endpoint", "add", "--tenant", vm.tenant, vm.ip, "--port", vm.port,
               "--mac", vm.mac)
    for tenant, args in RULES:
        lab.ok("rule", "add", "--tenant", tenant, *args)
    return lab


def vms(lab):
    return (lab.vm("blue", 1), lab.vm("blue", 2), lab.vm("red", 1), lab.vm("red", 2))


def flows(lab, *args):
    return lab.ok("flow", "dump", *args)


def find_flow(rows, **match):
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


# ---------------------------------------------------------------------------------------

def test_state_made_with_ctl_is_listed_and_attached(net):
    tenants = {t["name"]: t["id"] for t in net.ok("tenant", "list")}
    assert tenants == TENANTS
    ports = {p["name"]: p["tenant"] for p in net.ok("port", "list")}
    assert ports == {"bvm1": "blue", "bvm2": "blue", "rvm1": "red", "rvm2": "red"}
    eps = {(e["tenant"], e["ip"], e["port"], e["mac"]) for e in net.ok("endpoint", "list")}
    assert len(eps) == 4 and ("red", "10.0.0.2", "rvm2", "02:00:00:00:00:02") in eps
    assert sorted(r["id"] for r in net.ok("rule", "list")) == [1, 2, 3, 4, 10]
    assert [r["id"] for r in net.ok("rule", "list", "--tenant", "red")] == [10]
    status = net.ok("status")
    assert status["program_id"] > 0
    assert all(p["attached"] for p in status["ports"]), status["ports"]
    for vm in net.vms.values():
        prog = net.xdp_prog(vm.port)
        assert prog.get("id") == status["program_id"], (vm.port, prog)


def test_icmp_follows_the_rules(net):
    bvm1, bvm2, rvm1, rvm2 = vms(net)
    assert ping(bvm1, "10.0.0.2", count=2), "blue vm1 -> vm2 ping is allowed (rule 1)"
    assert not ping(bvm2, "10.0.0.1"), "blue vm2 -> vm1 ping: no rule allows it"
    assert not ping(rvm1, "10.0.0.2"), "red allows no ICMP"


def test_tcp_allowed_denied_and_kept_apart(net):
    bvm1, bvm2, rvm1, rvm2 = vms(net)
    with Server(bvm2, "tcp", 5201) as blue_srv, Server(rvm2, "tcp", 5201) as red_srv, \
            Server(bvm2, "tcp", 5202) as blue_denied, Server(bvm1, "tcp", 5201) as blue_vm1:
        ok = exchange(bvm1, "tcp", "10.0.0.2", 5201, "hello-blue", sport=41001)
        red = exchange(rvm1, "tcp", "10.0.0.2", 5201, "hello-red", sport=41002)
        denied = exchange(bvm1, "tcp", "10.0.0.2", 5202, "denied", sport=41003)
        back = exchange(bvm2, "tcp", "10.0.0.1", 5201, "backwards", sport=41004)
        got_blue, got_red = blue_srv.received(), red_srv.received()
        got_denied, got_vm1 = blue_denied.received(), blue_vm1.received()
    rows = flows(net, "--tenant", "blue")
    # Allowed, and the answer (no rule for it) came back through the reverse flow.
    assert ok == {"ok": True, "reply": "blue-vm2:hello-blue"}, ok
    assert [(g["src"], g["data"]) for g in got_blue] == [("10.0.0.1", "hello-blue")]
    # Red allows no TCP: the SYN is dropped, nothing arrives anywhere.
    assert not red["ok"], red
    # Same addresses, other tenant: red's VM never saw blue's connection, nor red's own.
    assert got_red == []
    # Rule 4 (deny, priority 200) beats rule 2 (allow 5200-5209, priority 100).
    assert not denied["ok"], denied
    assert got_denied == []
    # vm2 -> vm1: no rule allows it.
    assert not back["ok"], back
    assert got_vm1 == []
    # The allowed connection is a flow of blue's, redirected by rule 2; the others are not
    # (a denied packet may be cached too, but only with its drop verdict).
    fwd = find_flow(rows, proto="tcp", src="10.0.0.1", sport=41001, dport=5201)
    assert [(r["tenant"], r["verdict"], r["rule"], r["out_port"]) for r in fwd] == \
        [("blue", "redirect", 2, "bvm2")], rows
    for sport in (41003, 41004):
        assert all(r["verdict"] == "drop" for r in find_flow(rows, proto="tcp", sport=sport))
    assert all(r["tenant"] == "blue" for r in rows)
    red_rows = flows(net, "--tenant", "red")
    assert all(r["verdict"] == "drop" for r in find_flow(red_rows, proto="tcp")), red_rows


def test_udp_in_both_tenants_kept_apart(net):
    bvm1, bvm2, rvm1, rvm2 = vms(net)
    with Server(bvm2, "udp", 5300) as blue_srv, Server(rvm2, "udp", 5300) as red_srv, \
            Server(bvm2, "udp", 5301) as blue_other, Server(bvm1, "udp", 5300) as blue_vm1:
        b = exchange(bvm1, "udp", "10.0.0.2", 5300, "u-blue", sport=42001)
        r = exchange(rvm1, "udp", "10.0.0.2", 5300, "u-red", sport=42002)
        other = exchange(bvm1, "udp", "10.0.0.2", 5301, "u-other", sport=42003)
        back = exchange(bvm2, "udp", "10.0.0.1", 5300, "u-back", sport=42004)
        got_blue, got_red = blue_srv.received(), red_srv.received()
        got_other, got_vm1 = blue_other.received(), blue_vm1.received()
    assert b == {"ok": True, "reply": "blue-vm2:u-blue"}, b
    assert r == {"ok": True, "reply": "red-vm2:u-red"}, r
    # Each VM 10.0.0.2 got its own tenant's datagram (the client may retry: same text).
    assert {(g["src"], g["sport"], g["data"]) for g in got_blue} == {("10.0.0.1", 42001, "u-blue")}
    assert {(g["src"], g["sport"], g["data"]) for g in got_red} == {("10.0.0.1", 42002, "u-red")}
    assert not other["ok"] and got_other == [], (other, got_other)
    assert not back["ok"] and got_vm1 == [], (back, got_vm1)


def trace(lab, port, expr):
    return lab.ok("trace", "--port", port, "--scapy", expr)


def tcp_syn(src_mac, dst_mac, dport, sport):
    return (f"Ether(src='{src_mac}', dst='{dst_mac}')/IP(src='10.0.0.1', dst='10.0.0.2')/"
            f"TCP(sport={sport}, dport={dport}, flags='S')")


def test_trace_agrees_with_the_traffic(net):
    bvm1, bvm2, rvm1, rvm2 = vms(net)
    # Allowed: blue tcp/5201 (what test_tcp_... saw pass) -> rule 2, out of bvm2, with the
    # destination VM's MAC written in.
    t = trace(net, "bvm1", tcp_syn(bvm1.mac, bvm1.port_mac, 5201, 43001))
    assert (t["verdict"], t["tenant"], t["rule"], t["out_port"]) == \
        ("redirect", "blue", 2, "bvm2"), t
    out = bytes.fromhex(t["packet_out"])
    assert out[0:6] == bytes.fromhex(bvm2.mac.replace(":", "")), t["packet_out"]
    assert out[6:12] == bytes.fromhex(bvm2.port_mac.replace(":", "")), t["packet_out"]
    # Denied: blue tcp/5202 -> rule 4.
    t = trace(net, "bvm1", tcp_syn(bvm1.mac, bvm1.port_mac, 5202, 43002))
    assert (t["verdict"], t["tenant"], t["rule"], t["out_port"], t["reason"]) == \
        ("drop", "blue", 4, "", "rule_deny"), t
    # The same packet in red: no rule, the tenant's default (drop).
    t = trace(net, "rvm1", tcp_syn(rvm1.mac, rvm1.port_mac, 5201, 43003))
    assert (t["verdict"], t["tenant"], t["rule"], t["out_port"], t["reason"]) == \
        ("drop", "red", None, "", "default"), t
    # Red's udp/5300 -> rule 10, out of red's vm2 port, never blue's.
    t = trace(net, "rvm1", f"Ether(src='{rvm1.mac}', dst='{rvm1.port_mac}')/"
                           "IP(src='10.0.0.1', dst='10.0.0.2')/UDP(sport=43004, dport=5300)")
    assert (t["verdict"], t["tenant"], t["rule"], t["out_port"]) == \
        ("redirect", "red", 10, "rvm2"), t
    # vm2 -> vm1 tcp in blue: no rule.
    t = trace(net, "bvm2", f"Ether(src='{bvm2.mac}', dst='{bvm2.port_mac}')/"
                           "IP(src='10.0.0.2', dst='10.0.0.1')/TCP(sport=43005, dport=5201)")
    assert (t["verdict"], t["rule"], t["reason"]) == ("drop", None, "default"), t


def test_flow_dump_shows_each_tenants_flows(net):
    bvm1, bvm2, rvm1, rvm2 = vms(net)
    with Server(bvm2, "udp", 5300), Server(rvm2, "udp", 5300):
        assert exchange(bvm1, "udp", "10.0.0.2", 5300, "f-blue", sport=44001)["ok"]
        assert exchange(rvm1, "udp", "10.0.0.2", 5300, "f-red", sport=44002)["ok"]
    rows = flows(net)
    fwd = dict(proto="udp", src="10.0.0.1", dst="10.0.0.2", dport=5300)
    blue = find_flow(rows, tenant="blue", sport=44001, **fwd)
    red = find_flow(rows, tenant="red", sport=44002, **fwd)
    assert len(blue) == 1 and len(red) == 1, rows
    assert (blue[0]["verdict"], blue[0]["rule"], blue[0]["in_port"], blue[0]["out_port"]) == \
        ("redirect", 3, "bvm1", "bvm2"), blue
    assert (red[0]["verdict"], red[0]["rule"], red[0]["in_port"], red[0]["out_port"]) == \
        ("redirect", 10, "rvm1", "rvm2"), red
    assert blue[0]["packets"] >= 1 and red[0]["packets"] >= 1
    # The replies' entries, made by the allowed forward flows.
    rev = dict(proto="udp", src="10.0.0.2", dst="10.0.0.1", sport=5300)
    blue_r = find_flow(rows, tenant="blue", dport=44001, **rev)
    red_r = find_flow(rows, tenant="red", dport=44002, **rev)
    assert len(blue_r) == 1 and "reply" in blue_r[0]["flags"] and \
        blue_r[0]["out_port"] == "bvm1" and blue_r[0]["packets"] >= 1, blue_r
    assert len(red_r) == 1 and "reply" in red_r[0]["flags"] and \
        red_r[0]["out_port"] == "rvm1" and red_r[0]["packets"] >= 1, red_r
    # --tenant filters.
    only_red = flows(net, "--tenant", "red")
    assert only_red and {r["tenant"] for r in only_red} == {"red"}
    assert find_flow(only_red, sport=44002, **fwd)


def counter(stats, **match):
    return sum(r["packets"] for r in stats["counters"]
               if all(r.get(k) == v for k, v in match.items()))


def test_stats_and_metrics_grow(net):
    bvm1, bvm2, rvm1, rvm2 = vms(net)
    before = net.ok("stats")
    with Server(bvm2, "udp", 5300):
        for i in range(3):
            assert exchange(bvm1, "udp", "10.0.0.2", 5300, f"s{i}", sport=45001 + i)["ok"]
    assert not exchange(rvm1, "tcp", "10.0.0.2", 5201, "x", sport=45010, timeout=0.5)["ok"]
    after = net.ok("stats")
    assert counter(after, port="bvm1", verdict="redirect") >= \
        counter(before, port="bvm1", verdict="redirect") + 3
    assert counter(after, port="bvm2", verdict="redirect") >= \
        counter(before, port="bvm2", verdict="redirect") + 3      # the answers
    assert counter(after, port="rvm1", verdict="drop", reason="default") > \
        counter(before, port="rvm1", verdict="drop", reason="default")
    assert counter(after, tenant="red", port="rvm1") > 0
    assert int(after["rule_hits"].get("3", 0)) >= int(before["rule_hits"].get("3", 0)) + 3
    assert after["flows"]["by_tenant"].get("blue", 0) >= 0
    # The Prometheus endpoint (inside the node namespace) shows the same counters.
    text = net.metrics()
    samples = [ln for ln in text.splitlines() if ln.startswith("xdpflow_packets")]
    assert any('port="bvm1"' in ln and 'verdict="redirect"' in ln for ln in samples), \
        text[:2000]
