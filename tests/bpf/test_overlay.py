"""The overlay in the datapath: uplink ports, VXLAN encap to remote endpoints and decap
from known VTEPs. Cases of the same shape as cases.py (exact output bytes, counter rows),
run through the program and the trace build; expected outer headers are Scapy's (it
computes the IPv4 checksum), and the outer UDP source port is the datapath's hash of the
inner flow key, recomputed here. Each check the decap makes has a case that tries to get
around it."""
from __future__ import annotations

import ipaddress
from typing import List

import pytest
from scapy.all import ARP, IP, UDP, Ether, IPv6, fragment, raw
from scapy.layers.vxlan import VXLAN

from agent import abi

from . import cases
from .cases import (BLUE, XDP_DROP, XDP_PASS, XDP_REDIRECT, Case, Send, arp_answer, arp_req,
                    flow_check, routed, rule, stays, tcp4, udp4, udp6)
from .conftest import PORT_MAC, SLOT
from .test_datapath import run_case, trace_case

pytestmark = pytest.mark.bpf

UPLINK = "p5"
LOCAL_VTEP, REMOTE_VTEP, OTHER_VTEP = "192.0.2.1", "192.0.2.2", "192.0.2.3"
UNDERLAY_MAC = "02:ee:00:00:00:02"     # the remote VTEP's MAC, as the node resolved it
REMOTE_IP, REMOTE_MAC = "10.0.1.7", "02:00:00:00:01:07"
FAR_IP = "10.0.1.9"                    # a remote endpoint behind OTHER_VTEP
REMOTE_IP6 = "fd00:1::7"               # the remote VM's IPv6 address (IPv4 underlay)
VNI = 5010
MTU = 1500


def overlay(rules=None, **kw) -> dict:
    """Tenant blue (VNI 5010): VMs on p1/p2, remote 10.0.1.7 behind 192.0.2.2 and
    10.0.1.9 behind 192.0.2.3; p5 the uplink (192.0.2.1)."""
    st = cases.blue([rule(1, priority=10)] if rules is None else rules, **kw)
    st["tenants"][0]["vni"] = VNI
    st["ports"].append({"name": UPLINK, "uplink": True, "local_ip": LOCAL_VTEP})
    st["endpoints"] += [
        {"tenant": "blue", "ip": REMOTE_IP, "vtep": REMOTE_VTEP, "mac": REMOTE_MAC},
        {"tenant": "blue", "ip": FAR_IP, "vtep": OTHER_VTEP, "mac": "02:00:00:00:01:09"},
        {"tenant": "blue", "ip": REMOTE_IP6, "vtep": REMOTE_VTEP, "mac": REMOTE_MAC}]
    return st


def sport_of(src, sport, dst, dport, proto=17, tenant=BLUE) -> int:
    """The datapath's outer source port for an inner flow (xf_encap_sport)."""
    k = abi.FlowKey(tenant=tenant, proto=proto, sport=sport, dport=dport)
    abi.set_addr(k.src, ipaddress.ip_address(src))
    abi.set_addr(k.dst, ipaddress.ip_address(dst))
    h = 0
    for i in range(4):
        h ^= k.src[i] ^ k.dst[i]
    h ^= ((sport << 16) | dport) ^ (proto << 8) ^ tenant
    m = 0xffffffff
    h ^= h >> 16
    h = (h * 0x7feb352d) & m
    h ^= h >> 15
    h = (h * 0x846ca68b) & m
    h ^= h >> 16
    return 0xc000 | (h & 0x3fff)


def encapped(inner: bytes, sport: int, vtep=REMOTE_VTEP) -> bytes:
    """What the uplink sends: Scapy's outer headers (checksum computed by Scapy) around
    the routed inner frame."""
    return raw(Ether(dst=UNDERLAY_MAC, src=PORT_MAC[UPLINK]) /
               IP(src=LOCAL_VTEP, dst=vtep, id=0, flags="DF", ttl=64, tos=0) /
               UDP(sport=sport, dport=4789, chksum=0) / VXLAN(flags=0x08, vni=VNI) / inner)


def vxlan(inner, vni=VNI, vtep=REMOTE_VTEP, dport=4789, dst=LOCAL_VTEP, flags=0x08, **ipkw):
    """A VXLAN packet arriving on the uplink."""
    return (Ether(src=UNDERLAY_MAC, dst=PORT_MAC[UPLINK]) /
            IP(src=vtep, dst=dst, id=7, ttl=64, **ipkw) / UDP(sport=51000, dport=dport) /
            VXLAN(flags=flags, vni=vni) / inner)


def from_remote(src=REMOTE_IP, dst="10.0.0.1", sport=6000, dport=4000, smac=REMOTE_MAC,
                payload=b"r" * 18):
    return Ether(src=smac, dst=PORT_MAC[UPLINK]) / IP(src=src, dst=dst, ttl=64, id=3) / \
        UDP(sport=sport, dport=dport) / payload


def to_remote(**kw):
    return udp4(dst=REMOTE_IP, **kw)


def encap_case(desc, pkt, reason="rule_allow", sport=4000, dport=5000, route_dst=REMOTE_IP,
               **kw):
    inner = routed(pkt, UPLINK, dmac=REMOTE_MAC)
    counters = {("p1", "redirect", reason): 1, **kw.pop("counters", {})}
    return Case(desc, kw.pop("state", overlay()), pkt, XDP_REDIRECT, counters,
                out=encapped(inner, sport_of("10.0.0.1", sport, route_dst, dport)),
                out_port=UPLINK, rule=1, **kw)


def decap_case(desc, pkt, out_port="p1", reason="rule_allow", **kw):
    counters = {(UPLINK, "redirect", reason): 1, **kw.pop("counters", {})}
    inner = Ether(raw(pkt)[abi.ENCAP_LEN:])
    return Case(desc, kw.pop("state", overlay()), pkt, XDP_REDIRECT, counters, port=UPLINK,
                out=routed(inner, out_port), out_port=out_port, rule=kw.pop("rule", 1), **kw)


def uplink_stays(desc, pkt, verdict, reason, **kw):
    return stays(desc, kw.pop("state", overlay()), pkt, verdict, reason, port=UPLINK, **kw)


def big(frame_len):
    """A UDP packet to the remote endpoint whose frame is frame_len bytes."""
    return to_remote(payload=b"m" * (frame_len - 14 - 20 - 8))


def outer_fragments():
    return [Ether(src=UNDERLAY_MAC, dst=PORT_MAC[UPLINK]) / f
            for f in fragment(vxlan(from_remote())[IP], fragsize=48)]


def build() -> List[Case]:
    fwd_then = [Send(to_remote(), action=XDP_REDIRECT)]
    C = [
        # -- uplink: not the datapath's
        uplink_stays("uplink: the node's own traffic goes to the kernel",
                     tcp4(40000, 22, port=UPLINK, src="192.0.2.9", dst=LOCAL_VTEP), "pass",
                     "uplink_other"),
        uplink_stays("uplink: a tenant's addresses bare on the uplink are not the tenant's",
                     udp4(port=UPLINK), "pass", "uplink_other"),
        uplink_stays("uplink: VXLAN to another UDP port is the kernel's",
                     vxlan(from_remote(), dport=4790), "pass", "uplink_other"),
        uplink_stays("uplink: VXLAN to another address is the kernel's",
                     vxlan(from_remote(), dst="192.0.2.50"), "pass", "uplink_other"),
        # -- encap
        encap_case("encap: a packet to a remote endpoint leaves the uplink in VXLAN",
                   to_remote(),
                   check=flow_check(BLUE, 17, "10.0.0.1", 4000, REMOTE_IP, 5000,
                                    flags=abi.FLOW_ENCAP)),
        encap_case("encap: a flow hit carries the whole rewrite", to_remote(), reason="flow",
                   pre=fwd_then),
        encap_case("encap: another flow gets its own outer source port",
                   to_remote(sport=4001), sport=4001),
        encap_case("encap: the largest packet that fits the uplink's MTU", big(MTU - 36)),
        stays("encap: too big for the uplink once encapsulated goes to the kernel",
              overlay(), big(MTU - 35), "pass", "mtu_kernel"),
        stays("encap: too big on a flow hit goes to the kernel too", overlay(),
              big(MTU - 35), "pass", "mtu_kernel",
              pre=[Send(big(MTU - 36), action=XDP_REDIRECT)]),
        stays("encap: ARP for a remote endpoint is answered by the local proxy", overlay(),
              arp_req("10.0.0.1", REMOTE_IP), "tx", "arp_reply",
              out=arp_answer("10.0.0.1", REMOTE_IP)),
        encap_case("encap: a route via a remote endpoint", udp4(dst="10.9.1.1"),
                   state=overlay(routes=[{"tenant": "blue", "prefix": "10.9.0.0/16",
                                          "via": REMOTE_IP}]), route_dst="10.9.1.1"),
        Case("encap: IPv6 inside, IPv4 underlay", overlay(), udp6(dst=REMOTE_IP6),
             XDP_REDIRECT, {("p1", "redirect", "rule_allow"): 1}, out_port=UPLINK, rule=1,
             out=encapped(routed(udp6(dst=REMOTE_IP6), UPLINK, dmac=REMOTE_MAC),
                          sport_of("fd00::1", 4000, REMOTE_IP6, 5000))),
        # -- decap
        decap_case("decap: VXLAN from a known VTEP is its VNI tenant's traffic",
                   vxlan(from_remote())),
        decap_case("decap: the reply of an encapsulated flow is a flow hit",
                   vxlan(from_remote(sport=5000, dport=4000)), reason="flow",
                   pre=fwd_then),
        decap_case("decap: IPv6 inside",
                   vxlan(Ether(src=REMOTE_MAC, dst=PORT_MAC[UPLINK]) /
                         IPv6(src=REMOTE_IP6, dst="fd00::1", hlim=64) /
                         UDP(sport=6000, dport=4000) / (b"6" * 8))),
        uplink_stays("decap: rules apply at the destination node too",
                     vxlan(from_remote()), "drop", "rule_deny", rule=2,
                     state=overlay([rule(1, priority=10), rule(2, "deny", priority=20,
                                                               src=f"{REMOTE_IP}/32")])),
        uplink_stays("decap: an unknown VNI is dropped", vxlan(from_remote(), vni=5999),
                     "drop", "vni_unknown"),
        uplink_stays("decap: a VTEP with no endpoint of the tenant is dropped",
                     vxlan(from_remote(), vtep="192.0.2.99"), "drop", "vtep_unknown"),
        uplink_stays("decap: a VTEP known for another VNI only is dropped",
                     vxlan(from_remote(), vni=5020), "drop", "vtep_unknown",
                     state=dict(overlay(), tenants=overlay()["tenants"] + [
                         {"name": "red", "id": 30, "vni": 5020}])),
        uplink_stays("decap: an inner source that is no remote endpoint is spoofed",
                     vxlan(from_remote(src="10.0.1.8")), "drop", "spoof"),
        uplink_stays("decap: an inner source of a local VM is spoofed",
                     vxlan(from_remote(src="10.0.0.2")), "drop", "spoof"),
        uplink_stays("decap: an endpoint behind another VTEP is spoofed from this one",
                     vxlan(from_remote(src=FAR_IP)), "drop", "spoof"),
        uplink_stays("decap: a reply from the wrong VTEP is no flow hit",
                     vxlan(from_remote(sport=5000, dport=4000), vtep=OTHER_VTEP), "drop",
                     "spoof", pre=fwd_then),
        uplink_stays("decap: overlay to overlay (transit) is refused",
                     vxlan(from_remote(dst=FAR_IP)), "drop", "no_route"),
        decap_case("decap: VXLAN in VXLAN is decapsulated once, the inner VXLAN is "
                   "tenant UDP", vxlan(Ether(src=REMOTE_MAC, dst=PORT_MAC[UPLINK]) /
                                       IP(src=REMOTE_IP, dst="10.0.0.1", id=3) /
                                       UDP(sport=6000, dport=4789) /
                                       VXLAN(vni=VNI) / from_remote())),
        uplink_stays("decap: a tenant's pass keeps the outer headers for the kernel",
                     vxlan(from_remote()), "pass", "rule_pass", rule=1,
                     state=overlay([rule(1, "pass", priority=10)])),
        uplink_stays("decap: ARP over the overlay is not answered",
                     vxlan(Ether(src=REMOTE_MAC, dst="ff:ff:ff:ff:ff:ff") /
                           ARP(psrc=REMOTE_IP, pdst="10.0.0.1", hwsrc=REMOTE_MAC)),
                     "drop", "arp_other"),
        # -- the outer headers lie or are cut
        uplink_stays("decap: VXLAN without the I flag is dropped",
                     vxlan(from_remote(), flags=0x00), "drop", "parse_vxlan"),
        uplink_stays("decap: a truncated VXLAN header is dropped",
                     Ether(raw(vxlan(from_remote()))[:14 + 20 + 8 + 4]), "drop",
                     "parse_vxlan"),
        uplink_stays("decap: no room for an inner Ethernet header is dropped",
                     Ether(raw(vxlan(from_remote()))[:14 + 20 + 8 + 8 + 10]), "drop",
                     "parse_vxlan"),
        uplink_stays("decap: an outer total length beyond the frame is dropped",
                     vxlan(from_remote(), len=2000), "drop", "parse_vxlan"),
        uplink_stays("decap: an outer UDP length that lies is dropped",
                     Ether(raw(vxlan(from_remote()))[:38] + b"\x00\x10" +
                           raw(vxlan(from_remote()))[40:]), "drop", "parse_vxlan"),
        uplink_stays("decap: an outer first fragment is the kernel's (it reassembles)",
                     outer_fragments()[0], "pass", "uplink_other"),
        uplink_stays("decap: an outer later fragment is the kernel's",
                     outer_fragments()[1], "pass", "uplink_other"),
    ]
    return C


CASES = build()
IDS = [c.desc for c in CASES]


@pytest.fixture
def obench(bench):
    bench.neighbours = {REMOTE_VTEP: UNDERLAY_MAC, OTHER_VTEP: "02:ee:00:00:00:03"}
    yield bench
    bench.neighbours = {}


def test_cases_are_unique():
    assert len(set(IDS)) == len(IDS)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_case(obench, case):
    run_case(obench, case)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_trace(obench, case):
    trace_case(obench, case)


def test_unresolved_underlay_neighbour_goes_to_the_kernel(bench):
    """Before the agent knows the VTEP's MAC the kernel gets the packet (and resolves it);
    once known, the endpoint changes, the tenant's flows go stale and the next packet is
    encapsulated."""
    bench.neighbours = {}
    bench.apply(overlay())
    rc, out = bench.run(raw(to_remote()), "p1")
    assert (rc, out) == (XDP_PASS, raw(to_remote()))
    bench.neighbours = {REMOTE_VTEP: UNDERLAY_MAC}
    try:
        bench.sync(overlay())
        rc, out = bench.run(raw(to_remote()), "p1")
        assert rc == XDP_REDIRECT
        assert Ether(out)[IP].dst == REMOTE_VTEP and Ether(out).dst == UNDERLAY_MAC
    finally:
        bench.neighbours = {}


def test_transit_is_refused_whether_or_not_the_far_vteps_neighbour_is_resolved(bench):
    """Decapsulated traffic to a remote endpoint behind another VTEP is dropped as
    no_route before that VTEP's underlay MAC is known too: it never goes to the kernel
    (`no_neigh`, outer headers kept), nor out again once the MAC is known."""
    transit = raw(vxlan(from_remote(dst=FAR_IP)))
    up = SLOT[UPLINK]
    # The sender's VTEP is resolved (the reply path exists); the far one is not yet.
    bench.neighbours = {REMOTE_VTEP: UNDERLAY_MAC}
    try:
        bench.apply(overlay())
        for resolved in (False, True):
            if resolved:
                bench.neighbours = {REMOTE_VTEP: UNDERLAY_MAC, OTHER_VTEP: "02:ee:00:00:00:03"}
                bench.sync(overlay())
            before = bench.snapshot()
            rc, _ = bench.run(transit, UPLINK)
            delta = {k: v[0] for k, v in (bench.snapshot() - before).items()}
            assert (rc, delta) == (XDP_DROP, {(up, "drop", "no_route"): 1}), resolved
            assert not bench.flows(), resolved       # refused, not cached
    finally:
        bench.neighbours = {}


def test_encap_output_checksums_verify_in_scapy(obench):
    obench.apply(overlay())
    rc, out = obench.run(raw(to_remote()), "p1")
    assert rc == XDP_REDIRECT
    p = Ether(out)
    ip = p[IP]
    want = ip.chksum
    del ip.chksum
    assert IP(raw(ip))[IP].chksum == want
    assert p[UDP].chksum == 0 and p[UDP].dport == 4789 and 49152 <= p[UDP].sport
    assert p[VXLAN].vni == VNI and p[VXLAN].flags == 0x08
    assert ip.len == len(out) - 14 and p[UDP].len == len(out) - 34
    inner = p[VXLAN].payload
    assert (inner.dst, inner[IP].ttl) == (REMOTE_MAC, 63)
