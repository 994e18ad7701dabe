"""The lab's external network (issue 11: floating IPs and SNAT): hosts behind the node's
uplink, and how each path reaches them with the same translated addresses.

In the lab file, an external host names the uplink port it sits behind and its addresses:

    [[ports]]
    name = "upl"
    uplink = true
    local_ip = "198.51.100.1"       # the node's address on the external network

    [[external]]
    name = "inet"                   # its namespaces are PREFIX-PATH-inet, its wire eth0
    port = "upl"
    addrs = ["198.51.100.2/24", "192.0.2.80/32"]   # on the link; further ones behind it

The first address is on the link (the node's default route points at it: it is the
internet's router), the others are on its loopback (a server on the internet). Floating
IPs (`[[fips]]`) are on-link for the host (the node answers for them); every address it
talks to (the node's own, the floating IPs) has a permanent neighbour entry pointing at
the uplink's MAC, as VMs have for their gateways, so no ARP lands between scenario sends.

Paths:
- offload: the host's eth0 is the peer of the uplink port in the node namespace; the node
  has local_ip on it, a default route to the host (the datapath's next hop) and nothing
  else: the datapath translates.
- kernel variants: a gateway namespace PREFIX-TAG-gw holds the uplink (the same MAC and
  address) and, per tenant with NAT, a link to the tenant's router (whose default route
  then points there instead of a blackhole). The gateway does the NAT, as a Neutron
  network node does, with conntrack: the original direction of what a tenant sends is in
  the tenant's zone (`CT --zone-orig`, nft `ct original zone set`), the reply direction
  in the shared zone, so tenants with the same addresses stay apart and SNAT allocates
  ports across all of them (what the datapath promises); the connection mark says which
  tenant a translated-back reply goes to (policy routing by fwmark). The tenant's router
  judges its rules as before, on the untranslated addresses (the VM's own). The gateway
  gives back the TTL its own forwarding takes (iptables TTL --ttl-inc; nft has no
  arithmetic on fields, so one statement per value), so a packet crosses the kernel path
  with one decrement, as it crosses the node.
  Limitation: two inbound connections from the same external address and port to two
  floating IPs that stand for the same address in two tenants collide in the shared
  reply zone (the second is dropped); the scenarios use different source ports.

Comparing: SNAT source ports (and ICMP echo ids) the external host sees are allocated by
each path on its own; `snat_normaliser` replaces them by labels in order of appearance
(the same flow keeps its label, different flows get different ones), after checking the
port is in the SNAT's range and the L4 checksum is right.

Pure: text and argument lists (topology.py applies them)."""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

EXTERNAL_KEYS = ("name", "port", "addrs")
_NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")
ROUTER_IF = "xgw"        # a tenant router's link to the gateway
TRANSIT = "169.254.{i}.{h}/30"


class ExternalError(ValueError):
    """A bad [[external]] entry; the message names it."""


@dataclass(frozen=True)
class ExternalHost:
    name: str
    port: str                    # the node's uplink port it sits behind
    addrs: Tuple[str, ...]       # "addr/len": the first on the link, the rest behind it
    local_ip: str                # the node's address on the link (the uplink's local_ip)
    index: int                   # 1-based, for MACs
    tenant: Optional[str] = None   # none: for code that walks VMs and hosts alike

    @property
    def ip(self) -> str:
        return self.addrs[0].split("/")[0]

    @property
    def ip6(self) -> Optional[str]:
        return None

    @property
    def link(self) -> ipaddress.IPv4Interface:
        return ipaddress.IPv4Interface(self.addrs[0])

    @property
    def mac(self) -> str:
        return f"02:ee:00:00:{self.index:02x}:02"

    @property
    def port_mac(self) -> str:
        """The uplink's MAC on every path (the host's gateway)."""
        return f"02:ee:00:00:{self.index:02x}:01"


def parse(data: Any, state, vm_names: Sequence[str], source: str) -> List[ExternalHost]:
    """[[external]] entries, checked against the state's uplink ports."""
    def bad(msg: str) -> ExternalError:
        return ExternalError(f"{source}: {msg}")

    if data is None:
        return []
    if not isinstance(data, list):
        raise bad("external must be an array of tables [[external]]")
    uplinks = {p.name: p for p in state.ports if getattr(p, "uplink", False)}
    hosts: List[ExternalHost] = []
    for i, d in enumerate(data):
        where = f"external[{i}]"
        if not isinstance(d, dict) or set(d) != set(EXTERNAL_KEYS):
            raise bad(f"{where}: needs exactly the fields {', '.join(EXTERNAL_KEYS)}")
        name, port, addrs = d["name"], d["port"], d["addrs"]
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise bad(f"{where}: name {name!r} must be 1-12 lower-case letters and digits")
        if name in vm_names or any(h.name == name for h in hosts):
            raise bad(f"{where}: name {name} is already a VM or host of the lab")
        if port not in uplinks:
            raise bad(f"{where}: port {port!r} is not an uplink port of [[ports]] "
                      f"(uplinks: {', '.join(uplinks) or 'none'})")
        if any(h.port == port for h in hosts):
            raise bad(f"{where}: uplink {port} already has a host (one per uplink)")
        if not isinstance(addrs, list) or not addrs:
            raise bad(f"{where}: addrs must be a non-empty list of IPv4 ADDR/LEN")
        try:
            ifs = [ipaddress.IPv4Interface(a) for a in addrs]
        except (ValueError, TypeError) as e:
            raise bad(f"{where}: addrs: {e}") from None
        local = uplinks[port].local_ip
        if local not in ifs[0].network or local == ifs[0].ip:
            raise bad(f"{where}: the uplink's local_ip {local} must be another address of "
                      f"{ifs[0].network} (the host's link)")
        hosts.append(ExternalHost(name, port, tuple(str(a) for a in ifs), str(local),
                                  len(hosts) + 1))
    return hosts


# -- NAT objects: the state's (agent.model Fip/Snat) ---------------------------------------

def fips(spec, tenant: Optional[str] = None) -> List[Any]:
    return [f for f in spec.state.fips if tenant is None or f.tenant == tenant]


def snat(spec, tenant: str) -> Optional[Any]:
    return next((s for s in spec.state.snats if s.tenant == tenant), None)


def nat_tenants(spec) -> List[str]:
    """Tenants with a floating IP or SNAT, in the state's order (their index names their
    transit link and routing table)."""
    used = {f.tenant for f in spec.state.fips} | {s.tenant for s in spec.state.snats}
    return [t.name for t in spec.state.tenants if t.name in used] if spec.external else []


def _host(spec) -> ExternalHost:
    return spec.external[0]


def _transit(spec, tenant: str, h: int) -> str:
    return TRANSIT.format(i=nat_tenants(spec).index(tenant) + 1, h=h)


def _hop(spec, tenant: str, h: int) -> str:
    """An end of a tenant's transit link, without its length (1 router, 2 gateway)."""
    return _transit(spec, tenant, h).split("/")[0]


def _gw_if(tenant: str) -> str:
    return f"g{tenant}"[:15]


def _transit_macs(spec, tenant: str) -> Tuple[str, str]:
    i = nat_tenants(spec).index(tenant) + 1
    return f"02:ef:00:00:{i:02x}:01", f"02:ef:00:00:{i:02x}:02"


# -- the kernel path ------------------------------------------------------------------------

def gw_ns(prefix: str, path: str) -> str:
    from .render import ns_name
    return ns_name(prefix, path, "gw")


def router_uplink(spec, tenant: str, path: str) -> List[str]:
    """A NAT tenant's router: its link to the gateway and its default route there (ip
    -batch lines); [] for any other tenant (its default stays a blackhole)."""
    if tenant not in nat_tenants(spec):
        return []
    rmac, gmac = _transit_macs(spec, tenant)
    return [f"link add {ROUTER_IF} address {rmac} type veth peer name {_gw_if(tenant)} "
            f"address {gmac} netns {gw_ns(spec.prefix, path)}",
            f"link set {ROUTER_IF} up",
            f"addr add {_transit(spec, tenant, 1)} dev {ROUTER_IF}",
            f"neigh replace {_hop(spec, tenant, 2)} lladdr {gmac} dev {ROUTER_IF} nud permanent",
            f"route add default via {_hop(spec, tenant, 2)} dev {ROUTER_IF}"]


# A NAT tenant's VMs route everything else to their port (the node, or the tenant's
# router) through a gateway address nobody has, with a permanent neighbour entry: no ARP
# for it between scenario sends, and nothing new for the datapath to answer.
VM_GATEWAY = "169.254.0.1"


def vm_default_route(spec, vm) -> List[str]:
    """ip -batch lines of a VM's namespace: its default route, when its tenant has NAT."""
    if vm.tenant not in nat_tenants(spec):
        return []
    return [f"neigh replace {VM_GATEWAY} lladdr {vm.port_mac} dev eth0 nud permanent",
            f"route add default via {VM_GATEWAY} dev eth0 onlink"]


def gw_setup(spec, variant: str):
    """The gateway namespace of a kernel variant (render.NsSetup), or None without an
    external network."""
    from .render import QUIET_SYSCTLS, NsSetup
    if not spec.external:
        return None
    host = _host(spec)
    s = NsSetup(gw_ns(spec.prefix, variant), sysctls=list(QUIET_SYSCTLS) + [
        ("net.ipv4.ip_forward", "1"), ("net.ipv4.conf.all.rp_filter", "0"),
        ("net.ipv4.conf.default.rp_filter", "0")])
    s.ip_batch += [f"addr add {host.local_ip}/{host.link.network.prefixlen} dev {host.port}",
                   f"neigh replace {host.ip} lladdr {host.mac} dev {host.port} nud permanent",
                   f"route add default via {host.ip} dev {host.port}"]
    for pref, tenant in enumerate(nat_tenants(spec)):
        tid = spec.tenant_id(tenant)
        rmac, _ = _transit_macs(spec, tenant)
        gif = _gw_if(tenant)
        s.ip_batch += [f"link set {gif} up",
                       f"addr add {_transit(spec, tenant, 2)} dev {gif}",
                       f"neigh replace {_hop(spec, tenant, 1)} lladdr {rmac} "
                       f"dev {gif} nud permanent",
                       # Translated back, a reply's address is the tenant's: its mark
                       # (the connection's) picks the tenant's table.
                       f"route add default via {_hop(spec, tenant, 1)} "
                       f"dev {gif} table {tid}",
                       f"rule add iif {host.port} fwmark {tid} lookup {tid} pref {100 + pref}"]
    # The node answers ARP for floating IPs on the uplink: here a proxy entry each,
    # answered at once (not after a random delay of up to 0.8 s).
    # (The kernel proxies only for an address routed elsewhere than the asking
    # interface: each floating IP is routed to its tenant, where it is.)
    for f in spec.state.fips:
        s.ip_batch += [f"neigh add proxy {f.ip} dev {host.port}",
                       f"route add {f.ip}/32 via {_hop(spec, f.tenant, 1)} "
                       f"dev {_gw_if(f.tenant)}"]
    s.late_sysctls.append((f"net.ipv4.neigh.{host.port}.proxy_delay", "0"))
    if variant == "iptables":
        s.firewall.append((["iptables-restore"], gw_iptables(spec)))
    else:
        s.firewall.append((["nft", "-f", "-"], gw_nftables(spec)))
    return s


def _snat_to(sn) -> str:
    return f"{sn.to}:{sn.ports[0]}-{sn.ports[1]}"


def gw_iptables(spec) -> str:
    """iptables-restore input of the gateway (see the module doc)."""
    up = _host(spec).port
    raw, mangle, nat, fwd = [], [], [], []
    for tenant in nat_tenants(spec):
        tid, gif = spec.tenant_id(tenant), _gw_if(tenant)
        raw.append(f"-A PREROUTING -i {gif} -j CT --zone-orig {tid}")
        mangle.append(f"-A PREROUTING -i {gif} -j CONNMARK --set-mark {tid}")
        ttl = [f"-A PREROUTING -i {gif} -j TTL --ttl-inc 1"]
        for f in fips(spec, tenant):
            mangle.append(f"-A PREROUTING -i {up} -d {f.ip}/32 -m conntrack --ctstate NEW "
                          f"-j CONNMARK --set-mark {tid}")
            # (Its replies, to the floating IP too, get theirs by direction below.)
            ttl.append(f"-A PREROUTING -i {up} -d {f.ip}/32 -m conntrack --ctdir ORIGINAL "
                       f"-j TTL --ttl-inc 1")
            nat.append(f"-A PREROUTING -i {up} -d {f.ip}/32 -j DNAT --to-destination {f.to}")
        mangle.extend(ttl)
        for f in fips(spec, tenant):
            nat.append(f"-A POSTROUTING -o {up} -m mark --mark {tid} -s {f.to}/32 "
                       f"-j SNAT --to-source {f.ip}")
            fwd.append(f"-A FORWARD -i {gif} -o {up} -s {f.to}/32 -j ACCEPT")
        sn = snat(spec, tenant)
        if sn is not None:
            # Ports from the range for TCP and UDP; ICMP echo ids (and anything else) as
            # the kernel chooses (an id is kept when free).
            nat += [f"-A POSTROUTING -o {up} -m mark --mark {tid} -p {p} "
                    f"-j SNAT --to-source {_snat_to(sn)}" for p in ("tcp", "udp")]
            nat.append(f"-A POSTROUTING -o {up} -m mark --mark {tid} -j SNAT --to-source {sn.to}")
            fwd.append(f"-A FORWARD -i {gif} -o {up} -j ACCEPT")
    # Marks first, then the restore for this packet, then the TTL the gateway gives back
    # (replies of translated flows come to the node's own address: by direction).
    out = (["*raw", ":PREROUTING ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"] + raw + ["COMMIT",
           "*mangle", ":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]",
            ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]", ":POSTROUTING ACCEPT [0:0]"]
           + [l for l in mangle if "CONNMARK" in l]
           + ["-A PREROUTING -j CONNMARK --restore-mark"]
           + [l for l in mangle if "TTL" in l]
           + [f"-A PREROUTING -i {up} -m conntrack --ctdir REPLY -j TTL --ttl-inc 1",
              "COMMIT",
              "*nat", ":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]",
              ":OUTPUT ACCEPT [0:0]", ":POSTROUTING ACCEPT [0:0]"] + nat + ["COMMIT",
           "*filter", ":INPUT ACCEPT [0:0]", ":FORWARD DROP [0:0]", ":OUTPUT ACCEPT [0:0]",
           "-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
           f"-A FORWARD -i {up} -m conntrack --ctstate DNAT -j ACCEPT"] + fwd + ["COMMIT"])
    return "\n".join(out) + "\n"


# TTLs in the order the gateway's nft chain tries them: the usual ones first.
_TTL_ORDER = [63, 64, 127, 128, 254] + [t for t in range(1, 255)
                                        if t not in (63, 64, 127, 128, 254)]


def gw_nftables(spec) -> str:
    """`nft -f` input of the gateway: the same as gw_iptables in one `ip` table."""
    up = _host(spec).port
    raw, marks, ttl_from, dnat, snat_l, fwd = [], [], [], [], [], []
    for tenant in nat_tenants(spec):
        tid, gif = spec.tenant_id(tenant), _gw_if(tenant)
        raw.append(f'    iifname "{gif}" ct original zone set {tid}')
        marks.append(f'    iifname "{gif}" ct mark set {tid}')
        ttl_from.append(f'    iifname "{gif}" jump ttl_back')
        for f in fips(spec, tenant):
            marks.append(f'    iifname "{up}" ip daddr {f.ip} ct state new ct mark set {tid}')
            ttl_from.append(f'    iifname "{up}" ip daddr {f.ip} ct direction original '
                            f'jump ttl_back')
            dnat.append(f'    iifname "{up}" ip daddr {f.ip} dnat to {f.to}')
            snat_l.append(f'    oifname "{up}" meta mark {tid} ip saddr {f.to} snat to {f.ip}')
            fwd.append(f'    iifname "{gif}" oifname "{up}" ip saddr {f.to} accept')
        sn = snat(spec, tenant)
        if sn is not None:
            snat_l += [f'    oifname "{up}" meta mark {tid} meta l4proto {{ tcp, udp }} '
                       f'snat to {_snat_to(sn)}',
                       f'    oifname "{up}" meta mark {tid} snat to {sn.to}']
            fwd.append(f'    iifname "{gif}" oifname "{up}" accept')
    lines = (["table ip xdpflow_nat {",
              "  chain raw {", "    type filter hook prerouting priority raw; policy accept;"]
             + raw + ["  }",
                      "  chain mangle {",
                      "    type filter hook prerouting priority mangle; policy accept;"]
             + marks + ["    meta mark set ct mark"] + ttl_from
             + [f'    iifname "{up}" ct direction reply jump ttl_back', "  }",
                "  chain ttl_back {"]
             + [f"    ip ttl {t} ip ttl set {t + 1} return" for t in _TTL_ORDER]
             + ["  }",
                "  chain to_vm {", "    type nat hook prerouting priority dstnat; policy accept;"]
             + dnat + ["  }",
                       "  chain from_vm {",
                       "    type nat hook postrouting priority srcnat; policy accept;"]
             + snat_l + ["  }",
                         "  chain forward {",
                         "    type filter hook forward priority filter; policy drop;",
                         "    ct state established,related accept",
                         f'    iifname "{up}" ct status dnat accept'] + fwd + ["  }", "}"])
    return "\n".join(lines) + "\n"


def host_setup(spec, host: ExternalHost, path: str):
    """The external host's namespace (render.NsSetup), the same on every path."""
    from .render import QUIET_SYSCTLS, NsSetup, ns_name
    s = NsSetup(ns_name(spec.prefix, path, host.name), sysctls=list(QUIET_SYSCTLS))
    s.ip_batch.append(f"addr add {host.addrs[0]} dev eth0")
    s.ip_batch += [f"addr add {a} dev lo" for a in host.addrs[1:]]
    on_link = [host.local_ip] + [str(f.ip) for f in spec.state.fips]
    s.ip_batch += [f"neigh replace {a} lladdr {host.port_mac} dev eth0 nud permanent"
                   for a in on_link]
    s.ip_batch += [f"route add {f.ip}/32 dev eth0" for f in spec.state.fips]
    return s


def node_setup(spec):
    """The offloaded path's node namespace (render.NsSetup): its uplinks' addresses,
    default route and neighbour. The datapath finds the next hop of what a VM starts with
    bpf_fib_lookup, which answers only for an ingress interface that forwards (else
    BPF_FIB_LKUP_RET_FWD_DISABLED, counted as nat_no_route): forwarding is on for NAT
    tenants' ports, and what the datapath passes to the node's stack from them is dropped
    first thing, so it still ends there as from any other port (no ICMP from the node)."""
    from .render import NsSetup, ns_name
    s = NsSetup(ns_name(spec.prefix, "offload", "node"))
    for host in spec.external:
        s.ip_batch += [f"addr add {host.local_ip}/{host.link.network.prefixlen} dev {host.port}",
                       f"neigh replace {host.ip} lladdr {host.mac} dev {host.port} nud permanent",
                       f"route add default via {host.ip} dev {host.port}"]
    ports = [vm.port for vm in spec.vms if vm.tenant in nat_tenants(spec)]
    if ports:
        s.late_sysctls += [(f"net.ipv4.conf.{p}.forwarding", "1") for p in ports]
        names = ", ".join(f'"{p}"' for p in ports)
        s.firewall.append((["nft", "-f", "-"], "\n".join([
            "table inet xdpflow_node {",
            "  chain prerouting {",
            "    type filter hook prerouting priority raw; policy accept;",
            f'    iifname {{ {names} }} drop comment "passed by the datapath: ends here"',
            "  }", "}"]) + "\n"))
    return s


# -- comparing --------------------------------------------------------------------------------

def snat_ranges(spec) -> Dict[str, List[Tuple[int, int]]]:
    out: Dict[str, List[Tuple[int, int]]] = {}
    for s in spec.state.snats:
        out.setdefault(str(s.to), []).append(tuple(s.ports))
    return out


def _l4_checksum_ok(frame: bytes) -> bool:
    """The frame's TCP/UDP/ICMP checksum is what Scapy computes (UDP: or 0, none)."""
    from scapy.layers.inet import IP
    from scapy.layers.l2 import Ether
    pkt = Ether(frame)
    l4 = pkt[IP].payload
    got = getattr(l4, "chksum", None)
    if got is None or (got == 0 and pkt[IP].proto == 17):
        return True
    l4.chksum = None
    return Ether(bytes(pkt))[IP].payload.chksum == got


def snat_normaliser(spec, hosts: Sequence[str]) -> Callable[[str, bytes], bytes]:
    """A function (receiver, frame) -> frame for one path's run: what an external host
    receives from a SNAT address has its allocated source port (TCP/UDP) or echo id
    replaced by a label, P1, P2, ... per flow (that port to that remote address and port)
    in order of first appearance on this path, with the
    L4 checksum zeroed after it was checked; a port out of the SNAT's range is left as it
    is (and so differs from the other path's label). Echo ids have no range (the kernel
    keeps a free one as it is)."""
    ranges = snat_ranges(spec)
    labels: Dict[Tuple, str] = {}
    hosts = set(hosts)

    def norm(receiver: str, frame: bytes) -> bytes:
        if receiver not in hosts or len(frame) < 34 or frame[12:14] != b"\x08\x00":
            return frame
        src = str(ipaddress.IPv4Address(frame[26:30]))
        if src not in ranges:
            return frame
        proto, l4 = frame[23], 14 + (frame[14] & 0x0F) * 4
        if proto in (6, 17) and len(frame) >= l4 + 8:
            at, csum_at = l4, l4 + (16 if proto == 6 else 6)
        elif proto == 1 and len(frame) >= l4 + 8 and frame[l4] == 8:   # echo request
            at, csum_at = l4 + 4, l4 + 2
        else:
            return frame
        port = int.from_bytes(frame[at:at + 2], "big")
        if proto != 1 and not any(lo <= port <= hi for lo, hi in ranges[src]):
            return frame
        # A flow is its port and its remote end: two flows to different remotes may share
        # a port on one path and not on the other, both rightly.
        remote = frame[30:34] + (frame[at + 2:at + 4] if proto != 1 else b"")
        label = labels.setdefault((proto, port, remote), f"P{len(labels) + 1}")
        ok = "ok" if _l4_checksum_ok(frame) else "BAD"
        b = bytearray(frame)
        b[at:at + 2] = b"\0\0"
        b[csum_at:csum_at + 2] = b"\0\0"
        return bytes(b) + f"|snat port {label}, checksum {ok}".encode()
    return norm
