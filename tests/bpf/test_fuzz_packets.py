"""Packet fuzzing (issue 14 item 1): Hypothesis-drawn rule sets and packets through the real
program with BPF_PROG_TEST_RUN, judged by an independent oracle (tests/bpf/oracle.py).

Properties, for every packet: never XDP_ABORTED; the action is one the tenant's policy
allows for that input (the oracle); a dropped or passed packet leaves byte for byte
unchanged, a redirected one changed only as a redirect changes it (MACs, TTL, checksum);
and per example the per-(port, verdict, reason) counters add up to the packets sent and
their bytes, verdict by verdict.

Each Hypothesis example is one rule set and a batch of packets (Python per example, not
per packet, is the cost); packets are valid ones from Scapy layers, then mutated byte by
byte in their headers, truncated, given random bytes behind valid headers, stacked VLAN
tags, IPv6 extension chains, fragments, ICMP errors quoting flows, VXLAN in VXLAN in UDP
4789 (a VM's: tenant UDP). Overlay packets arrive on the uplink p5: VXLAN from known and
unknown VTEPs with known and unknown VNIs (VNI 0 included), inner sources behind the right
VTEP, another one or none, to the node and elsewhere, another UDP port, the node's own
traffic, mutated like the rest (the oracle's `_uplink`: decap only for a known VNI from
its tenant's VTEP, delivered only to that tenant's VM, routed). Every example also sweeps
one packet through every truncation from 14 bytes up.

CI: FUZZ_EXAMPLES examples (about 25,000 packets). XDPFLOW_LONG=1: enough examples for
1,000,000 packets (XDPFLOW_FUZZ_PACKETS overrides the target)."""
from __future__ import annotations

import collections
import os

import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st
from scapy.all import (ICMP, IP, TCP, UDP, Dot1AD, Dot1Q, Ether, IPOption_RR, IPv6,
                       ICMPv6DestUnreach, ICMPv6EchoReply, ICMPv6EchoRequest,
                       ICMPv6PacketTooBig, ICMPv6ND_NS, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment,
                       IPv6ExtHdrHopByHop, IPv6ExtHdrRouting, Raw, raw)
from scapy.layers.ipsec import AH
from scapy.layers.vxlan import VXLAN

from agent import abi, compiler, model

from . import oracle
from .conftest import PORT_MAC, SLOT, VM_MAC

pytestmark = pytest.mark.bpf

LONG = os.environ.get("XDPFLOW_LONG") == "1"
# Drawing a packet through Hypothesis and Scapy costs about 100 times running it, so each
# example draws BATCH packets to run as they are and SWEPT ones to sweep: every truncation
# from 14 bytes up, and every header byte (up to SWEEP_MAX) set to drawn values.
BATCH = 12
OVERLAY = 6                 # and OVERLAY packets arriving on the uplink
SWEPT = 2                   # a VM's and an uplink's
SWEEP_MAX = 96
PER_EXAMPLE = 450           # packets per example, as measured (about; the uplink sweep included)
TARGET = int(os.environ.get("XDPFLOW_FUZZ_PACKETS", 1_000_000 if LONG else 30_000))
FUZZ_EXAMPLES = max(1, TARGET // PER_EXAMPLE)

BLUE, RED = 10, 30
OTHER_MAC = "02:00:00:00:00:99"
# Two tenants with overlapping addresses; blue's default drops, red's passes. p3 has no
# port security and takes VLAN tags; p2 has an allowed prefix; p6 is no port at all.
# p5 is the uplink (VTEP 192.0.2.1): blue (VNI 5010) has remote endpoints behind
# 192.0.2.2 and 192.0.2.3, red (VNI 5030) one behind 192.0.2.3 with blue's remote address.
LOCAL_VTEP, REMOTE_VTEP, OTHER_VTEP = "192.0.2.1", "192.0.2.2", "192.0.2.3"
BLUE_VNI, RED_VNI = 5010, 5030
REMOTE_MAC, UNDERLAY_MAC = "02:00:00:00:01:07", "02:ee:00:00:00:02"
STATE = {
    "tenants": [{"name": "blue", "id": BLUE, "vni": BLUE_VNI},
                {"name": "red", "id": RED, "default": "pass", "vni": RED_VNI}],
    "ports": [{"name": "p1", "tenant": "blue"},
              {"name": "p2", "tenant": "blue", "allow": ["10.9.0.0/16"]},
              {"name": "p3", "tenant": "red", "port_security": False, "allow_vlan": True},
              {"name": "p4", "tenant": "red"},
              {"name": "p5", "uplink": True, "local_ip": LOCAL_VTEP}],
    "endpoints": [
        {"tenant": "blue", "ip": "10.0.0.1", "port": "p1", "mac": VM_MAC["p1"]},
        {"tenant": "blue", "ip": "10.0.0.2", "port": "p2", "mac": VM_MAC["p2"]},
        {"tenant": "blue", "ip": "10.0.0.3", "port": "p2", "mac": OTHER_MAC},
        {"tenant": "blue", "ip": "fd00::1", "port": "p1", "mac": VM_MAC["p1"]},
        {"tenant": "blue", "ip": "fd00::2", "port": "p2", "mac": VM_MAC["p2"]},
        {"tenant": "red", "ip": "10.0.0.1", "port": "p3", "mac": VM_MAC["p1"]},
        {"tenant": "red", "ip": "10.0.0.2", "port": "p4", "mac": VM_MAC["p4"]},
        {"tenant": "red", "ip": "fd00::2", "port": "p4", "mac": VM_MAC["p4"]},
        {"tenant": "blue", "ip": "10.0.1.7", "vtep": REMOTE_VTEP, "mac": REMOTE_MAC},
        {"tenant": "blue", "ip": "fd00:1::7", "vtep": REMOTE_VTEP, "mac": REMOTE_MAC},
        {"tenant": "blue", "ip": "10.0.1.9", "vtep": OTHER_VTEP, "mac": "02:00:00:00:01:09"},
        {"tenant": "red", "ip": "10.0.1.7", "vtep": OTHER_VTEP, "mac": REMOTE_MAC},
    ],
    "routes": [
        {"tenant": "blue", "prefix": "10.1.0.0/16", "via": "10.0.0.2"},
        {"tenant": "blue", "prefix": "10.2.0.0/16", "action": "kernel"},
        {"tenant": "blue", "prefix": "10.3.0.0/16", "action": "drop"},
        {"tenant": "blue", "prefix": "fd01::/64", "via": "fd00::2"},
        {"tenant": "red", "prefix": "0.0.0.0/0", "via": "10.0.0.2"},
    ],
}
PORTS = ("p1", "p2", "p3", "p4")

# --- rules ---------------------------------------------------------------------------------

V4_PREFIXES = ["10.0.0.0/24", "10.0.0.1/32", "10.0.0.2/32", "10.0.0.0/30", "10.1.0.0/16",
               "10.9.0.0/16", "0.0.0.0/0", "10.0.0.0/8"]
V6_PREFIXES = ["fd00::/64", "fd00::1/128", "fd00::2/128", "fd01::/64", "::/0", "fe80::/64"]
PORT_RANGES = [None, 22, 53, 80, 4789, "1000-1999", "0-1023", "4000-5000", 65535]


@st.composite
def a_rule(draw, rid: int):
    tenant = draw(st.sampled_from(["blue", "red"]))
    family = draw(st.sampled_from([4, 6, 0]))
    prefixes = {4: V4_PREFIXES, 6: V6_PREFIXES, 0: [None]}[family]
    proto = draw(st.sampled_from([None, "tcp", "udp", "icmp" if family != 6 else "icmpv6",
                                  "icmpv6" if family == 6 else 47]))
    r = {"id": rid, "tenant": tenant,
         "priority": draw(st.sampled_from([0, 10, 100, 100, 200, 65535])),
         "action": draw(st.sampled_from(["allow", "allow", "deny", "pass"])),
         "src": draw(st.sampled_from(prefixes + [None])),
         "dst": draw(st.sampled_from(prefixes + [None]))}
    if proto is not None:
        r["proto"] = proto
    if proto in ("tcp", "udp"):
        r["sport"] = draw(st.sampled_from(PORT_RANGES[:3] + [None, None]))
        r["dport"] = draw(st.sampled_from(PORT_RANGES))
    if proto in ("icmp", "icmpv6") and draw(st.booleans()):
        r["icmp_type"] = draw(st.sampled_from([0, 3, 8, 128, 129, 1, 2]))
        if draw(st.booleans()):
            r["icmp_code"] = draw(st.sampled_from([0, 4]))
    if draw(st.integers(0, 5)) == 0:
        r["in_port"] = draw(st.sampled_from(["p1", "p2"] if tenant == "blue" else ["p3", "p4"]))
    return r


@st.composite
def rule_sets(draw):
    n = draw(st.integers(0, 10))
    rules = []
    for rid in range(1, n + 1):
        r = draw(a_rule(rid))
        try:
            model.Rule.from_dict(r)
        except model.Invalid:
            continue
        rules.append(r)
    if not draw(st.booleans()):
        # Under them, half the time, blue allows the rest: most of what the overlay
        # delivers needs an allow, and random rules rarely give one.
        rules.append({"id": n + 1, "tenant": "blue", "priority": 0, "action": "allow"})
    return rules


# --- packets -------------------------------------------------------------------------------

V4_ADDRS = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.9", "10.1.2.3", "10.2.0.1",
            "10.3.0.1", "10.9.1.1", "192.0.2.1", "224.0.0.5", "255.255.255.255", "0.0.0.0"]
V6_ADDRS = ["fd00::1", "fd00::2", "fd00::9", "fd01::5", "fe80::1", "ff02::1", "::",
            "::ffff:10.0.0.1", "::ffff:10.0.0.2", "2001:db8::1"]
L4_PORTS = [22, 53, 80, 1000, 1500, 4000, 4789, 5000, 65535, 0]


def vxlan_in_vxlan(draw) -> bytes:
    """VXLAN in VXLAN: an outer frame's UDP 4789 payload holding another whole frame whose
    UDP 4789 payload is a third one."""
    inner = Ether(src=OTHER_MAC, dst=VM_MAC["p2"]) / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2) / b"in"
    for _ in range(draw(st.integers(1, 2))):
        inner = Ether(src=OTHER_MAC, dst=VM_MAC["p2"]) / IP(src="192.0.2.1", dst="192.0.2.2") / UDP(sport=4789, dport=4789) / \
            VXLAN(vni=draw(st.integers(0, (1 << 24) - 1))) / inner
    return raw(VXLAN(vni=draw(st.integers(0, (1 << 24) - 1)), flags=draw(st.sampled_from(
        [0x08, 0x00, 0xFF]))) / inner)


@st.composite
def l4(draw, family: int):
    kind = draw(st.sampled_from(["tcp", "udp", "udp", "icmp", "icmp_err", "vxlan", "other",
                                 "nd"]))
    sport, dport = draw(st.sampled_from(L4_PORTS)), draw(st.sampled_from(L4_PORTS))
    if kind == "tcp":
        return TCP(sport=sport, dport=dport, flags=draw(st.sampled_from(["S", "SA", "A", "F",
                                                                        "R", ""])),
                   dataofs=draw(st.sampled_from([None, None, 0, 4, 5, 15])))
    if kind == "udp":
        return UDP(sport=sport, dport=dport, len=draw(st.sampled_from([None, None, 0, 7, 9,
                                                                       300]))) / (b"u" * 4)
    if kind == "vxlan":
        return UDP(sport=sport, dport=4789) / vxlan_in_vxlan(draw)
    if kind == "other":
        return Raw(bytes([47]) * draw(st.integers(0, 20)))
    if kind == "nd" and family == 6:
        return ICMPv6ND_NS(tgt=draw(st.sampled_from(V6_ADDRS[:4])))
    echo_id = draw(st.sampled_from([1, 7]))
    if kind == "icmp_err":
        # An error quoting a packet of a flow the batch may have made.
        quoted_src, quoted_dst = draw(st.sampled_from(
            [("10.0.0.1", "10.0.0.2"), ("10.0.0.2", "10.0.0.1")] if family == 4 else
            [("fd00::1", "fd00::2"), ("fd00::2", "fd00::1")]))
        q = (IP(src=quoted_src, dst=quoted_dst) if family == 4 else
             IPv6(src=quoted_src, dst=quoted_dst)) / UDP(sport=sport, dport=dport)
        if family == 4:
            return ICMP(type=draw(st.sampled_from([3, 11])), code=draw(st.sampled_from(
                [3, 4])), nexthopmtu=draw(st.sampled_from([0, 67, 68, 1400]))) / q
        return draw(st.sampled_from([ICMPv6DestUnreach(code=4), ICMPv6PacketTooBig(
            mtu=draw(st.sampled_from([1279, 1280, 1500])))])) / q
    if family == 4:
        return ICMP(type=draw(st.sampled_from([8, 0, 13])), id=echo_id, code=0)
    return draw(st.sampled_from([ICMPv6EchoRequest, ICMPv6EchoReply]))(id=echo_id)


EXT = [IPv6ExtHdrHopByHop, IPv6ExtHdrRouting, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, AH]


@st.composite
def ip_layer(draw, family: int):
    ttl = draw(st.sampled_from([64, 64, 2, 1, 0]))
    if family == 4:
        src, dst = draw(st.sampled_from(V4_ADDRS)), draw(st.sampled_from(V4_ADDRS))
        frag = draw(st.sampled_from([0, 0, 0, 0x2000, 0x0001, 0x2003]))
        ip = IP(src=src, dst=dst, ttl=ttl, id=draw(st.sampled_from([1, 2])), flags=frag >> 13,
                frag=frag & 0x1FFF, ihl=draw(st.sampled_from([None] * 6 + [0, 4, 6, 15])),
                len=draw(st.sampled_from([None] * 6 + [0, 19, 21, 2000])))
        if draw(st.integers(0, 7)) == 0:
            ip.options = [IPOption_RR()]
        return ip
    src, dst = draw(st.sampled_from(V6_ADDRS)), draw(st.sampled_from(V6_ADDRS))
    ip = IPv6(src=src, dst=dst, hlim=ttl, plen=draw(st.sampled_from([None] * 6 + [0, 1, 9000])))
    for ext in draw(st.lists(st.sampled_from(EXT), max_size=8)):
        if ext is IPv6ExtHdrFragment:
            ip = ip / ext(id=draw(st.sampled_from([1, 2])),
                          m=draw(st.integers(0, 1)), offset=draw(st.sampled_from([0, 0, 1])))
        else:
            ip = ip / ext()
    return ip


@st.composite
def a_packet(draw):
    """(ingress port, bytes): a valid packet from layers, then perhaps mutated."""
    port = draw(st.sampled_from(PORTS + PORTS + ("p6",)))
    family = draw(st.sampled_from([4, 6]))
    smac = draw(st.sampled_from([VM_MAC.get(port, VM_MAC["p1"])] * 4 +
                                [VM_MAC["p1"], VM_MAC["p4"], OTHER_MAC]))
    dmac = draw(st.sampled_from([PORT_MAC[port], PORT_MAC[port], "ff:ff:ff:ff:ff:ff"]))
    pkt = Ether(src=smac, dst=dmac)
    for _ in range(draw(st.sampled_from([0] * 8 + [1, 2, 3]))):
        pkt = pkt / draw(st.sampled_from([Dot1Q, Dot1AD]))(vlan=draw(st.integers(0, 4095)))
    pkt = pkt / draw(ip_layer(family)) / draw(l4(family))
    return port, mutated(draw, raw(pkt))


REMOTE_SRC = {4: ["10.0.1.7", "10.0.1.7", "10.0.1.9", "10.0.0.1"],
              6: ["fd00:1::7", "fd00:1::7", "fd00::1"]}
LOCAL_DST = {4: ["10.0.0.1", "10.0.0.2", "10.1.2.3"], 6: ["fd00::1", "fd00::2"]}


@st.composite
def an_uplink_packet(draw):
    """("p5", bytes): VXLAN (or not) from the underlay, its inner packet drawn as a VM's
    is, from a remote endpoint's address most of the time; then perhaps mutated."""
    family = draw(st.sampled_from([4, 6]))
    ip = draw(ip_layer(family))
    # (Hypothesis draws small values more often: the first choice is the likely one.)
    if draw(st.integers(0, 3)) != 3:
        ip.src = draw(st.sampled_from(REMOTE_SRC[family]))
    if not draw(st.booleans()):
        ip.dst = draw(st.sampled_from(LOCAL_DST[family]))
    inner = Ether(src=draw(st.sampled_from([REMOTE_MAC, REMOTE_MAC, OTHER_MAC])),
                  dst=PORT_MAC["p5"]) / ip / draw(l4(family))
    vtep = draw(st.sampled_from([REMOTE_VTEP, OTHER_VTEP, "192.0.2.99", REMOTE_VTEP]))
    outer = Ether(src=UNDERLAY_MAC, dst=PORT_MAC["p5"]) / IP(
        src=vtep, dst=draw(st.sampled_from([LOCAL_VTEP] * 3 + ["192.0.2.50", LOCAL_VTEP])),
        flags=draw(st.sampled_from([0, 2, 1, 0, 0])), ttl=64)
    # Drawn choices at either end of a list come up often: the rare ones sit inside
    # (here and in the lists above).
    kind = draw(st.sampled_from(["vxlan"] * 3 + ["udp", "own"] + ["vxlan"] * 3))
    if kind == "own":            # the node's own traffic: SSH to its address
        pkt = outer / TCP(sport=40000, dport=22, flags="S")
    else:
        udp = UDP(sport=draw(st.sampled_from([51000, 4789])),
                  dport=4789 if kind == "vxlan" else draw(st.sampled_from([4790, 53])),
                  chksum=0)
        vni = draw(st.sampled_from([BLUE_VNI, RED_VNI, 5999, 0, BLUE_VNI]))
        pkt = outer / udp / VXLAN(vni=vni, flags=draw(st.sampled_from([0x08, 0x00, 0x08])))
        pkt = pkt / inner
    return "p5", mutated(draw, raw(pkt))


def mutated(draw, data: bytes) -> bytes:
    """As it is, or a few header bytes changed, truncated, or given a random tail."""
    how = draw(st.sampled_from(["as is"] * 4 + ["bytes", "truncate", "random tail"]))
    if how == "bytes":
        # Field by field: a few header bytes set to values the fields should not hold.
        data = bytearray(data)
        for _ in range(draw(st.integers(1, 3))):
            i = draw(st.integers(12, min(len(data), 100) - 1))
            data[i] = draw(st.sampled_from([0, 1, 0x45, 0x7F, 0x80, 0xFF, data[i] ^ 0x10]))
        data = bytes(data)
    elif how == "truncate":
        data = data[:draw(st.integers(14, len(data)))]
    elif how == "random tail":
        # Random bytes behind the valid headers (where L4 begins, or further on).
        cut = draw(st.integers(14, len(data)))
        data = data[:cut] + draw(st.binary(min_size=0, max_size=64))
    return data




# --- the run -------------------------------------------------------------------------------

def counters(dp):
    return {(s, v, r): (p, b) for s, v, r, p, b in dp.counters(max_slot=len(SLOT) + 1)}


def run_batch(bench, orc, batch, sent, problems):
    """Each packet through the program and the oracle; what disagrees goes to `problems`."""
    for port, data in batch:
        rc, out = bench.run(data, port)
        sent.append((port, rc, len(data)))
        want = orc.judge(data, port)
        if rc == oracle.XDP_ABORTED:
            problems.append(("aborted", port, data.hex()))
        elif rc not in want.actions:
            problems.append((f"action {rc}, oracle {sorted(want.actions)} ({want.why})", port,
                             data.hex()))
        elif rc in (oracle.XDP_DROP, oracle.XDP_PASS) and \
                out != (data if want.stays is None else want.stays):
            problems.append((f"action {rc} changed the bytes", port, data.hex()))
        elif rc == oracle.XDP_REDIRECT and (want.redirect is None or out != oracle.redirected(
                data if want.decap is None else want.decap, want.redirect)):
            problems.append((f"redirect output differs (oracle {want.why})", port, data.hex()))


VERDICT_OF = {oracle.XDP_DROP: abi.V_DROP, oracle.XDP_PASS: abi.V_PASS,
              oracle.XDP_REDIRECT: abi.V_REDIRECT, oracle.XDP_TX: abi.V_TX}


def check_counters(before, after, sent):
    """Per verdict, the rows' packets and bytes grew by what was sent with that verdict."""
    got = collections.Counter()
    for k in set(before) | set(after):
        slot, verdict, _ = k
        if verdict == abi.V_NONE:
            continue            # event rows (failed inserts, stale flows) are no packets
        a, b = after.get(k, (0, 0)), before.get(k, (0, 0))
        got[(verdict, "packets")] += a[0] - b[0]
        got[(verdict, "bytes")] += a[1] - b[1]
    want = collections.Counter()
    for _, rc, n in sent:
        want[(VERDICT_OF[rc], "packets")] += 1
        want[(VERDICT_OF[rc], "bytes")] += n
    assert +got == +want, f"counters grew by {dict(+got)}; sent {dict(+want)}"


def sweep(data: bytes, values):
    """Every truncation from 14 bytes up, then every header byte from the EtherType on set
    to one of `values` in turn (and to its complement)."""
    out = [data[:n] for n in range(14, len(data) + 1)]
    for i in range(12, min(len(data), SWEEP_MAX)):
        v = values[i % len(values)]
        for b in (v, data[i] ^ 0xFF):
            out.append(data[:i] + bytes([b]) + data[i + 1:])
    return out


def links(bench):
    return {p: oracle.Link(bench.lab.ifindex[p], oracle._mac(PORT_MAC[p]), SLOT[p])
            for p in PORTS + ("p5",)}


def fuzz_once(bench, rules, batch, swept=(), values=(0,)):
    state = dict(STATE, rules=rules)
    bench.apply(state)
    orc = oracle.Oracle(state, links(bench))
    before = counters(bench.dp)
    sent, problems = [], []
    packets = list(batch)
    for port, data in swept:
        packets += [(port, d) for d in sweep(data, values)]
    run_batch(bench, orc, packets, sent, problems)
    assert not problems, f"{len(problems)} of {len(sent)} packets: first {problems[:3]}"
    SENT["uplink"] += sum(port == "p5" for port, _, _ in sent)
    SENT["decapsulated"] += sum(port == "p5" and rc == oracle.XDP_REDIRECT
                                for port, rc, _ in sent)
    check_counters(before, counters(bench.dp), sent)
    return len(sent)


SENT = collections.Counter()


# No shrinking: a failure already names every packet that disagreed (hex), and shrinking a
# batch takes minutes; each finding becomes a regression test below.
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
          phases=(Phase.explicit, Phase.generate),
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(rules=rule_sets(), batch=st.lists(a_packet(), min_size=BATCH, max_size=BATCH),
       overlay=st.lists(an_uplink_packet(), min_size=OVERLAY, max_size=OVERLAY),
       swept=st.tuples(a_packet(), an_uplink_packet()),
       values=st.lists(st.integers(0, 255), min_size=1, max_size=4))
def test_fuzzed_packets_get_what_the_policy_allows(bench, rules, batch, overlay, swept,
                                                   values):
    # The overlay's packets among the VMs' (in the flow table's state they leave).
    mixed = [p for pair in zip(batch, overlay + [None] * BATCH) for p in pair if p]
    assert len(swept) == SWEPT
    SENT["packets"] += fuzz_once(bench, rules, mixed, swept, values)


def test_zz_fuzz_sent_enough_packets():
    """The figure the issue asks for: at least 20,000 packets in CI (1,000,000 long)."""
    print(f"fuzzed packets: {SENT['packets']}, on the uplink {SENT['uplink']}, "
          f"delivered decapsulated {SENT['decapsulated']}")
    if SENT["packets"]:
        assert SENT["packets"] >= min(TARGET, 20_000) * 0.8
        # The overlay's share is drawn, and some of it gets through (the oracle judged it).
        assert SENT["uplink"] >= SENT["packets"] // 10 and SENT["decapsulated"] > 0


# --- what the fuzzer found, kept as regressions -----------------------------------------------

def test_an_ipv6_packet_with_ipv4_mapped_addresses_is_malformed_not_the_ipv4_endpoints(bench):
    """Found by the fuzzer: the datapath keys IPv4 as ::ffff:a.b.c.d, so an IPv6 packet from
    ::ffff:10.0.0.1 passed port security as the IPv4 endpoint 10.0.0.1 (a port with no
    IPv6 address could send IPv6), and one to ::ffff:10.0.0.2 took the IPv4 rules and
    route to 10.0.0.2's VM. Now malformed (parse_ipv6): the tenant's default."""
    rules = [{"id": 1, "tenant": "blue", "priority": 10, "action": "allow"},
             {"id": 2, "tenant": "red", "priority": 10, "action": "allow"}]
    mapped = [("p1", "::ffff:10.0.0.1", "::ffff:10.0.0.2"),    # blue: was redirected to p2
              ("p1", "fd00::1", "::ffff:10.0.0.2"),
              ("p4", "::ffff:10.0.0.2", "fd00::2"),            # red: passed port security
              ("p4", "::ffff:10.0.0.2", "2001:db8::1")]
    batch = [(port, raw(Ether(src=VM_MAC[port], dst=PORT_MAC[port]) / IPv6(src=s, dst=d) /
                        UDP(sport=1000, dport=2000) / b"m"))
             for port, s, d in mapped]
    before = counters(bench.dp)
    assert fuzz_once(bench, rules, batch) == len(batch)
    grown = {k: counters(bench.dp)[k][0] - before.get(k, (0, 0))[0]
             for k in counters(bench.dp) if counters(bench.dp)[k] != before.get(k)}
    parse6 = [r for r, n in abi.REASONS.items() if n == "parse_ipv6"][0]
    assert grown == {(SLOT["p1"], abi.V_DROP, parse6): 2, (SLOT["p4"], abi.V_PASS, parse6): 2}


def test_overlay_packets_on_the_uplink_are_judged_by_the_oracle(bench):
    """The uplink's cases the fuzzer draws from, once each, with rules that allow blue's
    traffic: delivered decapsulated from the right VTEP only (the oracle says which)."""
    rules = [{"id": 1, "tenant": "blue", "priority": 10, "action": "allow"}]

    def vx(vtep=REMOTE_VTEP, vni=BLUE_VNI, src="10.0.1.7", dst="10.0.0.1"):
        return ("p5", raw(Ether(src=UNDERLAY_MAC, dst=PORT_MAC["p5"]) /
                          IP(src=vtep, dst=LOCAL_VTEP) / UDP(sport=51000, dport=4789, chksum=0) /
                          VXLAN(vni=vni) / Ether(src=REMOTE_MAC, dst=PORT_MAC["p5"]) /
                          IP(src=src, dst=dst) / UDP(sport=1000, dport=2000) / b"v"))
    batch = [vx(), vx(vtep=OTHER_VTEP), vx(vtep="192.0.2.99"), vx(vni=5999), vx(vni=RED_VNI),
             vx(src="10.0.1.9", vtep=OTHER_VTEP), vx(dst="10.0.1.9"), vx(src="10.0.0.2")]
    # Ethernet padding behind the outer packet: gone from what is delivered, and from
    # what a decapsulated packet that is dropped leaves (the oracle's `stays`).
    batch += [(p, d + bytes(6)) for p, d in (vx(), vx(src="10.0.0.2"))]
    before = bench.snapshot()
    assert fuzz_once(bench, rules, batch) == len(batch)
    got = {k: v[0] for k, v in (bench.snapshot() - before).items()}
    p5 = SLOT["p5"]
    # Transit (an inner destination behind another VTEP) is refused (test_overlay.py:
    # drop, no_route), also while the VTEP's underlay MAC is unknown, as here.
    assert got == {(p5, "redirect", "rule_allow"): 2, (p5, "redirect", "flow"): 1,
                   (p5, "drop", "vtep_unknown"): 2,
                   (p5, "drop", "vni_unknown"): 1, (p5, "drop", "spoof"): 3,
                   (p5, "drop", "no_route"): 1}, got
