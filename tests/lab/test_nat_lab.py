"""Floating IPs and SNAT in the lab (issue 11): the demo lab's external network (host
`inet` behind the uplink), tenants green and gold with the same addresses, each with a
floating IP for vm1 and SNAT to one shared node address.

Every path does what the scenarios say (asserted send by send: the kernel variants, and
the offloaded path unless the scenarios wait on its datapath; the variants alike byte for
byte); `xdpflow-lab compare` on the fip and snat scenarios finds 0 mismatches; a 10 MB
TCP transfer goes through SNAT and through a floating IP on every path."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from netns_lab import compare, render, scenarios
from netns_lab.traffic import tcp_transfer

pytestmark = pytest.mark.lab

LAB_CLI = str(Path(sys.executable).parent / "xdpflow-lab")
NAT_SCENARIOS = ["fip", "snat"]
GREEN_FIP, GOLD_FIP, NODE, SERVER = "203.0.113.10", "203.0.113.20", "198.51.100.1", "192.0.2.80"
TEN_MB = 10 * 1000 * 1000


@pytest.fixture(scope="module")
def up_lab(demo_lab):
    return demo_lab


def _run(topo, path):
    spec = topo.spec
    nss = {h.name: topo.vm_ns(path, h) for h in spec.vms + spec.external}
    results, _ = compare.run_path(spec, nss, scenarios.load(NAT_SCENARIOS))
    return results


def _parsed(results):
    """{(scenario, index): [(receiver, scapy packet, label or None)]}"""
    from scapy.layers.l2 import Ether
    out = {}
    for r in results:
        got = []
        for vm, data in r.outcome:
            raw, _, tail = data.partition(b"|snat port ")
            got.append((vm, Ether(raw), tail.decode() or None))
        out[(r.scenario, r.index)] = got
    return out


def _expectations(got, uplink_mac):
    """What the scenarios say, checked on one path's (normalised) outcome."""
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.l2 import ARP

    def rx(sc, i):
        """receiver -> (packet, SNAT label): one frame each in these scenarios."""
        frames = got[(sc, i)]
        assert len({v for v, _, _ in frames}) == len(frames), frames
        return {v: (p, label) for v, p, label in frames}

    # Inbound to a floating IP reaches the right VM of two with the same address, and
    # its answer leaves with the floating IP.
    for i, vm, fip in ((0, "green1", GREEN_FIP), (1, "gold1", GOLD_FIP)):
        r = rx("fip", i)
        assert set(r) == {"inet", vm}, r
        assert r[vm][0][IP].dst == "10.0.0.1" and r[vm][0][TCP].flags == "S"
        assert r["inet"][0][IP].src == fip and r["inet"][0][TCP].flags == "RA"
    # The VM's port unreachable: outer and inner header both with the floating IP.
    r = rx("fip", 2)
    assert set(r) == {"inet", "green1"}
    assert r["inet"][0][IP].src == GREEN_FIP and r["inet"][0][ICMP].type == 3
    assert r["inet"][0][ICMP].payload.dst == GREEN_FIP
    for i, vm, fip in ((3, "green1", GREEN_FIP), (4, "gold1", GOLD_FIP)):
        r = rx("fip", i)
        assert set(r) == {"inet", vm}
        assert (r["inet"][0][IP].src, r["inet"][0][ICMP].type) == (fip, 0)
    # Rules judge the translated packet: tcp/22 no, tcp/8080 to green1's own address yes,
    # gold's deny on the untranslated peer; no floating IP, no delivery.
    assert got[("fip", 5)] == [] and got[("fip", 7)] == [] and got[("fip", 8)] == []
    assert set(rx("fip", 6)) == {"green1", "inet"}
    # The VM's own traffic leaves with its floating IP, the ICMP error comes back inside.
    for i, vm, fip in ((9, "green1", GREEN_FIP), (11, "gold1", GOLD_FIP)):
        r = rx("fip", i)
        assert set(r) == {"inet", vm}
        assert (r["inet"][0][IP].src, r["inet"][0][UDP].sport) == (fip, 41010)
        err = r[vm][0][ICMP]
        assert err.type == 3 and err.payload.src == "10.0.0.1"
        assert err.payload.payload.sport == 41010
    assert got[("fip", 12)] == []
    # ARP for a floating IP on the uplink: answered with the uplink's MAC.
    arp = rx("fip", 13)["inet"][0][ARP]
    assert (arp.op, arp.psrc, arp.hwsrc) == (2, GREEN_FIP, uplink_mac), arp
    # SNAT: both tenants' 10.0.0.2:40000 -> server:7000 leave as the node with different
    # ports (labels; in the range, checksums right), the errors back to the right VM.
    labels = {}
    for i, vm in ((0, "green2"), (1, "gold2"), (6, "green2")):
        r = rx("snat", i)
        assert set(r) == {"inet", vm}, r
        out, label = r["inet"]
        assert out[IP].src == NODE and label.endswith("checksum ok"), (out, label)
        err = r[vm][0][ICMP]
        assert err.payload.src == "10.0.0.2" and err.payload.payload.sport == 40000
        labels[i] = label
    assert labels[0] != labels[1] and labels[0] == labels[6], labels
    for i, vm in ((2, "green2"), (3, "gold2")):
        r = rx("snat", i)
        assert set(r) == {"inet", vm} and r["inet"][1]
        back = r[vm][0]
        assert back[IP].dst == "10.0.0.2" and (back[TCP].dport, back[TCP].flags) == (40001, "RA")
    for i, vm in ((4, "green2"), (5, "gold2")):       # ping, the same echo id
        r = rx("snat", i)
        assert (r["inet"][0][ICMP].type, r[vm][0][ICMP].type, r[vm][0][ICMP].id) == (8, 0, 0x4000)
    # To the node's address at a port no flow holds: no VM, only the node's own answer.
    for i in (8, 9):
        r = rx("snat", i)
        assert set(r) == {"inet"} and r["inet"][0][IP].src == NODE, r
    assert got[("snat", 10)] == []


def test_every_path_does_what_the_nat_scenarios_say(up_lab):
    spec = up_lab.spec
    results = {p: _run(up_lab, p) for p in _paths_with_nat(up_lab)}
    compare.normalise_snat(spec, results)
    for p in results:
        _expectations(_parsed(results[p]), spec.vm("inet").port_mac)
    # And the two variants alike, byte for byte (labels for the allocated ports).
    same = compare.compare_results(results["iptables"], results["nftables"])
    assert compare.totals(same)["mismatches"] == 0, [
        m for s in same.values() for m in s["mismatches"]]


def test_compare_on_the_nat_scenarios(up_lab, tmp_path):
    out = tmp_path / "compare.json"
    p = subprocess.run([LAB_CLI, "compare", "--prefix", up_lab.prefix, "--json", str(out),
                        *[a for s in NAT_SCENARIOS for a in ("--scenario", s)]],
                       capture_output=True, text=True, timeout=300)
    doc = json.loads(out.read_text())
    waiting = {s.name for s in scenarios.load(NAT_SCENARIOS) if s.waiting_on}
    for variant in render.VARIANTS:
        per = doc["variants"][variant]["scenarios"]
        assert set(per) == set(NAT_SCENARIOS)
        for name, s in per.items():
            assert s["sends"] == len(s["per_send"]) > 10
            if name not in waiting:
                assert s["mismatches"] == [], (variant, name, s["mismatches"])
    assert p.returncode == (1 if doc["total"]["mismatches"] else 0), p.stdout + p.stderr
    if not waiting:
        assert doc["total"]["mismatches"] == 0, p.stdout


def _paths_with_nat(topo):
    """The kernel variants always; the offloaded path once its datapath translates (its
    scenarios no longer wait on it)."""
    waiting = any(s.waiting_on for s in scenarios.load(NAT_SCENARIOS))
    return [p for p in topo.paths if p != "offload" or not waiting]


def test_10mb_tcp_through_snat_on_every_path(up_lab):
    spec = up_lab.spec
    green2, inet = spec.vm("green2"), spec.vm("inet")
    for path in _paths_with_nat(up_lab):
        r = tcp_transfer(up_lab.vm_ns(path, green2), up_lab.vm_ns(path, inet), SERVER, 5001,
                         TEN_MB)
        assert r["received"]["bytes"] == TEN_MB, (path, r)
        assert r["received"]["sha256"] == r["sent"]["sha256"], (path, r)
        # The server saw the node's address, not the tenant's.
        assert r["peer"] == NODE, (path, r)


def test_10mb_tcp_through_a_floating_ip_inbound_on_every_path(up_lab):
    spec = up_lab.spec
    green1, inet = spec.vm("green1"), spec.vm("inet")
    for path in _paths_with_nat(up_lab):
        r = tcp_transfer(up_lab.vm_ns(path, inet), up_lab.vm_ns(path, green1), GREEN_FIP,
                         5002, TEN_MB)
        assert r["received"]["bytes"] == TEN_MB, (path, r)
        assert r["received"]["sha256"] == r["sent"]["sha256"], (path, r)
        # The VM saw the external host's own address (DNAT only).
        assert r["peer"] == inet.ip, (path, r)
