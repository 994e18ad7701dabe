"""The two-node overlay lab (netns_lab/labs/overlay.toml, built by netns_lab/nodes.py as
`xdpflow-lab up` builds it): two nodes joined by an underlay link, an agent on each (its
own socket, state and pins), VMs of two tenants with the same addresses on both nodes and
different VNIs. `compare` (the CLI's own function) runs the overlay scenarios on the
offloaded path and both kernel variants (a Linux vxlan device per tenant router): 0
mismatches. Beside it, what the comparison cannot see: the datapath's counters (encap,
decap, drops by reason), the MTU rule's event, both nodes' state after a VM moved, a 10 MB
TCP transfer on every path, rules at the destination node, trace through decap, and the
underlay neighbour followed."""
from __future__ import annotations

import os
import time
from types import SimpleNamespace

import pytest

from netns_lab import cli, compare, labfile, render, scenarios, topology
from netns_lab.lab import CREATED_NAMESPACES, CREATED_PINS
from netns_lab.netns import ip, run, unique
from netns_lab.nodes import Nodes, node_view
from netns_lab.scenarios import Move
from netns_lab.traffic import ping, tcp_transfer

pytestmark = pytest.mark.lab

OVERLAY_LAB = os.path.join(os.path.dirname(labfile.DEMO_LAB), "overlay.toml")


@pytest.fixture(scope="module")
def nodes():
    if os.geteuid() != 0:
        pytest.skip("the lab tier needs root")
    spec = labfile.load(OVERLAY_LAB, prefix=unique("xo", 8))
    CREATED_PINS.append(topology.pin_dir(spec.prefix))
    topo = Nodes(spec)
    try:
        topo.up()
        CREATED_NAMESPACES.extend(topology.namespaces_of(spec.prefix))
        yield topo
    finally:
        logs = {n: lab.log_text()[-3000:] for n, lab in topo.labs.items()}
        topo.close()
        for n, log in logs.items():
            print(f"----- agent log, node {n} -----\n{log}")
    assert not topology.namespaces_of(spec.prefix)


def on(nodes, path, name):
    """A VM of the lab on a path, as netns_lab.traffic takes it (its namespace)."""
    return SimpleNamespace(name=nodes.vm_ns(path, nodes.spec.vm(name)))


def counters(nodes, n):
    out = {}
    for r in nodes.labs[n].ok("stats")["counters"]:
        key = (r["port"], r["verdict"], r["reason"])
        out[key] = out.get(key, 0) + r["packets"]
    return out


UL = {"a": "ula", "b": "ulb"}


def overlay(nodes, n):
    """Node n's xdpflow_overlay_packets by direction (encap, decap), from its metrics."""
    from prometheus_client.parser import text_string_to_metric_families
    return {s.labels["direction"]: s.value
            for f in text_string_to_metric_families(nodes.labs[n].metrics())
            for s in f.samples if s.name == "xdpflow_overlay_packets_total"}


@pytest.fixture(scope="module")
def compared(nodes):
    """The overlay scenarios through `xdpflow-lab compare`'s function, on the lab that
    is up, with the datapath's counters and overlay metrics before and after."""
    before = {n: (counters(nodes, n), overlay(nodes, n)) for n in UL}
    chosen = scenarios.load(package=nodes.spec.scenarios)
    doc = cli.run_compare(nodes.spec, chosen, list(render.VARIANTS), say=print)
    after = {n: (counters(nodes, n), overlay(nodes, n)) for n in UL}
    print(compare.format_table(doc))
    return doc, before, after


def gained(compared, n, which):
    """What node n counted during the comparison: 0 counters, 1 overlay metrics."""
    _, before, after = compared
    return {k: v - before[n][which].get(k, 0) for k, v in after[n][which].items()}


def test_compare_on_the_overlay_scenarios_has_no_mismatch(compared):
    doc, _, _ = compared
    names = set(scenarios.names("overlay"))
    assert names >= {"cross_node", "isolation", "stateful", "underlay", "mtu", "move"}
    assert set(doc["variants"]) == {"iptables", "nftables"}
    for variant, v in doc["variants"].items():
        assert set(v["scenarios"]) == names
        assert v["total"]["mismatches"] == 0, (variant, [
            (n, m["index"], m["what"], m["why"]) for n, s in v["scenarios"].items()
            for m in s["mismatches"]])
        for name, s in v["scenarios"].items():
            assert s["sends"] >= 5, (variant, name)
            delivered = [r for r in s["per_send"] if r["offload_to"]]
            # Not a comparison of silences: a good part of every scenario's sends reach
            # a VM (isolation's and the underlay's are mostly refusals).
            assert len(delivered) * 3 >= s["sends"], (variant, name)
            # Only the MTU scenario has differences, and each says why.
            assert bool(s["expected"]) == (name == "mtu"), (variant, name)
    assert doc["total"]["mismatches"] == 0
    assert doc["monitor"]["events"] > 0 and not doc["monitor"]["error"]


def test_traffic_was_encapsulated_and_decapsulated_by_the_datapath(compared):
    """Cross-node sends left each node encapsulated and arrived decapsulated at the other
    (its overlay metrics; decapsulated packets are counted on the uplink port)."""
    for n in UL:
        ov = gained(compared, n, 1)
        assert ov["encap"] >= 20 and ov["decap"] >= 20, (n, ov)
        decap = sum(v for (port, verdict, _), v in gained(compared, n, 0).items()
                    if port == UL[n] and verdict == "redirect")
        assert decap >= 20, n


def test_unknown_vni_and_unknown_vtep_are_dropped_and_counted(compared):
    """The underlay scenario's forged frames: node b dropped them by reason (the
    comparison only sees that nobody got them)."""
    got = gained(compared, "b", 0)
    for reason, sent in (("vni_unknown", 2), ("vtep_unknown", 2)):
        assert got.get((UL["b"], "drop", reason), 0) == sent, (reason, got)


def test_too_big_for_the_uplink_goes_to_the_kernel_counted(compared):
    """The MTU scenario's differences: the datapath passed each too-big packet to the
    kernel with reason mtu_kernel (its monitor event and counter), the kernel path
    answered ICMP fragmentation needed (mtu 1450) with DF set and fragmented without."""
    from scapy.all import ICMP, IP, Ether
    doc = compared[0]
    for variant in render.VARIANTS:
        exp = doc["variants"][variant]["scenarios"]["mtu"]["expected"]
        assert [e["index"] for e in exp] == [1, 2, 3]
        for e in exp:
            assert e["offload"] == []
            assert [(ev["port"], ev["verdict"], ev["reason"]) for ev in e["offload_events"]] \
                == [("bvm3", "pass", "mtu_kernel")], e["offload_events"]
            got = [Ether(bytes.fromhex(f["bytes"])) for f in e["kernel"]]
            if e["index"] < 3:
                assert [f["vm"] for f in e["kernel"]] == ["blue3"]
                assert (got[0][ICMP].type, got[0][ICMP].code, got[0][ICMP].nexthopmtu) == \
                    (3, 4, 1450)
            else:
                assert sum(IP in g and g[IP].dst == "10.0.0.2" for g in got) == 2   # fragments
    assert gained(compared, "a", 0).get(("bvm3", "pass", "mtu_kernel"), 0) == 3


def test_a_moved_vm_is_reached_at_its_new_home(nodes):
    """Both nodes' state follows a move (a has the endpoint local on its port, b remote
    behind a's VTEP), and what blue4 receives from blue1 changes from routed twice
    (TTL 62) to routed once (63) on the offloaded path and the kernel path alike."""
    from scapy.all import IP, Ether
    spec = nodes.spec
    move = scenarios.load(["move"], package="overlay")[0]
    first = move.steps[:move.steps.index(Move("blue4", "a")) + 1]
    seen = {}
    try:
        for path in nodes.paths:
            nss = {vm.name: nodes.vm_ns(path, vm) for vm in spec.vms}
            sc = scenarios.Scenario("move", "", [s for s in first if not isinstance(s, Move)],
                                    steps=first + [move.sends[0]])
            res, _ = compare.run_path(spec, nss, [sc], senders=nodes.senders(path),
                                      change=lambda m, p=path: nodes.change(p, m))
            seen[path] = [[Ether(d)[IP].ttl for vm, d in r.outcome if vm == "blue4"]
                          for r in (res[0], res[-1])]
            if path == "offload":
                a = nodes.labs["a"].ok("endpoint", "list", "--tenant", "blue")
                b = nodes.labs["b"].ok("endpoint", "list", "--tenant", "blue")
                assert any(e["ip"] == "10.0.0.4" and e.get("port") == "bvm4" for e in a), a
                assert any(e["ip"] == "10.0.0.4" and e.get("vtep") == "192.0.2.1" for e in b), b
                assert "bvm4" in ip("-o", "link", "show", ns=nodes.node_ns(path, "a"))
    finally:
        for path in nodes.paths:
            nodes.change(path, Move("blue4", "b"))
    assert seen == {p: [[62], [63]] for p in nodes.paths}, seen
    # Back home: reached across the overlay again.
    assert ping(on(nodes, "offload", "blue1"), "10.0.0.4", count=2)


def test_a_10mb_tcp_transfer_across_the_overlay_on_every_path(nodes):
    spec = nodes.spec
    a, b = spec.vm("blue1"), spec.vm("blue2")
    assert a.node != b.node
    got = {}
    for path in nodes.paths:
        r = tcp_transfer(nodes.vm_ns(path, a), nodes.vm_ns(path, b), b.ip, 5001, 10_000_000)
        assert r["received"] == {k: r["sent"][k] for k in ("bytes", "sha256")}, (path, r)
        got[path] = (r["received"]["sha256"], r["sent"]["seconds"])
        print(f"10 MB TCP across the overlay, {path}: {r['sent']['seconds']} s")
    assert len({h for h, _ in got.values()}) == 1 and len(got) == 3, got


def test_rules_apply_at_the_destination_node(nodes):
    """Node b alone allows blue TCP to 5001 only from 10.0.0.1: the transfer from blue1
    passes, a ping that node a let out is dropped at node b (counted on its uplink)."""
    spec = nodes.spec
    st = spec.node_state("b")
    st["rules"] = [{"id": 1, "tenant": "blue", "priority": 10, "action": "allow",
                    "src": "10.0.0.1/32", "proto": "tcp", "dport": "5001"}] + \
        [r for r in st["rules"] if r["tenant"] == "red"]
    blue1 = on(nodes, "offload", "blue1")
    try:
        topology.apply_state(nodes.labs["b"], st, nodes.dir / "state-b-test.toml")
        before = counters(nodes, "b")
        r = tcp_transfer(blue1.name, on(nodes, "offload", "blue2").name, "10.0.0.2", 5001,
                         1_000_000)
        assert r["received"]["sha256"] == r["sent"]["sha256"]
        assert not ping(blue1, "10.0.0.2", count=1)
        key = (UL["b"], "drop", "default")
        assert counters(nodes, "b").get(key, 0) > before.get(key, 0)
    finally:
        topology.apply_state(nodes.labs["b"], spec.node_state("b"),
                             nodes.dir / "state-b.toml")
    assert ping(blue1, "10.0.0.2", count=1)


def test_trace_through_decap(nodes):
    """`trace --port UPLINK`: a VXLAN packet is followed through decap to the VM port,
    and the route named is the inner destination's."""
    from scapy.all import IP, UDP, Ether, raw
    from scapy.layers.vxlan import VXLAN
    spec = nodes.spec
    a, b = node_view(spec, "a"), node_view(spec, "b")
    blue1, blue2 = spec.vm("blue1"), spec.vm("blue2")
    frame = Ether(dst=b.mac, src=a.mac) / IP(src=a.ip, dst=b.ip) / \
        UDP(sport=50000, dport=4789) / VXLAN(vni=5010) / \
        Ether(src=blue1.mac, dst=b.router["blue"]) / \
        IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1000, dport=7000)
    lab = nodes.labs["b"]
    t = lab.ok("trace", "--port", UL["b"], "--hex", raw(frame).hex(), timeout=180)
    assert (t["verdict"], t["tenant"], t["decapsulated"], t["out_port"]) == \
        ("redirect", "blue", True, blue2.port), t
    assert t["route"] == f"endpoint 10.0.0.2 on port {blue2.port}"
    out = Ether(bytes.fromhex(t["packet_out"]))
    assert out.dst == blue2.mac and out[IP].ttl == 63 and UDP in out
    # From a VTEP of no blue endpoint: dropped before decap, nothing decapsulated.
    frame[IP].src = "192.0.2.99"
    t = lab.ok("trace", "--port", UL["b"], "--hex", raw(frame).hex())
    assert (t["verdict"], t["reason"], t["decapsulated"]) == ("drop", "vtep_unknown", False)


def test_the_underlay_neighbour_is_kept_current(nodes):
    """The agent follows the VTEP's underlay MAC through neighbour events: a changed entry
    changes the outer destination of the next encapsulated packet (the tenant's flows go
    stale with the endpoint entry, so no flow keeps the old MAC)."""
    from scapy.all import IP, UDP, Ether, raw
    from scapy.layers.vxlan import VXLAN
    spec = nodes.spec
    a, b = nodes.labs["a"], node_view(spec, "b")
    blue1 = spec.vm("blue1")
    node_a = nodes.node_ns("offload", "a")
    pkt = Ether(src=blue1.mac, dst=blue1.port_mac) / \
        IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1000, dport=7000)

    def outer_dst():
        # The first trace builds the trace program: seconds, more on a loaded machine.
        t = a.ok("trace", "--port", blue1.port, "--hex", raw(pkt).hex(), timeout=180)
        assert t["verdict"] == "redirect" and t["out_port"] == UL["a"], t
        out = Ether(bytes.fromhex(t["packet_out"]))
        assert VXLAN in out and out[IP].dst == b.ip
        return out.dst

    assert outer_dst() == b.mac
    ip("neigh", "replace", b.ip, "lladdr", "02:ee:00:00:00:99", "dev", UL["a"],
       "nud", "permanent", ns=node_a)
    try:
        deadline = time.monotonic() + 60   # a trace takes seconds on a loaded machine
        while outer_dst() != "02:ee:00:00:00:99" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert outer_dst() == "02:ee:00:00:00:99"
    finally:
        ip("neigh", "replace", b.ip, "lladdr", b.mac, "dev", UL["a"], "nud", "reachable",
           ns=node_a)
    deadline = time.monotonic() + 60   # a trace takes seconds on a loaded machine
    while outer_dst() != b.mac and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ping(on(nodes, "offload", "blue1"), "10.0.0.2", count=2)


def test_the_cli_builds_compares_and_removes_the_two_node_lab(tmp_path):
    """`xdpflow-lab compare --lab overlay.toml` on a lab it builds for the run (one
    scenario: the full run is above), then nothing of it is left."""
    import json
    import subprocess
    import sys
    if os.geteuid() != 0:
        pytest.skip("the lab tier needs root")
    prefix = unique("xp", 8)
    CREATED_PINS.append(topology.pin_dir(prefix))
    out = tmp_path / "c.json"
    lab_cli = os.path.join(os.path.dirname(sys.executable), "xdpflow-lab")
    try:
        p = subprocess.run([lab_cli, "compare", "--lab", OVERLAY_LAB, "--prefix", prefix,
                            "--scenario", "cross_node", "--json", str(out)],
                           capture_output=True, text=True, timeout=400)
    finally:
        run([lab_cli, "down", "--prefix", prefix], check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    doc = json.loads(out.read_text())
    assert doc["total"]["mismatches"] == 0 and doc["total"]["matches"] >= 30
    assert topology.namespaces_of(prefix) == []
    assert not os.path.exists(topology.pin_dir(prefix))
