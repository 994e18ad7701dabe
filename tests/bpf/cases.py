"""The datapath's fixture table: (description, state, input packet and port, pre-steps,
expected XDP action, expected output bytes, expected counter rows). Each case starts from
its own state with no flows; test_datapath.py runs every case through the real program
and, separately, through the trace build."""
from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv6Address
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from scapy.all import (ARP, ICMP, IP, UDP, TCP, Dot1AD, Dot1Q, Ether, IPv6, IPOption_RR,
                       ICMPv6EchoRequest, ICMPv6PacketTooBig, ICMPv6ND_NA, ICMPv6ND_NS,
                       ICMPv6ND_RS, ICMPv6NDOptDstLLAddr, ICMPv6NDOptSrcLLAddr,
                       IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop,
                       IPv6ExtHdrRouting, Padding, Raw, fragment, raw)

from agent import abi

from .conftest import PORT_MAC, SLOT, VM_MAC

XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = 0, 1, 2, 3, 4
ACTION_OF = {"drop": XDP_DROP, "pass": XDP_PASS, "tx": XDP_TX, "redirect": XDP_REDIRECT}
# Reasons under which the packet was classified (rule hits are counted).
CLASSIFIED = {"rule_allow", "rule_deny", "rule_pass", "no_route", "route_kernel", "route_drop",
              "local"}

BLUE, RED = 10, 30
BCAST = "ff:ff:ff:ff:ff:ff"


# --- steps and cases ------------------------------------------------------------------

@dataclass
class Send:
    """An earlier packet; `action`, when given, is asserted (the case's premise)."""
    pkt: object
    port: str = "p1"
    action: Optional[int] = None


@dataclass
class Sync:
    """A state change between packets (no flush: existing flows stay)."""
    state: dict
    addrs: Optional[dict] = None


@dataclass
class Evict:
    """A flow entry removed between packets (as an eviction or a failed insert leaves it)."""
    tenant: int
    proto: int
    src: str
    sport: int
    dst: str
    dport: int


@dataclass
class Case:
    desc: str
    state: dict
    pkt: object
    action: int
    counters: Dict[Tuple[str, str, str], int]     # (port, verdict, reason) -> packets
    port: str = "p1"
    out: Optional[bytes] = None                    # None: the input, untouched
    pre: Sequence[Union[Send, Sync, Evict]] = ()
    addrs: Optional[dict] = None
    out_port: Optional[str] = None                 # redirect target (trace out_ifindex)
    rule: Optional[int] = None                     # rule that decided (or made the flow)
    check: Optional[Callable] = None               # check(bench, out) after the run

    @property
    def input(self) -> bytes:
        return raw(self.pkt)

    @property
    def expected(self) -> bytes:
        return self.input if self.out is None else self.out

    def counter_rows(self) -> Dict[Tuple[int, str, str], Tuple[int, int]]:
        rows = {}
        for (port, verdict, reason), n in self.counters.items():
            slot = 0 if port == "-" else SLOT[port]
            rows[(slot, verdict, reason)] = (n, 0 if verdict == "none" else n * len(self.input))
        return rows

    def main_row(self) -> Tuple[str, str, str]:
        rows = [k for k in self.counters if k[1] != "none"]
        assert len(rows) == 1, f"{self.desc}: one packet row expected, table has {rows}"
        return rows[0]


# --- states -----------------------------------------------------------------------------

def ep(tenant, ip, port, mac=None):
    return {"tenant": tenant, "ip": ip, "port": port, "mac": mac or VM_MAC[port]}


def rule(id, action="allow", priority=100, tenant="blue", **match):
    return dict(id=id, tenant=tenant, priority=priority, action=action, **match)


def blue(rules=(), default="drop", routes=(), endpoints=(), ports=(), opts=None):
    """Tenant blue (id 10): VMs 10.0.0.1 / fd00::1 behind p1, 10.0.0.2 / fd00::2 behind p2.
    opts: port name -> its other fields (allow, port_security, allow_vlan)."""
    opts = opts or {}
    return {
        "tenants": [{"name": "blue", "id": BLUE, "default": default}],
        "ports": [{"name": p, "tenant": "blue", **opts.get(p, {})}
                  for p in ("p1", "p2") + tuple(ports)],
        "endpoints": [ep("blue", "10.0.0.1", "p1"), ep("blue", "10.0.0.2", "p2"),
                      ep("blue", "fd00::1", "p1"), ep("blue", "fd00::2", "p2")] + list(endpoints),
        "routes": list(routes),
        "rules": list(rules),
    }


ALLOW_ALL = blue([rule(1, priority=10)])
# Ports that take VLAN tags (an access port drops tagged frames, reason vlan).
TAGS = {"p1": {"allow_vlan": True}, "p2": {"allow_vlan": True}}
ALLOW_ALL_TAGS = blue([rule(1, priority=10)], opts=TAGS)
PASS_DEFAULT = blue([], default="pass")
PASS_DEFAULT_TAGS = blue([], default="pass", opts=TAGS)
NO_RULES = blue([])
LOCAL_ADDRS = {"p1": ("10.0.0.254", "fd00::fe")}

# Tenants blue (p1, p2) and red (p3, p4) with the same addresses and VM MACs: red's VMs
# send with the MACs of blue's (RED_MAC).
SHADOW_MAC = "02:00:00:00:00:07"
RED_MAC = {"p3": VM_MAC["p1"], "p4": VM_MAC["p2"]}
TWO_TENANTS = {
    "tenants": [{"name": "blue", "id": BLUE}, {"name": "red", "id": RED}],
    "ports": [{"name": "p1", "tenant": "blue"}, {"name": "p2", "tenant": "blue"},
              {"name": "p3", "tenant": "red"}, {"name": "p4", "tenant": "red"}],
    "endpoints": [ep("blue", "10.0.0.1", "p1"), ep("blue", "10.0.0.2", "p2"),
                  ep("blue", "10.0.0.7", "p2", SHADOW_MAC),
                  ep("red", "10.0.0.1", "p3", VM_MAC["p1"]),
                  ep("red", "10.0.0.2", "p4", VM_MAC["p2"])],
    "rules": [rule(1, priority=10),
              rule(2, tenant="red", proto="tcp", dport=80),
              rule(3, tenant="red", action="deny", priority=20, proto="udp")],
}
# The same, after a change of blue's rules only.
TWO_TENANTS_BLUE_CHANGED = dict(TWO_TENANTS, rules=TWO_TENANTS["rules"] + [
    rule(4, priority=50, proto="tcp", dport=443)])

ROUTES = blue([rule(1, priority=10)], routes=[
    {"tenant": "blue", "prefix": "10.1.0.0/16", "via": "10.0.0.2"},
    {"tenant": "blue", "prefix": "10.1.5.0/24", "action": "drop"},
    {"tenant": "blue", "prefix": "10.2.0.0/16", "action": "kernel"},
    {"tenant": "blue", "prefix": "10.3.0.0/16", "action": "drop"},
    {"tenant": "blue", "prefix": "fd01::/64", "via": "fd00::2"},
])

ARP_STATE = blue([rule(1, priority=10)],
                 endpoints=[ep("blue", "10.0.0.3", "p1", "02:00:00:00:00:03")],
                 routes=[{"tenant": "blue", "prefix": "10.1.0.0/16", "via": "10.0.0.2"}])
ARP_STATE_TAGS = dict(ARP_STATE, ports=blue(opts=TAGS)["ports"])

FRAGS = blue([rule(1, proto="udp", dport=5000),
              rule(2, action="deny", priority=50, proto="udp", dport=6000)])

GEN1 = blue([rule(1, proto="udp", dport=5000)])
GEN1_PLUS = blue([rule(1, proto="udp", dport=5000), rule(9, proto="tcp", dport=443)])
GEN2_DENY = blue([rule(2, action="deny", proto="udp", dport=5000)])


# --- packets ----------------------------------------------------------------------------

def eth(port="p1", dst=None, src=None):
    return Ether(src=src or RED_MAC.get(port) or VM_MAC[port], dst=dst or PORT_MAC[port])


def v4(src="10.0.0.1", dst="10.0.0.2", ttl=64, **kw):
    return IP(src=src, dst=dst, ttl=ttl, id=kw.pop("id", 1), **kw)


def v6(src="fd00::1", dst="fd00::2", hlim=64, **kw):
    return IPv6(src=src, dst=dst, hlim=hlim, **kw)


def udp4(sport=4000, dport=5000, port="p1", src="10.0.0.1", dst="10.0.0.2", payload=b"x" * 18,
         **ipkw):
    return eth(port) / v4(src, dst, **ipkw) / UDP(sport=sport, dport=dport) / payload


def tcp4(sport=4000, dport=80, port="p1", src="10.0.0.1", dst="10.0.0.2", flags="S", **ipkw):
    return eth(port) / v4(src, dst, **ipkw) / TCP(sport=sport, dport=dport, flags=flags, seq=1)


def udp6(sport=4000, dport=5000, port="p1", src="fd00::1", dst="fd00::2", payload=b"y" * 8,
         **ipkw):
    return eth(port) / v6(src, dst, **ipkw) / UDP(sport=sport, dport=dport) / payload


def routed(pkt, out_port, dmac=None) -> bytes:
    """What a redirect makes of a packet: MACs (endpoint, output port), TTL or hop limit
    one less, IPv4 header checksum recomputed; the rest (tags, options) as it was."""
    data = raw(pkt)
    p = Ether(data)
    assert raw(p) == data, "scapy does not rebuild this packet byte for byte"
    p.dst = dmac or VM_MAC[out_port]
    p.src = PORT_MAC[out_port]
    if IP in p:
        p[IP].ttl -= 1
        del p[IP].chksum
    else:
        p[IPv6].hlim -= 1
    return raw(p)


def arp_req(spa, tpa, port="p1", op=1, sha=None):
    sha = sha or RED_MAC.get(port) or VM_MAC[port]
    return Ether(src=sha, dst=BCAST) / ARP(op=op, hwsrc=sha, psrc=spa, pdst=tpa)


def arp_answer(spa, tpa, port="p1", asker=None) -> bytes:
    asker = asker or RED_MAC.get(port) or VM_MAC[port]
    return raw(Ether(dst=asker, src=PORT_MAC[port]) /
               ARP(op=2, hwsrc=PORT_MAC[port], psrc=tpa, hwdst=asker, pdst=spa))


def solicit(target, src="fd00::1", port="p1", hlim=255, sll=True, vlan=None):
    low = IPv6Address(target).packed[-3:]
    snm = "ff02::1:ff%02x:%02x%02x" % tuple(low)
    pkt = Ether(src=VM_MAC[port], dst="33:33:ff:%02x:%02x:%02x" % tuple(low))
    if vlan is not None:
        pkt = pkt / Dot1Q(vlan=vlan)
    pkt = pkt / IPv6(src=src, dst=snm, hlim=hlim) / ICMPv6ND_NS(tgt=target)
    if sll:
        pkt = pkt / ICMPv6NDOptSrcLLAddr(lladdr=VM_MAC[port])
    return pkt


def advert(target, solicitor="fd00::1", port="p1", vlan=None) -> bytes:
    head = Ether(dst=VM_MAC[port], src=PORT_MAC[port])
    if vlan is not None:
        head = head / Dot1Q(vlan=vlan)
    return raw(head / IPv6(src=target, dst=solicitor, hlim=255) /
               ICMPv6ND_NA(R=1, S=1, O=1, tgt=target) /
               ICMPv6NDOptDstLLAddr(lladdr=PORT_MAC[port]))


def check_advert(target, solicitor="fd00::1", port="p1", vlan=None):
    def check(bench, out):
        p = Ether(out)
        assert ICMPv6ND_NA in p, p.summary()
        ip6, na = p[IPv6], p[ICMPv6ND_NA]
        assert (p.dst, p.src) == (VM_MAC[port], PORT_MAC[port])
        assert (ip6.src, ip6.dst, ip6.hlim, ip6.plen, ip6.nh) == (target, solicitor, 255, 32, 58)
        assert (na.R, na.S, na.O, na.tgt) == (1, 1, 1, target)
        assert ICMPv6NDOptDstLLAddr in p and p[ICMPv6NDOptDstLLAddr].lladdr == PORT_MAC[port]
        again = p.copy()
        del again[ICMPv6ND_NA].cksum
        assert Ether(raw(again))[ICMPv6ND_NA].cksum == na.cksum, "ICMPv6 checksum is wrong"
        if vlan is not None:
            assert p[Dot1Q].vlan == vlan
        want = 14 + (4 if vlan is not None else 0) + 40 + 32
        assert len(out) == want, f"frame of {len(out)} bytes, this NA is {want}"
    return check


def frags4(dport=5000, ident=0x1234, port="p1"):
    full = v4(id=ident) / UDP(sport=4000, dport=dport) / (b"A" * 64)
    return [eth(port) / f for f in fragment(full, fragsize=32)]


def frags6(dport=5000, ident=0xabcd, port="p1"):
    body = raw(IPv6(src="fd00::1", dst="fd00::2") / UDP(sport=4000, dport=dport) /
               (b"B" * 64))[40:]
    first = eth(port) / v6(nh=44) / IPv6ExtHdrFragment(nh=17, offset=0, m=1, id=ident) / \
        Raw(body[:32])
    later = eth(port) / v6(nh=44) / IPv6ExtHdrFragment(nh=17, offset=4, m=0, id=ident) / \
        Raw(body[32:])
    return first, later


# --- case builders ----------------------------------------------------------------------

def fwd(desc, state, pkt, out_port="p2", reason="rule_allow", port="p1", rule=1, dmac=None,
        **kw):
    """A case that ends in a redirect to out_port."""
    counters = kw.pop("counters", {})
    counters = {(port, "redirect", reason): 1, **counters}
    return Case(desc, state, pkt, XDP_REDIRECT, counters, port=port,
                out=routed(pkt, out_port, dmac), out_port=out_port, rule=rule, **kw)


def stays(desc, state, pkt, verdict, reason, port="p1", rule=None, **kw):
    """A case whose packet is dropped or passed (or sent back) untouched."""
    counters = kw.pop("counters", {})
    counters = {(port, verdict, reason): 1, **counters}
    return Case(desc, state, pkt, ACTION_OF[verdict], counters, port=port, rule=rule, **kw)


def flow_check(tenant, proto, src, sport, dst, dport, packets=None, nbytes=None,
               flags=None, flags_clear=0, tcp_flags=None):
    def check(bench, out):
        f = bench.flow(tenant, proto, src, sport, dst, dport)
        assert f is not None, f"no flow {src}:{sport} -> {dst}:{dport}"
        if packets is not None:
            assert f.packets == packets
        if nbytes is not None:
            assert f.bytes == nbytes
        if flags is not None:
            assert f.flags & flags == flags, f"flow flags {f.flags:#x}"
        assert not f.flags & flags_clear, f"flow flags {f.flags:#x}"
        if tcp_flags is not None:
            assert f.tcp_flags & tcp_flags == tcp_flags
        assert f.generation == bench.dp.generation(tenant)
    return check


def no_flow(tenant, proto, src, sport, dst, dport):
    def check(bench, out):
        assert bench.flow(tenant, proto, src, sport, dst, dport) is None
    return check


def all_of(*checks):
    def check(bench, out):
        for c in checks:
            c(bench, out)
    return check


# --- the table ---------------------------------------------------------------------------

def build() -> List[Case]:
    C: List[Case] = []
    A = ALLOW_ALL

    # Parse paths, all allowed by rule 1 and redirected to 10.0.0.2 / fd00::2 behind p2.
    C += [
        fwd("ipv4 tcp", A, tcp4()),
        fwd("ipv4 udp", A, udp4(),
            check=flow_check(BLUE, 17, "10.0.0.1", 4000, "10.0.0.2", 5000, packets=1,
                             nbytes=len(udp4()), flags_clear=abi.FLOW_REVERSE)),
        fwd("ipv4 icmp echo request", A, eth() / v4() / ICMP(type=8, id=77, seq=1) / b"ping"),
        fwd("ipv4 with options (ihl 9)", A,
            eth() / v4(options=[IPOption_RR(routers=["0.0.0.0"] * 3)]) /
            UDP(sport=4000, dport=5000) / b"opts"),
        fwd("one 802.1q tag kept on redirect", ALLOW_ALL_TAGS,
            eth() / Dot1Q(vlan=100) / v4() / UDP(sport=4000, dport=5000) / b"tag1"),
        fwd("802.1ad outer and 802.1q inner tags kept on redirect", ALLOW_ALL_TAGS,
            eth() / Dot1AD(vlan=200) / Dot1Q(vlan=100) / v4() / UDP(sport=4000, dport=5000) /
            b"tag2"),
        stays("three vlan tags", ALLOW_ALL_TAGS,
              eth() / Dot1AD(vlan=3) / Dot1Q(vlan=2) / Dot1Q(vlan=1) / v4() / UDP() / b"t3",
              "drop", "parse_vlan"),
        stays("three vlan tags in a pass-default tenant", PASS_DEFAULT_TAGS,
              eth() / Dot1AD(vlan=3) / Dot1Q(vlan=2) / Dot1Q(vlan=1) / v4() / UDP() / b"t3",
              "pass", "parse_vlan"),
        fwd("ipv6 tcp", A, eth() / v6() / TCP(sport=4000, dport=80, flags="S")),
        fwd("ipv6 udp", A, udp6()),
        fwd("ipv6 icmpv6 echo request", A, eth() / v6() / ICMPv6EchoRequest(id=9, seq=1)),
        fwd("ipv6 hop-by-hop, destination options and routing headers", A,
            eth() / v6() / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / IPv6ExtHdrRouting() /
            UDP(sport=4000, dport=5000) / b"ext3"),
        fwd("ipv6 authentication header", A,
            eth() / v6(nh=51) / Raw(bytes([17, 4, 0, 0]) + b"\0\0\1\0" + b"\0\0\0\1" +
                                    b"\xaa" * 12) /
            Raw(raw(UDP(sport=4000, dport=5000, chksum=0) / b"ah"))),
        fwd("ipv6 six extension headers (the limit)", A,
            eth() / v6() / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / IPv6ExtHdrRouting() /
            IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() /
            UDP(sport=4000, dport=5000) / b"ext6"),
        stays("ipv6 seven extension headers", A,
              eth() / v6() / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / IPv6ExtHdrRouting() /
              IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() /
              IPv6ExtHdrDestOpt() / UDP(sport=4000, dport=5000) / b"ext7",
              "drop", "parse_ext"),
    ]

    padded = eth() / v4() / UDP(sport=4000, dport=5000) / b"p" / Padding(b"\0" * 17)
    assert len(padded) == 60
    C += [
        fwd("60-byte frame with ethernet padding keeps its padding", A, padded),
        fwd("to an endpoint behind the ingress port (hairpin)", ARP_STATE,
            udp4(dst="10.0.0.3"), out_port="p1", dmac="02:00:00:00:00:03"),
    ]

    # Fragments: the first carries the ports, later ones take them from the fragment table.
    f4, f4d, f6 = frags4(), frags4(dport=6000, ident=0x4321), frags6()
    C += [
        fwd("ipv4 first fragment", FRAGS, f4[0]),
        fwd("ipv4 later fragment follows its first fragment's flow", FRAGS, f4[1],
            reason="flow", pre=[Send(f4[0], action=XDP_REDIRECT)]),
        fwd("ipv4 last fragment follows its first fragment's flow", FRAGS, f4[2],
            reason="flow", pre=[Send(f4[0], action=XDP_REDIRECT),
                                Send(f4[1], action=XDP_REDIRECT)]),
        stays("ipv4 later fragment without its first", FRAGS, f4[1], "drop", "frag"),
        stays("ipv4 later fragment of a denied datagram is denied", FRAGS, f4d[1],
              "drop", "rule_deny", rule=2, pre=[Send(f4d[0], action=XDP_DROP)]),
        fwd("ipv6 first fragment", FRAGS, f6[0]),
        fwd("ipv6 later fragment follows its first fragment's flow", FRAGS, f6[1],
            reason="flow", pre=[Send(f6[0], action=XDP_REDIRECT)]),
        stays("ipv6 later fragment without its first", FRAGS, f6[1], "drop", "frag"),
    ]

    # Rules.
    udp = {"proto": "udp", "dport": 5000}
    C += [
        stays("priority: deny 200 beats allow 100", blue([
            rule(1, **udp), rule(2, "deny", 200, proto="udp", dst="10.0.0.2/32")]),
            udp4(), "drop", "rule_deny", rule=2,
            check=no_flow(BLUE, 17, "10.0.0.1", 4000, "10.0.0.2", 5000)),
        fwd("priority: allow 200 beats deny 100", blue([
            rule(1, priority=200, **udp), rule(2, "deny", 100, proto="udp", dst="10.0.0.2/32")]),
            udp4()),
        fwd("equal priority: lower id (allow 5) wins", blue([
            rule(5, **udp), rule(7, "deny", dst="10.0.0.2/32")]), udp4(), rule=5),
        stays("equal priority: lower id (deny 5) wins", blue([
            rule(7, **udp), rule(5, "deny", dst="10.0.0.2/32")]), udp4(), "drop", "rule_deny",
            rule=5),
    ]
    pfx = blue([rule(3, priority=150, src="10.0.0.1/32"),
                rule(4, "deny", 100, src="10.0.0.0/16"),
                rule(5, priority=50, src="10.0.0.0/8")],
               opts={"p1": {"allow": ["10.0.0.0/8"]}})    # sources beyond p1's endpoint
    C += [
        fwd("prefixes: /32 allow at 150 over /16 deny", pfx, udp4(), rule=3),
        stays("prefixes: /16 deny at 100 over /8 allow", pfx, udp4(src="10.0.0.5"),
              "drop", "rule_deny", rule=4),
        fwd("prefixes: /8 allow where only it matches", pfx, udp4(src="10.9.0.1"), rule=5),
        stays("ipv6 prefix rule does not match ipv4", blue([rule(1, src="fd00::/64")]),
              udp4(), "drop", "default"),
        fwd("ipv6 prefix rule matches ipv6", blue([rule(1, src="fd00::/64")]), udp6()),
    ]
    rng = blue([rule(1, proto="udp", dport="1000-1999")])
    C += [fwd(f"dport range 1000-1999: {d} inside", rng, udp4(dport=d)) for d in (1000, 1500, 1999)]
    C += [stays(f"dport range 1000-1999: {d} outside", rng, udp4(dport=d), "drop", "default")
          for d in (999, 2000)]
    srng = blue([rule(1, proto="tcp", sport="30000-30009")])
    C += [
        fwd("sport range: 30009 inside", srng, tcp4(sport=30009)),
        stays("sport range: 30010 outside", srng, tcp4(sport=30010), "drop", "default"),
    ]
    proto = blue([rule(1, priority=100), rule(2, "deny", 200, proto="udp")])
    C += [
        fwd("protocol any allows tcp", proto, tcp4()),
        stays("protocol udp deny beats any", proto, udp4(), "drop", "rule_deny", rule=2),
    ]
    icmp = blue([rule(1, proto="icmp", icmp_type=8), rule(2, proto="icmpv6", icmp_type=128)])
    C += [
        fwd("icmp type 8 matches echo request", icmp, eth() / v4() / ICMP(type=8, id=5)),
        stays("icmp type 8 does not match timestamp", icmp, eth() / v4() / ICMP(type=13),
              "drop", "default"),
        fwd("icmpv6 type 128 matches echo request", icmp,
            eth() / v6() / ICMPv6EchoRequest(id=6), rule=2),
    ]
    inport = blue([rule(1, in_port="p1")])
    C += [
        fwd("in_port p1 matches on p1", inport, udp4()),
        stays("in_port p1 does not match on p2", inport,
              udp4(port="p2", src="10.0.0.2", dst="10.0.0.1"), "drop", "default", port="p2"),
    ]
    pas = blue([rule(1, "pass", proto="tcp", dport=22)])
    C += [
        stays("pass action", pas, tcp4(dport=22), "pass", "rule_pass", rule=1),
        stays("pass action, second packet from the flow", pas, tcp4(dport=22), "pass", "flow",
              rule=1, pre=[Send(tcp4(dport=22), action=XDP_PASS)]),
        stays("no rule: drop-default tenant", NO_RULES, udp4(), "drop", "default"),
        stays("no rule: pass-default tenant", PASS_DEFAULT, udp4(), "pass", "default"),
    ]

    # Proxy ARP.
    C += [
        stays("arp request for an endpoint behind another port", ARP_STATE,
              arp_req("10.0.0.1", "10.0.0.2"), "tx", "arp_reply",
              out=arp_answer("10.0.0.1", "10.0.0.2")),
        stays("arp request for a route-covered address", ARP_STATE,
              arp_req("10.0.0.1", "10.1.2.3"), "tx", "arp_reply",
              out=arp_answer("10.0.0.1", "10.1.2.3")),
        stays("arp request inside a vlan tag", ARP_STATE_TAGS,
              Ether(src=VM_MAC["p1"], dst=BCAST) / Dot1Q(vlan=5) /
              ARP(op=1, hwsrc=VM_MAC["p1"], psrc="10.0.0.1", pdst="10.0.0.2"), "tx", "arp_reply",
              out=raw(Ether(dst=VM_MAC["p1"], src=PORT_MAC["p1"]) / Dot1Q(vlan=5) /
                      ARP(op=2, hwsrc=PORT_MAC["p1"], psrc="10.0.0.2", hwdst=VM_MAC["p1"],
                          pdst="10.0.0.1"))),
        stays("arp request padded to 60 bytes", ARP_STATE,
              arp_req("10.0.0.1", "10.0.0.2") / Padding(b"\0" * 18), "tx", "arp_reply",
              out=arp_answer("10.0.0.1", "10.0.0.2") + b"\0" * 18),
        stays("arp for an address behind the asker's own port", ARP_STATE,
              arp_req("10.0.0.1", "10.0.0.3"), "drop", "arp_other"),
        stays("gratuitous arp", ARP_STATE, arp_req("10.0.0.1", "10.0.0.1"), "drop", "arp_other"),
        stays("arp probe (sender 0.0.0.0)", ARP_STATE, arp_req("0.0.0.0", "10.0.0.2"),
              "drop", "arp_other"),
        stays("arp for an unknown address", ARP_STATE, arp_req("10.0.0.1", "10.9.9.9"),
              "drop", "arp_other"),
        stays("arp for an unknown address, pass-default tenant", PASS_DEFAULT,
              arp_req("10.0.0.1", "10.9.9.9"), "pass", "arp_other"),
        stays("arp reply is not answered", ARP_STATE, arp_req("10.0.0.1", "10.0.0.2", op=2),
              "drop", "arp_other"),
    ]

    # IPv6 neighbour discovery.
    C += [
        stays("neighbour solicitation with source link-layer option", A, solicit("fd00::2"),
              "tx", "nd_reply", out=advert("fd00::2"), check=check_advert("fd00::2")),
        stays("neighbour solicitation without options", A, solicit("fd00::2", sll=False),
              "tx", "nd_reply", out=advert("fd00::2"), check=check_advert("fd00::2")),
        stays("neighbour solicitation for a route-covered address", ROUTES,
              solicit("fd01::9"), "tx", "nd_reply", out=advert("fd01::9"),
              check=check_advert("fd01::9")),
        stays("neighbour solicitation inside a vlan tag", ALLOW_ALL_TAGS,
              solicit("fd00::2", vlan=7),
              "tx", "nd_reply", out=advert("fd00::2", vlan=7),
              check=check_advert("fd00::2", vlan=7)),
        stays("neighbour solicitation behind an extension header", A,
              Ether(src=VM_MAC["p1"], dst="33:33:ff:00:00:02") /
              IPv6(src="fd00::1", dst="ff02::1:ff00:2", hlim=255) / IPv6ExtHdrDestOpt() /
              ICMPv6ND_NS(tgt="fd00::2"), "drop", "nd_other"),
        stays("duplicate address detection (source ::)", A, solicit("fd00::2", src="::", sll=False),
              "drop", "nd_other"),
        stays("neighbour solicitation for an unknown address", A, solicit("fd00::99"),
              "drop", "nd_other"),
        stays("neighbour solicitation with hop limit 64", A, solicit("fd00::2", hlim=64),
              "drop", "nd_other"),
        stays("router solicitation", A,
              eth(dst="33:33:00:00:00:02") / v6(dst="ff02::2", hlim=255) / ICMPv6ND_RS(),
              "drop", "nd_other"),
    ]

    # Two tenants, same addresses, ports' VMs with the same MACs.
    T = TWO_TENANTS
    blue_udp = udp4()
    blue_tcp22 = tcp4(dport=22)
    C += [
        fwd("tenant blue redirects to its own port", T, blue_udp, out_port="p2"),
        fwd("tenant red redirects to its own port", T, tcp4(port="p3"), out_port="p4",
            port="p3", dmac=VM_MAC["p2"], rule=2),
        stays("blue's flow is not red's: identical packet on red's port", T, blue_udp,
              "drop", "rule_deny", port="p3", rule=3,
              pre=[Send(blue_udp, action=XDP_REDIRECT)]),
        stays("blue's reverse flow is not red's reply", T,
              eth("p4") / v4("10.0.0.2", "10.0.0.1") / TCP(sport=22, dport=4000, flags="SA"),
              "drop", "default", port="p4", pre=[Send(blue_tcp22, action=XDP_REDIRECT)]),
        stays("blue's endpoint is not red's route", T,
              tcp4(port="p3", dst="10.0.0.7"), "drop", "no_route", port="p3", rule=2),
        stays("blue's endpoint is not answered to red's arp", T,
              arp_req("10.0.0.1", "10.0.0.7", port="p3"), "drop", "arp_other", port="p3"),
        stays("red's arp answered with red's port", T,
              arp_req("10.0.0.1", "10.0.0.2", port="p3"), "tx", "arp_reply", port="p3",
              out=arp_answer("10.0.0.1", "10.0.0.2", port="p3")),
        stays("blue's first fragment is not red's", T, frags4(dport=5000)[1], "drop", "frag",
              port="p3", pre=[Send(frags4(dport=5000)[0], action=XDP_REDIRECT)]),
        fwd("red's flow survives a change of blue's rules", T, tcp4(port="p3"), out_port="p4",
            port="p3", dmac=VM_MAC["p2"], reason="flow", rule=2,
            pre=[Send(tcp4(port="p3"), "p3", XDP_REDIRECT), Sync(TWO_TENANTS_BLUE_CHANGED)]),
    ]

    # Flow table: hit after miss; the cache never decides differently from the rules.
    C += [
        fwd("second packet hits the flow", A, udp4(), reason="flow",
            pre=[Send(udp4(), action=XDP_REDIRECT)],
            check=flow_check(BLUE, 17, "10.0.0.1", 4000, "10.0.0.2", 5000, packets=2,
                             nbytes=2 * len(udp4()))),
        stays("a flow allowed by an in_port rule is not used from another port",
              blue([rule(1, in_port="p1")], ports=("p5",),
                   opts={"p5": {"port_security": False}}), udp4(port="p5"),
              "drop", "default", port="p5", pre=[Send(udp4(), action=XDP_REDIRECT)]),
    ]

    # Generations: a rule change reaches existing flows at once.
    reply = udp4(5000, 4000, port="p2", src="10.0.0.2", dst="10.0.0.1")
    C += [
        stays("rule change to deny drops the next packet of an allowed flow", GEN1, udp4(),
              "drop", "rule_deny", rule=2,
              counters={("p1", "none", "flow_stale"): 1},
              pre=[Send(udp4(), action=XDP_REDIRECT), Sync(GEN2_DENY)]),
        fwd("rule change that still allows keeps the reply working", GEN1, reply,
            out_port="p1", port="p2", reason="rule_allow", rule=1,
            counters={("p2", "none", "flow_stale"): 1},
            pre=[Send(udp4(), action=XDP_REDIRECT), Sync(GEN1_PLUS)],
            check=all_of(
                flow_check(BLUE, 17, "10.0.0.2", 5000, "10.0.0.1", 4000, packets=1,
                           flags=abi.FLOW_REVERSE),
                flow_check(BLUE, 17, "10.0.0.1", 4000, "10.0.0.2", 5000,
                           flags_clear=abi.FLOW_REVERSE))),
        stays("rule change that denies the forward direction drops its reply", GEN1, reply,
              "drop", "default", port="p2",
              counters={("p2", "none", "flow_stale"): 1},
              pre=[Send(udp4(), action=XDP_REDIRECT), Sync(GEN2_DENY)]),
    ]

    moved = blue([rule(1, proto="udp", dport=5000)], ports=("p5",))
    moved["endpoints"] = [e for e in moved["endpoints"] if e["ip"] != "10.0.0.2"] + \
        [ep("blue", "10.0.0.2", "p5", "02:00:00:00:00:22")]
    inport1 = blue([rule(1, proto="udp", dport=5000, in_port="p1")])
    inport1_plus = blue([rule(1, proto="udp", dport=5000, in_port="p1"),
                         rule(9, proto="tcp", dport=443)])
    C += [
        fwd("an endpoint move reaches its existing flows", blue(
            [rule(1, proto="udp", dport=5000)], ports=("p5",)), udp4(), out_port="p5",
            dmac="02:00:00:00:00:22", counters={("p1", "none", "flow_stale"): 1},
            pre=[Send(udp4(), action=XDP_REDIRECT), Sync(moved)]),
        fwd("stale reply judged by its forward direction's in_port rule", inport1, reply,
            out_port="p1", port="p2", counters={("p2", "none", "flow_stale"): 1},
            pre=[Send(udp4(), action=XDP_REDIRECT), Sync(inport1_plus)]),
    ]

    # A stale reply whose forward direction is no longer *allowed* (here: now sent to the
    # kernel by a pass rule) is judged on its own, as the program's comment says.
    pass_fwd = blue([rule(1, proto="udp", dport=5000)], default="pass")
    pass_fwd2 = blue([rule(1, "pass", proto="udp", dport=5000)], default="pass")
    C += [
        stays("stale reply whose forward became a pass rule is judged on its own", pass_fwd,
              reply, "pass", "default", port="p2",
              counters={("p2", "none", "flow_stale"): 1},
              pre=[Send(udp4(), action=XDP_REDIRECT), Sync(pass_fwd2)]),
    ]

    # Stateful allow.
    C += [
        fwd("reply of an allowed flow", GEN1, reply, out_port="p1", port="p2", reason="flow",
            rule=1, pre=[Send(udp4(), action=XDP_REDIRECT)],
            check=all_of(
                flow_check(BLUE, 17, "10.0.0.2", 5000, "10.0.0.1", 4000, packets=1,
                           flags=abi.FLOW_REVERSE),
                flow_check(BLUE, 17, "10.0.0.1", 4000, "10.0.0.2", 5000, packets=1,
                           flags_clear=abi.FLOW_REVERSE))),
        stays("reply tuple without a forward flow", GEN1, reply, "drop", "default", port="p2"),
        stays("unsolicited from the other side on another port", GEN1,
              udp4(5001, 4000, port="p2", src="10.0.0.2", dst="10.0.0.1"), "drop", "default",
              port="p2", pre=[Send(udp4(), action=XDP_REDIRECT)]),
        fwd("icmp echo reply of an allowed echo request", icmp,
            eth("p2") / v4("10.0.0.2", "10.0.0.1") / ICMP(type=0, id=5), out_port="p1",
            port="p2", reason="flow", pre=[Send(eth() / v4() / ICMP(type=8, id=5),
                                                action=XDP_REDIRECT)]),
        stays("icmp echo reply with another id", icmp,
              eth("p2") / v4("10.0.0.2", "10.0.0.1") / ICMP(type=0, id=6), "drop", "default",
              port="p2", pre=[Send(eth() / v4() / ICMP(type=8, id=5), action=XDP_REDIRECT)]),
        fwd("tcp syn-ack of an allowed syn", blue([rule(1, proto="tcp", dport=22)]),
            tcp4(22, 4000, port="p2", src="10.0.0.2", dst="10.0.0.1", flags="SA"),
            out_port="p1", port="p2", reason="flow",
            pre=[Send(tcp4(dport=22), action=XDP_REDIRECT)]),
        fwd("tcp fin marks the flow closing", blue([rule(1, proto="tcp", dport=22)]),
            tcp4(dport=22, flags="FA"), reason="flow",
            pre=[Send(tcp4(dport=22), action=XDP_REDIRECT)],
            check=flow_check(BLUE, 6, "10.0.0.1", 4000, "10.0.0.2", 22, packets=2,
                             flags=abi.FLOW_CLOSING, tcp_flags=0x03)),
    ]

    # Related: an ICMP error about a flow in the table follows the flow's replies back to
    # its sender whatever the rules say about ICMP (GEN1 allows only udp/5000).
    unreach = (eth("p2") / v4("10.0.0.2", "10.0.0.1") / ICMP(type=3, code=3) /
               IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=4000, dport=5000))
    v6_udp = blue([rule(1, proto="udp", dport=5000, dst="fd00::/64")])
    too_big = (eth("p2") / v6("fd00::2", "fd00::1") / ICMPv6PacketTooBig(mtu=1280) /
               IPv6(src="fd00::1", dst="fd00::2") / UDP(sport=4000, dport=5000))
    C += [
        fwd("icmp port unreachable about an allowed udp flow goes to its sender", GEN1,
            unreach, out_port="p1", port="p2", reason="related", rule=1,
            pre=[Send(udp4(), action=XDP_REDIRECT)],
            check=no_flow(BLUE, 1, "10.0.0.2", 0, "10.0.0.1", 3 << 8 | 3)),
        stays("icmp port unreachable about no flow is judged as icmp", GEN1, unreach,
              "drop", "default", port="p2"),
        stays("icmp error about a flow, sent by the flow's own sender", GEN1,
              eth() / v4() / ICMP(type=3, code=3) / IP(src="10.0.0.1", dst="10.0.0.2") /
              UDP(sport=4000, dport=5000), "drop", "default",
              pre=[Send(udp4(), action=XDP_REDIRECT)]),
        fwd("icmpv6 packet too big about an allowed udp flow goes to its sender", v6_udp,
            too_big, out_port="p1", port="p2", reason="related", rule=1,
            pre=[Send(udp6(), action=XDP_REDIRECT)]),
    ]

    # Malformed: the tenant's default, the parse reason, the bytes untouched.
    short_udp = eth() / v4() / UDP(sport=4000, dport=5000, len=200) / b"short"
    C += [
        stays("ipv4 ihl 4", A, eth() / IP(src="10.0.0.1", dst="10.0.0.2", ihl=4) / (b"x" * 20),
              "drop", "parse_ipv4"),
        stays("ipv4 version 6 under ethertype ipv4", A,
              eth() / IP(src="10.0.0.1", dst="10.0.0.2", version=6) / UDP(),
              "drop", "parse_ipv4"),
        stays("ipv4 protocol udp without a udp header", A,
              eth() / IP(src="10.0.0.1", dst="10.0.0.2", proto=17), "drop", "parse_l4"),
        stays("ipv4 total length beyond the packet", A,
              eth() / IP(src="10.0.0.1", dst="10.0.0.2", len=200) / UDP() / b"x",
              "drop", "parse_ipv4"),
        stays("ipv4 total length shorter than its header", A,
              eth() / IP(src="10.0.0.1", dst="10.0.0.2", len=16) / UDP() / b"x",
              "drop", "parse_ipv4"),
        stays("ipv6 payload length beyond the packet", A,
              eth() / IPv6(src="fd00::1", dst="fd00::2", plen=200) / UDP() / b"x",
              "drop", "parse_ipv6"),
        stays("ipv6 payload length 0", A,
              eth() / IPv6(src="fd00::1", dst="fd00::2", plen=0) / UDP() / b"x",
              "drop", "parse_ipv6"),
        stays("ipv6 header truncated", A, Ether(src=VM_MAC["p1"], dst=PORT_MAC["p1"],
              type=0x86dd) / raw(v6())[:30], "drop", "parse_ipv6"),
        stays("ipv6 extension header longer than the payload", A,
              eth() / IPv6(src="fd00::1", dst="fd00::2", nh=60) /
              Raw(bytes([17, 10]) + b"\1\4" + b"\0" * 12) / UDP(sport=1, dport=2),
              "drop", "parse_ext"),
        stays("ipv6 extension header truncated", A,
              eth() / IPv6(src="fd00::1", dst="fd00::2", nh=60, plen=4) / b"\x11\x00\x00\x00",
              "drop", "parse_ext"),
        stays("tcp doff 4", A, eth() / v4() / TCP(sport=1, dport=80, dataofs=4),
              "drop", "parse_l4"),
        stays("tcp doff beyond the packet", A, eth() / v4() / TCP(sport=1, dport=80, dataofs=15),
              "drop", "parse_l4"),
        stays("udp length beyond the packet", A, short_udp, "drop", "parse_l4"),
        stays("udp length below 8", A, eth() / v4() / UDP(sport=4000, dport=5000, len=4) / b"z",
              "drop", "parse_l4"),
        stays("icmp header truncated", A, eth() / v4(proto=1) / b"\x08\x00\x00\x00",
              "drop", "parse_l4"),
        stays("ipv6 tcp header truncated", A, eth() / v6(nh=6) / (b"\x00" * 10),
              "drop", "parse_l4"),
        stays("14-byte frame of ethertype ipv4", A, Ether(src=VM_MAC["p1"],
              dst=PORT_MAC["p1"], type=0x0800), "drop", "parse_ipv4"),
        stays("14-byte frame of ethertype ipv6", A, Ether(src=VM_MAC["p1"],
              dst=PORT_MAC["p1"], type=0x86dd), "drop", "parse_ipv6"),
        stays("vlan tag truncated", ALLOW_ALL_TAGS, Ether(src=VM_MAC["p1"], dst=PORT_MAC["p1"],
              type=0x8100) / b"\x00\x05", "drop", "parse_vlan"),
        stays("malformed in a pass-default tenant", PASS_DEFAULT,
              eth() / IP(src="10.0.0.1", dst="10.0.0.2", ihl=4) / (b"x" * 20),
              "pass", "parse_ipv4"),
        stays("udp length beyond the packet in a pass-default tenant", PASS_DEFAULT,
              short_udp, "pass", "parse_l4"),
    ]

    # To the kernel, or not ours to forward.
    C += [
        stays("ttl 1", A, udp4(ttl=1), "pass", "ttl"),
        stays("hop limit 1", A, udp6(hlim=1), "pass", "ttl"),
        stays("to an address of the node", A, udp4(dst="10.0.0.254"), "pass", "local",
              addrs=LOCAL_ADDRS),
        stays("to an ipv6 address of the node", A, udp6(dst="fd00::fe"), "pass", "local",
              addrs=LOCAL_ADDRS),
        stays("to an address of the node, denied by no rule", NO_RULES, udp4(dst="10.0.0.254"),
              "drop", "default", addrs=LOCAL_ADDRS,
              check=no_flow(BLUE, 17, "10.0.0.1", 4000, "10.0.0.254", 5000)),
        stays("limited broadcast", A, udp4(dst="255.255.255.255"), "drop", "multicast"),
        stays("ipv4 multicast", A, udp4(dst="224.0.0.5"), "drop", "multicast"),
        stays("ipv6 multicast", A, udp6(dst="ff02::1"), "drop", "multicast"),
        stays("multicast in a pass-default tenant", PASS_DEFAULT, udp4(dst="239.1.1.1"),
              "pass", "multicast"),
        stays("lldp (not ip)", A, Ether(src=VM_MAC["p1"], dst="01:80:c2:00:00:0e",
                                        type=0x88cc) / (b"\x02\x07" + b"\x00" * 40),
              "drop", "not_ip"),
        # Counted under slot 0: the interface has no slot.
        Case("unknown ingress port", A, udp4(port="p6"), XDP_PASS,
             {("-", "pass", "no_port"): 1}, port="p6"),
    ]

    # Routes.
    R = ROUTES
    C += [
        fwd("route via an endpoint", R, udp4(dst="10.1.2.3")),
        fwd("ipv6 route via an endpoint", R, udp6(dst="fd01::5")),
        stays("longer drop route inside a via route", R, udp4(dst="10.1.5.1"),
              "drop", "route_drop", rule=1),
        stays("kernel route", R, udp4(dst="10.2.0.1"), "pass", "route_kernel", rule=1),
        stays("drop route", R, udp4(dst="10.3.0.1"), "drop", "route_drop", rule=1),
        stays("allowed, no route", R, udp4(dst="10.9.9.9"), "drop", "no_route", rule=1,
              check=no_flow(BLUE, 17, "10.0.0.1", 4000, "10.9.9.9", 5000)),
    ]

    C += boundary_cases()
    return C


# --- issue 7: the tenant boundary -------------------------------------------------------

SPOOF_MAC = "02:00:00:00:00:99"
# Blue allows UDP 5000; red allows TCP 80 and denies the rest of TCP (the issue's node).
ISSUE7 = dict(TWO_TENANTS, rules=[rule(1, proto="udp", dport=5000),
                                  rule(2, tenant="red", proto="tcp", dport=80),
                                  rule(3, tenant="red", action="deny", priority=50,
                                       proto="tcp")])
ALLOWED_PAIRS = blue([rule(1, priority=10)], opts={"p1": {"allow": ["10.0.0.64/26"]}})
NO_SECURITY = blue([rule(1, priority=10)], opts={"p1": {"port_security": False}})
LOCAL_RULES = blue([rule(1, proto="udp", dport=5000),
                    rule(2, "deny", 200, dst="10.0.0.254/32", proto="tcp")])
# GEN1 with a port p5 that has no port security (a VM that may send from anywhere).
P5_OPEN = {"p5": {"port_security": False}}
GEN1_P5 = blue([rule(1, proto="udp", dport=5000)], ports=("p5",), opts=P5_OPEN)
GEN1_PLUS_P5 = blue([rule(1, proto="udp", dport=5000), rule(9, proto="tcp", dport=443)],
                    ports=("p5",), opts=P5_OPEN)


def frags6_behind_options(dport=5000, ident=0xbeef, port="p1"):
    """An IPv6 datagram whose fragmentable part starts with a destination options header:
    the fragment headers of all its fragments name it (60), not UDP."""
    body = raw(Ether() / IPv6(src="fd00::1", dst="fd00::2") /
               IPv6ExtHdrDestOpt(nh=17) / UDP(sport=4000, dport=dport) / (b"C" * 64))[54:]
    first = eth(port) / v6(nh=44) / IPv6ExtHdrFragment(nh=60, offset=0, m=1, id=ident) / \
        Raw(body[:40])
    later = eth(port) / v6(nh=44) / IPv6ExtHdrFragment(nh=60, offset=5, m=0, id=ident) / \
        Raw(body[40:])
    return first, later


def boundary_cases() -> List[Case]:
    C: List[Case] = []
    G = GEN1
    # Port security: the source MAC and address must be an endpoint's of the port.
    C += [
        stays("spoof: another vm's address as source", ISSUE7, udp4(src="10.0.0.2"),
              "drop", "spoof"),
        stays("spoof: an address of another port as source (10.0.0.7)", ISSUE7,
              udp4(src="10.0.0.7"), "drop", "spoof"),
        stays("spoof: the vm's address with another mac", G,
              Ether(src=SPOOF_MAC, dst=PORT_MAC["p1"]) / v4() / UDP(sport=4000, dport=5000),
              "drop", "spoof"),
        stays("spoof: a flow's packet with another mac is judged again", G,
              Ether(src=SPOOF_MAC, dst=PORT_MAC["p1"]) / v4() / UDP(sport=4000, dport=5000) /
              (b"x" * 18), "drop", "spoof", pre=[Send(udp4(), action=XDP_REDIRECT)],
              check=flow_check(BLUE, 17, "10.0.0.1", 4000, "10.0.0.2", 5000, packets=1)),
        stays("spoof: ipv6 source of another vm", blue([rule(1, priority=10)]),
              udp6(src="fd00::2"), "drop", "spoof"),
        stays("spoof: multicast from another vm's address", PASS_DEFAULT,
              udp4(src="10.0.0.2", dst="224.0.0.5"), "drop", "spoof"),
        fwd("allowed prefix: a source in the port's allowed prefixes", ALLOWED_PAIRS,
            udp4(src="10.0.0.70")),
        stays("allowed prefix: only with the mac of one of the port's endpoints",
              ALLOWED_PAIRS, Ether(src=SPOOF_MAC, dst=PORT_MAC["p1"]) /
              v4(src="10.0.0.70") / UDP(sport=4000, dport=5000), "drop", "spoof"),
        stays("allowed prefix: a source beyond it", ALLOWED_PAIRS, udp4(src="10.0.0.130"),
              "drop", "spoof"),
        stays("allowed prefix removed: its flows are judged again", ALLOWED_PAIRS,
              udp4(src="10.0.0.70"), "drop", "spoof",
              counters={("p1", "none", "flow_stale"): 1},
              pre=[Send(udp4(src="10.0.0.70"), action=XDP_REDIRECT), Sync(ALLOW_ALL)]),
        fwd("no port security: any source address and mac", NO_SECURITY,
            Ether(src=SPOOF_MAC, dst=PORT_MAC["p1"]) / v4(src="10.0.0.7") /
            UDP(sport=4000, dport=5000)),
        stays("spoof: arp with another vm's sender address", ARP_STATE,
              arp_req("10.0.0.2", "10.1.2.3"), "drop", "spoof"),
        stays("spoof: arp whose sender mac is not the frame's", ARP_STATE,
              Ether(src=VM_MAC["p1"], dst=BCAST) /
              ARP(op=1, hwsrc=SPOOF_MAC, psrc="10.0.0.1", pdst="10.0.0.2"), "drop", "spoof"),
        stays("spoof: gratuitous arp for another vm's address", ARP_STATE,
              arp_req("10.0.0.2", "10.0.0.2"), "drop", "spoof"),
        stays("spoof: neighbour solicitation from another vm's address", ALLOW_ALL,
              solicit("fd00::2", src="fd00::2"), "drop", "spoof"),
        stays("spoof: neighbour solicitation whose link-layer option is not the frame's",
              ALLOW_ALL, Ether(src=VM_MAC["p1"], dst="33:33:ff:00:00:02") /
              IPv6(src="fd00::1", dst="ff02::1:ff00:2", hlim=255) /
              ICMPv6ND_NS(tgt="fd00::2") / ICMPv6NDOptSrcLLAddr(lladdr=SPOOF_MAC),
              "drop", "spoof"),
        stays("spoof: neighbour advertisement for another vm's address", ALLOW_ALL,
              eth(dst="33:33:00:00:00:01") / v6(dst="ff02::1", hlim=255) /
              ICMPv6ND_NA(tgt="fd00::2", O=1) / ICMPv6NDOptDstLLAddr(lladdr=VM_MAC["p1"]),
              "drop", "spoof"),
        stays("neighbour solicitation from the vm's link-local address", ALLOW_ALL,
              solicit("fd00::2", src="fe80::1"), "tx", "nd_reply",
              out=advert("fd00::2", solicitor="fe80::1"),
              check=check_advert("fd00::2", solicitor="fe80::1")),
        stays("spoof: icmp error about a flow with a forged outer source", G,
              eth("p2") / v4("10.0.0.9", "10.0.0.1") / ICMP(type=3, code=3) /
              IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=4000, dport=5000),
              "drop", "spoof", port="p2", pre=[Send(udp4(), action=XDP_REDIRECT)]),
    ]
    # Policy before the TTL punt: only what the rules allow reaches the kernel.
    C += [
        stays("ttl 1 from red, tcp/22, red denies tcp", ISSUE7,
              tcp4(dport=22, port="p3", ttl=1), "drop", "rule_deny", port="p3", rule=3),
        stays("ttl 1 that no rule allows", NO_RULES, udp4(ttl=1), "drop", "default"),
        stays("ttl 1 to the node's address, no rule", NO_RULES,
              udp4(dst="10.0.0.254", ttl=1), "drop", "default", addrs=LOCAL_ADDRS),
        stays("ttl 1 allowed: to the kernel, not cached", G, udp4(ttl=1), "pass", "ttl",
              check=no_flow(BLUE, 17, "10.0.0.1", 4000, "10.0.0.2", 5000)),
        stays("ttl 1 of an allowed flow's later packet", G, udp4(ttl=1), "pass", "ttl",
              pre=[Send(udp4(), action=XDP_REDIRECT)],
              check=flow_check(BLUE, 17, "10.0.0.1", 4000, "10.0.0.2", 5000, packets=1)),
    ]
    # The node's own addresses: the rules first.
    C += [
        stays("to the node's address, allowed by a rule", LOCAL_RULES,
              udp4(dst="10.0.0.254"), "pass", "local", rule=1, addrs=LOCAL_ADDRS),
        stays("to the node's address, denied by a rule", LOCAL_RULES,
              tcp4(dst="10.0.0.254", dport=22), "drop", "rule_deny", rule=2,
              addrs=LOCAL_ADDRS,
              check=no_flow(BLUE, 6, "10.0.0.1", 4000, "10.0.0.254", 22)),
    ]
    # VLAN tags on access ports.
    C += [
        stays("802.1q tagged frame from an access port", ISSUE7,
              eth() / Dot1Q(vlan=100) / v4() / UDP(sport=4000, dport=5000) / b"tag",
              "drop", "vlan"),
        stays("802.1q tagged frame from an access port, pass-default tenant", PASS_DEFAULT,
              eth() / Dot1Q(vlan=100) / v4() / UDP(sport=4000, dport=5000) / b"tag",
              "drop", "vlan"),
        stays("three vlan tags from an access port", A_,
              eth() / Dot1AD(vlan=3) / Dot1Q(vlan=2) / Dot1Q(vlan=1) / v4() / UDP() / b"t3",
              "drop", "vlan"),
        stays("truncated vlan tag from an access port", A_,
              Ether(src=VM_MAC["p1"], dst=PORT_MAC["p1"], type=0x8100) / b"\x00\x05",
              "drop", "vlan"),
        stays("arp inside a vlan tag from an access port", ARP_STATE,
              Ether(src=VM_MAC["p1"], dst=BCAST) / Dot1Q(vlan=5) /
              ARP(op=1, hwsrc=VM_MAC["p1"], psrc="10.0.0.1", pdst="10.0.0.2"), "drop", "vlan"),
    ]
    # ICMP related: addressed to the flow's sender; no MTU below the minimum.
    C += [
        stays("icmp error about a flow, addressed to another than its sender", G,
              eth("p2") / v4("10.0.0.2", "10.0.0.9") / ICMP(type=3, code=3) /
              IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=4000, dport=5000),
              "drop", "default", port="p2", pre=[Send(udp4(), action=XDP_REDIRECT)]),
        stays("icmpv6 packet too big below 1280", blue([rule(1, proto="udp", dport=5000,
                                                            dst="fd00::/64")]),
              eth("p2") / v6("fd00::2", "fd00::1") / ICMPv6PacketTooBig(mtu=1200) /
              IPv6(src="fd00::1", dst="fd00::2") / UDP(sport=4000, dport=5000),
              "drop", "icmp_mtu", port="p2", pre=[Send(udp6(), action=XDP_REDIRECT)]),
        stays("icmp frag needed below 68", G,
              eth("p2") / v4("10.0.0.2", "10.0.0.1") / ICMP(type=3, code=4, nexthopmtu=60) /
              IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=4000, dport=5000),
              "drop", "icmp_mtu", port="p2", pre=[Send(udp4(), action=XDP_REDIRECT)]),
        fwd("icmp frag needed at 68 is related", G,
            eth("p2") / v4("10.0.0.2", "10.0.0.1") / ICMP(type=3, code=4, nexthopmtu=68) /
            IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=4000, dport=5000),
            out_port="p1", port="p2", reason="related", rule=1,
            pre=[Send(udp4(), action=XDP_REDIRECT)]),
    ]
    # Reply entries.
    reply = udp4(5000, 4000, port="p2", src="10.0.0.2", dst="10.0.0.1")
    C += [
        stays("stale reply arriving on another port is judged on its own", GEN1_P5,
              udp4(5000, 4000, port="p5", src="10.0.0.2", dst="10.0.0.1"), "drop",
              "default", port="p5", counters={("p5", "none", "flow_stale"): 1},
              pre=[Send(udp4(), action=XDP_REDIRECT), Sync(GEN1_PLUS_P5)]),
        fwd("reply whose entry is missing re-creates it from the forward entry", G, reply,
            out_port="p1", port="p2", reason="rule_allow", rule=1,
            pre=[Send(udp4(), action=XDP_REDIRECT),
                 Evict(BLUE, 17, "10.0.0.2", 5000, "10.0.0.1", 4000),
                 Send(udp4(), action=XDP_REDIRECT)],
            check=all_of(
                flow_check(BLUE, 17, "10.0.0.2", 5000, "10.0.0.1", 4000, packets=1,
                           flags=abi.FLOW_REVERSE),
                flow_check(BLUE, 17, "10.0.0.1", 4000, "10.0.0.2", 5000, packets=2,
                           flags_clear=abi.FLOW_REVERSE))),
    ]
    # IPv6 fragments behind a destination options header share one key.
    f6o = frags6_behind_options()
    C += [
        fwd("ipv6 first fragment with options behind the fragment header", FRAGS, f6o[0]),
        fwd("ipv6 later fragment with options behind the fragment header follows its first",
            FRAGS, f6o[1], reason="flow", pre=[Send(f6o[0], action=XDP_REDIRECT)]),
    ]
    return C


A_ = ALLOW_ALL


CASES = build()
