"""The fuzz tests' oracle (issue 14): an independent Python reading of the rule model —
tenants, ports with port security, endpoints, routes, rules — that says which outcomes a
packet may have. It shares no code with the agent's compiler or the datapath: it parses
packets with `struct` from the RFCs, matches rules against `model.Rule` fields as the
README states them (the highest priority wins, then the lower id; an IPv4 prefix is an
IPv4 rule), and keeps its own record of allowed connections (stateful allow) and first
fragments.

For a well-formed unicast IP packet the answer is one outcome; a reply of a connection
the rules allowed, or an ICMP error about one, may also take the connection's way back.
ARP and neighbour discovery get a set that never contains a redirect. Malformed packets
get the tenant's default. New datapath features (overlay, NAT, rate limits) extend
`Oracle.judge` where their rules apply: the overlay's is `_uplink` (a packet arriving on an
uplink port: exact for what is not decapsulated, a set for what is; see its doc)."""
from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, Optional, Set, Tuple

from agent import model

XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = 0, 1, 2, 3, 4

ETH_P_IP, ETH_P_IPV6, ETH_P_ARP = 0x0800, 0x86DD, 0x0806
VLAN_TYPES = (0x8100, 0x88A8)
MAX_VLAN = 2
IPV6_EXT = {0, 43, 60, 44, 51}          # hop-by-hop, routing, dest opts, fragment, AH
MAX_IPV6_EXT = 6
MAX_IPV6_EXT_BYTES = 2048
TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58
LINK_LOCAL = ipaddress.ip_network("fe80::/64")


class Malformed(Exception):
    """The packet does not parse: the tenant's default verdict."""


@dataclass
class Pkt:
    smac: bytes
    dmac: bytes
    tags: int
    l3: int                      # offset of the IP / ARP header
    family: int = 0              # 4, 6, 0 (ARP / other)
    ethertype: int = 0
    src: Optional[ipaddress._BaseAddress] = None
    dst: Optional[ipaddress._BaseAddress] = None
    proto: int = 0
    sport: int = 0
    dport: int = 0
    ttl: int = 0
    icmp_type: Optional[int] = None
    icmp_code: int = 0
    icmp_mtu: int = 0
    frag: str = ""               # "", "first", "later"
    frag_key: Optional[tuple] = None
    l4: int = 0


def _ip4(b: bytes):
    return ipaddress.IPv4Address(b)


def _ip6(b: bytes):
    return ipaddress.IPv6Address(b)


def parse(pkt: bytes) -> Pkt:
    """Ethernet, tags, then IPv4 / IPv6 (+ extension headers) and TCP/UDP/ICMP, as RFC 791,
    8200, 793, 768, 792 and 4443 lay them out. Raises Malformed for what does not parse;
    tags beyond MAX_VLAN are malformed too."""
    if len(pkt) < 14:
        raise Malformed("eth")
    dmac, smac = pkt[0:6], pkt[6:12]
    et = struct.unpack_from("!H", pkt, 12)[0]
    off, tags = 14, 0
    while et in VLAN_TYPES:
        tags += 1
        if tags > MAX_VLAN or off + 4 > len(pkt):
            p = Pkt(smac, dmac, tags, off)
            raise Malformed(p)
        et = struct.unpack_from("!H", pkt, off + 2)[0]
        off += 4
    p = Pkt(smac, dmac, tags, off, ethertype=et)
    if et == ETH_P_IP:
        _parse4(pkt, p)
    elif et == ETH_P_IPV6:
        _parse6(pkt, p)
    return p


def _bad(p: Pkt, what: str):
    raise Malformed(p)


def _parse4(pkt: bytes, p: Pkt):
    o = p.l3
    if o + 20 > len(pkt):
        _bad(p, "ipv4")
    vihl = pkt[o]
    ver, ihl = vihl >> 4, vihl & 15
    tot = struct.unpack_from("!H", pkt, o + 2)[0]
    if ver != 4 or ihl < 5 or tot < ihl * 4 or o + tot > len(pkt):
        _bad(p, "ipv4")
    end = o + tot
    p.family = 4
    p.proto = pkt[o + 9]
    p.ttl = pkt[o + 8]
    p.src, p.dst = _ip4(pkt[o + 12:o + 16]), _ip4(pkt[o + 16:o + 20])
    ident, fo = struct.unpack_from("!HH", pkt, o + 4)
    if fo & 0x1FFF:
        p.frag = "later"
    elif fo & 0x2000:
        p.frag = "first"
    if p.frag:
        p.frag_key = (p.proto, ident, p.src, p.dst)
    p.l4 = o + ihl * 4
    if p.frag != "later":
        _parse_l4(pkt, p, p.l4, end)


def _parse6(pkt: bytes, p: Pkt):
    o = p.l3
    if o + 40 > len(pkt):
        _bad(p, "ipv6")
    ver = pkt[o] >> 4
    plen = struct.unpack_from("!H", pkt, o + 4)[0]
    end = o + 40 + plen
    if ver != 6 or plen == 0 or end > len(pkt):
        _bad(p, "ipv6")
    src, dst = _ip6(pkt[o + 8:o + 24]), _ip6(pkt[o + 24:o + 40])
    if src.ipv4_mapped or dst.ipv4_mapped:
        _bad(p, "ipv6: an IPv4-mapped address is not on the wire (RFC 4291 2.5.5.2)")
    p.family = 6
    p.ttl = pkt[o + 7]
    p.src, p.dst = src, dst
    nh = pkt[o + 6]
    off = o + 40
    for _ in range(MAX_IPV6_EXT):
        if nh not in IPV6_EXT:
            break
        if off > MAX_IPV6_EXT_BYTES or off + 8 > end:
            _bad(p, "ext")
        if nh == 44:
            fnh, fo, ident = pkt[off], struct.unpack_from("!H", pkt, off + 2)[0], \
                struct.unpack_from("!I", pkt, off + 4)[0]
            if fo & 0xFFF8:
                p.frag = "later"
            elif fo & 1:
                p.frag = "first"
            p.frag_key = (fnh, ident, p.src, p.dst)
            size = 8
        elif nh == 51:
            size = (pkt[off + 1] + 2) * 4
        else:
            size = (pkt[off + 1] + 1) * 8
        nh = pkt[off]
        off += size
        if off > end:
            _bad(p, "ext")
        if p.frag == "later":
            break
    if p.frag == "later":
        p.proto = nh
        return
    if nh in IPV6_EXT or off > MAX_IPV6_EXT_BYTES:
        _bad(p, "ext")
    p.proto = nh
    p.l4 = off
    _parse_l4(pkt, p, off, end)


def _parse_l4(pkt: bytes, p: Pkt, o: int, end: int):
    if p.proto == TCP:
        if o + 20 > end:
            _bad(p, "l4")
        doff = pkt[o + 12] >> 4
        if doff < 5 or o + doff * 4 > end:
            _bad(p, "l4")
        p.sport, p.dport = struct.unpack_from("!HH", pkt, o)
    elif p.proto == UDP:
        if o + 8 > end:
            _bad(p, "l4")
        ulen = struct.unpack_from("!H", pkt, o + 4)[0]
        if ulen < 8 or (not p.frag and o + ulen > end):
            _bad(p, "l4")
        p.sport, p.dport = struct.unpack_from("!HH", pkt, o)
    elif p.proto in (ICMP, ICMPV6):
        if o + 8 > end:
            _bad(p, "l4")
        p.icmp_type, p.icmp_code = pkt[o], pkt[o + 1]
        p.dport = p.icmp_type << 8 | p.icmp_code
        echo = (8, 0) if p.proto == ICMP else (128, 129)
        if p.icmp_type in echo:
            p.sport = struct.unpack_from("!H", pkt, o + 4)[0]
        p.icmp_mtu = struct.unpack_from("!H", pkt, o + 6)[0] if p.proto == ICMP else \
            struct.unpack_from("!I", pkt, o + 4)[0]


# --- the model, read independently --------------------------------------------------------

@dataclass(frozen=True)
class Link:
    ifindex: int
    mac: bytes       # the node-side port's MAC
    slot: int


def _mac(s: str) -> bytes:
    return bytes(int(x, 16) for x in s.split(":"))


def _in(addr, net) -> bool:
    """A rule's prefix: 'any' (::/0) takes both families; otherwise only its own."""
    if net == model.ANY:
        return True
    return addr.version == net.version and addr in net


@dataclass
class Outcome:
    """What a packet may do: XDP actions, and for a redirect where to and with which MACs
    (ifindex, dst MAC, src MAC). `stays`: what a drop or pass leaves (None: the packet as
    it came); `decap`: a redirect's input is this inner frame, not the packet."""
    actions: FrozenSet[int]
    redirect: Optional[Tuple[int, bytes, bytes]] = None
    why: str = ""
    stays: Optional[bytes] = None
    decap: Optional[bytes] = None


def one(action: int, why: str, redirect=None) -> Outcome:
    return Outcome(frozenset({action}), redirect, why)


@dataclass
class Conn:
    """A connection the rules allowed: its forward key, the port it came in on and went
    out of, and the MAC its replies must carry."""
    in_port: str
    out_port: str
    reply_mac: bytes


class Oracle:
    def __init__(self, state: dict, links: Dict[str, Link]):
        self.st = model.State.from_dict(state)
        self.links = links
        self.tenants = {t.name: t for t in self.st.tenants}
        self.ports = {p.name: p for p in self.st.ports}
        self.port_of_ifindex = {l.ifindex: n for n, l in links.items()}
        self.conns: Dict[tuple, Conn] = {}
        self.frags: Dict[tuple, Tuple[int, int, int]] = {}

    def reset(self):
        """No connection or fragment known (the flow and fragment tables flushed)."""
        self.conns.clear()
        self.frags.clear()

    def endpoint(self, tenant: str, addr) -> Optional[model.Endpoint]:
        for e in self.st.endpoints:
            if e.tenant == tenant and e.ip == addr:
                return e
        return None

    def src_ok(self, port: model.Port, p: Pkt) -> bool:
        if not port.port_security:
            return True
        e = self.endpoint(port.tenant, p.src)
        if e is not None and e.port == port.name and _mac(e.mac) == p.smac:
            return True
        macs = {_mac(e.mac) for e in self.st.endpoints if e.port == port.name}
        nets = list(port.allow) + [LINK_LOCAL]
        return p.smac in macs and any(_in(p.src, n) for n in nets)

    def route(self, tenant: str, dst) -> Tuple[int, Optional[Tuple[int, bytes, bytes]], str]:
        """(action if allowed, redirect target, reason) for a destination."""
        e = self.endpoint(tenant, dst)
        if e is None:
            best = None
            for r in self.st.routes:
                if r.tenant == tenant and _in(dst, r.prefix) and \
                        (best is None or r.prefix.prefixlen > best.prefix.prefixlen):
                    best = r
            if best is None:
                return XDP_DROP, None, "no_route"
            if best.action == "kernel":
                return XDP_PASS, None, "route_kernel"
            if best.action == "drop":
                return XDP_DROP, None, "route_drop"
            e = self.endpoint(tenant, best.via)
            if e is None:
                return XDP_DROP, None, "no_route"
        if e.vtep is not None:
            # Encapsulation needs the VTEP's underlay MAC; the fuzz's node knows none, so
            # the kernel gets the packet (and would resolve it).
            return XDP_PASS, None, "encap: no underlay neighbour"
        link = self.links.get(e.port)
        if link is None:
            return XDP_DROP, None, "no_route"
        return XDP_REDIRECT, (link.ifindex, _mac(e.mac), link.mac), e.port

    def classify(self, tenant: str, in_port: str, src, dst, proto, sport, dport,
                 icmp: Optional[Tuple[int, int]]) -> Optional[model.Rule]:
        best = None
        for r in self.st.rules:
            if r.tenant != tenant or not _in(src, r.src) or not _in(dst, r.dst):
                continue
            if r.proto and r.proto != proto:
                continue
            if r.in_port is not None and r.in_port != in_port:
                continue
            if r.proto in (TCP, UDP) and not (r.sport[0] <= sport <= r.sport[1] and
                                              r.dport[0] <= dport <= r.dport[1]):
                continue
            if r.icmp_type is not None:
                if icmp is None or icmp[0] != r.icmp_type or \
                        (r.icmp_code is not None and icmp[1] != r.icmp_code):
                    continue
            if best is None or (r.priority, -r.id) > (best.priority, -best.id):
                best = r
        return best

    # -- one packet ------------------------------------------------------------------------
    def judge(self, pkt: bytes, port_name: str) -> Outcome:
        port = self.ports.get(port_name)
        if port is None or port_name not in self.links:
            return one(XDP_PASS, "no_port")
        if port.uplink:
            return self._uplink(pkt, port)
        tenant = self.tenants[port.tenant]
        default = XDP_PASS if tenant.default == "pass" else XDP_DROP
        try:
            p = parse(pkt)
        except Malformed as e:
            p = e.args[0]
            if isinstance(p, Pkt) and p.tags and not port.allow_vlan:
                return one(XDP_DROP, "vlan")
            return one(default, "malformed")
        if p.tags and not port.allow_vlan:
            return one(XDP_DROP, "vlan")
        if p.family == 0:
            if p.ethertype != ETH_P_ARP:
                return one(default, "not_ip")
            # Proxy ARP may answer; never forwarded.
            return Outcome(frozenset({XDP_DROP, XDP_TX, default}), None, "arp")
        neighbour = p.proto == ICMPV6 and p.icmp_type is not None and 133 <= p.icmp_type <= 137
        multicast = (p.dst.is_multicast or (p.family == 4 and
                                            p.dst == ipaddress.IPv4Address("255.255.255.255")))
        if neighbour:
            return Outcome(frozenset({XDP_DROP, XDP_TX, default}), None, "nd")
        if multicast:
            return one(default if self.src_ok(port, p) else XDP_DROP, "multicast")
        if p.icmp_type is not None and p.frag != "later":
            if p.proto == ICMP and p.icmp_type == 3 and p.icmp_code == 4 and p.icmp_mtu < 68:
                return one(XDP_DROP, "icmp_mtu")
            if p.proto == ICMPV6 and p.icmp_type == 2 and p.icmp_mtu < 1280:
                return one(XDP_DROP, "icmp_mtu")
        if p.frag:
            fk = (tenant.name,) + p.frag_key
            if p.frag == "later":
                if fk not in self.frags:
                    return one(default, "frag")
                p.sport, p.dport, p.proto = self.frags[fk]
                # A later fragment has no L4 header of its own: type and code are its
                # first fragment's (the rules see them); it is no ICMP error of its own.
                p.icmp_type = p.dport >> 8 if p.proto in (ICMP, ICMPV6) else None
                p.icmp_code = p.dport & 0xFF
            else:
                self.frags[fk] = (p.sport, p.dport, p.proto)
        key = (tenant.name, p.proto, p.src, p.sport, p.dst, p.dport)
        own = self._own(port, tenant, p, key, default)
        alts = [own]
        rep = self._reply(port, tenant, p, key)
        if rep is not None:
            alts.append(rep)
        rel = self._related(pkt, port, tenant, p)
        if rel is not None:
            alts.append(rel)
        return _union(alts)

    def _icmp(self, p: Pkt):
        return None if p.icmp_type is None else (p.icmp_type, p.icmp_code)

    def _own(self, port, tenant, p: Pkt, key, default) -> Outcome:
        if not self.src_ok(port, p):
            return one(XDP_DROP, "spoof")
        sport = 0 if p.proto in (ICMP, ICMPV6) else p.sport
        r = self.classify(tenant.name, port.name, p.src, p.dst, p.proto, sport, p.dport,
                          self._icmp(p))
        if r is None:
            return one(default, "default")
        if r.action == "deny":
            return one(XDP_DROP, f"deny {r.id}")
        if r.action == "pass":
            return one(XDP_PASS, f"pass {r.id}")
        act, target, why = self.route(tenant.name, p.dst)
        if act != XDP_REDIRECT:
            return one(act, why)
        if p.ttl <= 1:
            return one(XDP_PASS, "ttl")
        if self._reversible(p):
            self.conns[_conn_key(key)] = Conn(port.name, why, target[1])
        return one(XDP_REDIRECT, f"allow {r.id}", target)

    @staticmethod
    def _reversible(p: Pkt) -> bool:
        return p.proto in (TCP, UDP) or (p.proto == ICMP and p.icmp_type in (0, 8)) or \
            (p.proto == ICMPV6 and p.icmp_type in (128, 129))

    @staticmethod
    def _reverse(key):
        t, proto, src, sport, dst, dport = key
        if proto in (TCP, UDP):
            return (t, proto, dst, dport, src, sport)
        swap = {(ICMP, 8): 0, (ICMP, 0): 8, (ICMPV6, 128): 129, (ICMPV6, 129): 128}
        typ = swap.get((proto, dport >> 8))
        if typ is None:
            return None
        return (t, proto, dst, sport, src, typ << 8)

    def _reply(self, port, tenant, p: Pkt, key) -> Optional[Outcome]:
        """A reply of an allowed connection whose forward direction the rules still allow
        (judged as arriving on the forward's port): back to the forward's sender."""
        fwd = self._reverse(key)
        c = self.conns.get(_conn_key(fwd)) if fwd else None
        if c is None or c.out_port != port.name or \
                (port.port_security and c.reply_mac != p.smac):
            return None
        _, proto, src, sport, dst, dport = fwd
        icmp = (dport >> 8, dport & 0xFF) if proto in (ICMP, ICMPV6) else None
        r = self.classify(tenant.name, c.in_port, src, dst, proto,
                          0 if icmp else sport, dport, icmp)
        if r is None or r.action != "allow" or self.route(tenant.name, dst)[0] != XDP_REDIRECT:
            return None
        if p.ttl <= 1:
            return one(XDP_PASS, "reply: ttl")
        act, target, _ = self.route(tenant.name, p.dst)
        if act != XDP_REDIRECT:
            return one(XDP_DROP, "reply: no route back")
        return one(XDP_REDIRECT, "reply", target)

    def _related(self, pkt: bytes, port, tenant, p: Pkt) -> Optional[Outcome]:
        """An ICMP error quoting a packet of a known connection, addressed to that packet's
        sender, from a source the port may use: the connection's way back."""
        errors = {ICMP: (3, 11, 12), ICMPV6: (1, 2, 3, 4)}
        if p.icmp_type is None or p.icmp_type not in errors.get(p.proto, ()) or p.frag == "later":
            return None
        if not self.src_ok(port, p):
            return None
        o = p.l4 + 8
        try:
            if p.family == 4:
                if o + 20 > len(pkt) or pkt[o] >> 4 != 4 or pkt[o] & 15 < 5:
                    return None
                qsrc, qdst, qproto = _ip4(pkt[o + 12:o + 16]), _ip4(pkt[o + 16:o + 20]), pkt[o + 9]
                l4 = o + (pkt[o] & 15) * 4
            else:
                if o + 40 > len(pkt) or pkt[o] >> 4 != 6:
                    return None
                qsrc, qdst, qproto = _ip6(pkt[o + 8:o + 24]), _ip6(pkt[o + 24:o + 40]), pkt[o + 6]
                l4 = o + 40
            if l4 + 8 > len(pkt) or qproto not in (TCP, UDP, ICMP, ICMPV6) or qsrc != p.dst:
                return None
        except IndexError:
            return None
        if qproto in (TCP, UDP):
            qs, qd = struct.unpack_from("!HH", pkt, l4)
        else:
            qs, qd = struct.unpack_from("!H", pkt, l4 + 4)[0], pkt[l4] << 8 | pkt[l4 + 1]
        qk = (tenant.name, qproto, qsrc, qs, qdst, qd)
        for k in (qk, self._reverse(qk)):
            if k is None or _conn_key(k) not in self.conns:
                continue
            # Toward the quoted packet's sender, whichever side of the connection it is.
            act, target, _ = self.route(tenant.name, qsrc)
            if act == XDP_REDIRECT:
                return Outcome(frozenset({XDP_REDIRECT, XDP_DROP, XDP_PASS}), target, "related")
        return None


    # -- the overlay: a packet arriving on an uplink --------------------------------------
    def _uplink(self, pkt: bytes, port: model.Port) -> Outcome:
        """RFC 7348 as the README states the datapath takes it: VXLAN (UDP 4789, I flag)
        to the uplink's address is its VNI's tenant's, from a VTEP one of that tenant's
        remote endpoints is behind; anything else to the node is the kernel's, untouched;
        VXLAN whose headers are cut or lie is dropped. Decapsulated, the inner packet may
        be dropped or passed (outer headers kept, Ethernet padding behind the outer
        packet gone), and delivered only to a local VM of that tenant that has its
        destination, from a remote endpoint behind that VTEP, routed, where the rules
        allow its flow (or its reverse: a reply) or it is an ICMP error or a fragment."""
        outer = vxlan_outer(pkt, port.local_ip)
        if outer == "other":
            return one(XDP_PASS, "uplink_other")
        if outer == "bad":
            return one(XDP_DROP, "parse_vxlan")
        vtep, vni, end = outer
        tenant = next((t for t in self.st.tenants if t.vni == vni), None)
        if tenant is None:
            return one(XDP_DROP, "vni_unknown")
        if not any(e.tenant == tenant.name and e.vtep == vtep for e in self.st.endpoints):
            return one(XDP_DROP, "vtep_unknown")
        kept, inner = pkt[:end], pkt[DECAP_LEN:end]
        loose = Outcome(frozenset({XDP_DROP, XDP_PASS}), None, "decap", stays=kept)
        try:
            p = parse(inner)
        except Malformed:
            return loose
        if p.tags or p.family == 0 or p.dst.is_multicast or p.ttl <= 1:
            return loose
        e = self.endpoint(tenant.name, p.src)
        if e is None or e.vtep != vtep:
            return loose                 # spoofed: no remote endpoint behind that VTEP
        act, target, _ = self.route(tenant.name, p.dst)
        if act != XDP_REDIRECT:
            return loose
        icmp = self._icmp(p)
        sport = 0 if p.proto in (ICMP, ICMPV6) else p.sport
        fwd = self.classify(tenant.name, port.name, p.src, p.dst, p.proto, sport, p.dport,
                            icmp)
        key = self._reverse((tenant.name, p.proto, p.src, p.sport, p.dst, p.dport))
        rev = None
        if key is not None:
            _, proto, src, rs, dst, rd = key
            ricmp = (rd >> 8, rd & 0xFF) if proto in (ICMP, ICMPV6) else None
            rev = self.classify(tenant.name, target and self.port_of_ifindex[target[0]],
                                src, dst, proto, 0 if ricmp else rs, rd, ricmp)
        error = p.icmp_type is not None and p.icmp_type in {ICMP: (3, 11, 12),
                                                            ICMPV6: (1, 2, 3, 4)}.get(p.proto, ())
        if not ((fwd and fwd.action == "allow") or (rev and rev.action == "allow") or
                error or p.frag):
            return loose
        return Outcome(frozenset({XDP_DROP, XDP_PASS, XDP_REDIRECT}), target, "decap",
                       stays=kept, decap=inner)


DECAP_LEN = 14 + 20 + 8 + 8          # outer Ethernet, IPv4, UDP, VXLAN


def vxlan_outer(pkt: bytes, local) -> object:
    """"other" (not VXLAN to `local`: the node's own), "bad" (VXLAN to it whose headers
    are cut or lie), or (the sending VTEP, the VNI, where the outer IPv4 packet ends)."""
    if len(pkt) < 34 or pkt[12:14] != b"\x08\x00" or pkt[14] != 0x45 or \
            pkt[30:34] != local.packed or pkt[23] != UDP or \
            struct.unpack_from("!H", pkt, 20)[0] & 0x3FFF:
        return "other"
    if len(pkt) < 42 or struct.unpack_from("!H", pkt, 36)[0] != 4789:
        return "other"
    if len(pkt) < DECAP_LEN + 14:
        return "bad"
    tot, ulen = struct.unpack_from("!H", pkt, 16)[0], struct.unpack_from("!H", pkt, 38)[0]
    if tot < DECAP_LEN or tot > len(pkt) - 14 or ulen != tot - 20 or not pkt[42] & 0x08:
        return "bad"
    return _ip4(pkt[26:30]), int.from_bytes(pkt[46:49], "big"), 14 + tot


def _conn_key(key):
    """Connections by key, an ICMP echo's by type without its code (stateful allow lets
    the echo's replies through whatever code they carry)."""
    t, proto, src, sport, dst, dport = key
    if proto in (ICMP, ICMPV6):
        dport &= 0xFF00
    return (t, proto, src, sport, dst, dport)


def _union(alts: List[Outcome]) -> Outcome:
    acts: Set[int] = set()
    redirect = None
    for o in alts:
        acts |= o.actions
        if o.redirect is not None:
            redirect = redirect or o.redirect
    return Outcome(frozenset(acts), redirect, " | ".join(o.why for o in alts))


def redirected(pkt: bytes, target: Tuple[int, bytes, bytes]) -> bytes:
    """A redirect's output: MACs rewritten, TTL / hop limit one less, IPv4 checksum updated
    incrementally (RFC 1624); every other byte as it came."""
    _, dmac, smac = target
    p = parse(pkt)
    out = bytearray(pkt)
    out[0:6], out[6:12] = dmac, smac
    if p.family == 4:
        o = p.l3
        old = struct.unpack_from("!H", out, o + 8)[0]
        out[o + 8] -= 1
        new = struct.unpack_from("!H", out, o + 8)[0]
        hc = struct.unpack_from("!H", out, o + 10)[0]
        s = (~hc & 0xFFFF) + (~old & 0xFFFF) + new
        s = (s & 0xFFFF) + (s >> 16)
        s = (s & 0xFFFF) + (s >> 16)
        struct.pack_into("!H", out, o + 10, ~s & 0xFFFF)
    else:
        out[p.l3 + 7] -= 1
    return bytes(out)
