"""The kernel path: a lab's desired state rendered for the Linux stack the way clouds did it
before offload (OpenStack Neutron's style), as text and commands, never applied here.

Per tenant, a router namespace holds the node side of every VM port of that tenant (so
tenants may use the same addresses and MACs). In it:
- routes: a /32 (/128) per endpoint out of its port, the tenant's `via` routes, a blackhole
  default (an unknown destination is dropped without an ICMP error, as the datapath does);
- permanent neighbours for every endpoint (the router never asks, as the datapath never
  does), proxy ARP on every port and a proxy ND entry per endpoint on every other port (a VM
  asking for an address its tenant knows gets its port's MAC, as from the datapath);
- netfilter, in one of two variants:
  * `iptables`: the raw table drops packets whose TTL / hop limit would expire (the node
    hands those to its own stack, which in the lab has no address on tenant ports and so
    answers nothing) and checks every VM port's source MAC and address (anti-spoofing, as
    Neutron's per-port chains); the filter table accepts conntrack's ESTABLISHED,RELATED,
    then walks the tenant's rules in the datapath's order (highest priority first, then
    lowest id; first match wins) and drops the rest (policy DROP);
  * `nftables`: the same in one `inet` table, the allowed (port, MAC, address) triples as
    sets and one chain per tenant for the rules.
- VLAN-tagged frames: there is no VLAN device, so the kernel drops them.

VMs get the same setup on every path (`vm_setup`): their addresses, permanent neighbours
for what their tenant knows (pointing at the port's MAC), tx checksum offload off (a veth
peer's frames carry finished checksums, so captured bytes compare), no ICMP rate limit and
no IPv6 chatter (DAD, router solicitations) that would land between scenario packets.

Pure: text and argument lists only; tests/unit/test_render.py checks the output."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

from agent.model import ANY, Rule, State, burst_of, rate_value

from . import external
from .labfile import VM, VM_IFNAME, LabSpec

VARIANTS = ("iptables", "nftables")
PATHS = ("offload",) + VARIANTS
# One letter per path in namespace names: PREFIX-o-blue1, PREFIX-i-rblue, ...
PATH_TAG = {"offload": "o", "iptables": "i", "nftables": "n"}

VM_PREFIXLEN = {4: 24, 6: 64}   # the VM's on-link subnet for each of its addresses

# Every namespace the lab makes: no ICMP rate limit (the same scenario twice must get the
# same errors), no DAD or router solicitations, MLD reports done within milliseconds.
QUIET_SYSCTLS: Tuple[Tuple[str, str], ...] = (
    ("net.ipv4.icmp_ratelimit", "0"),
    ("net.ipv4.icmp_msgs_per_sec", "100000"),
    ("net.ipv6.icmp.ratelimit", "0"),
    ("net.ipv6.conf.default.accept_dad", "0"),
    ("net.ipv6.conf.all.accept_dad", "0"),
    ("net.ipv6.conf.default.router_solicitations", "0"),
    ("net.ipv6.conf.default.accept_ra", "0"),
    ("net.ipv6.conf.default.mldv1_unsolicited_report_interval", "1"),
    ("net.ipv6.conf.default.mldv2_unsolicited_report_interval", "1"),
    ("net.ipv4.conf.all.send_redirects", "0"),
    ("net.ipv4.conf.default.send_redirects", "0"),
)


class RenderError(ValueError):
    """The state uses something the kernel path cannot express; names the object."""


@dataclass
class NsSetup:
    """What one namespace needs: sysctls (before its interfaces exist, so `default`
    applies to them), `ip -batch` lines, and netfilter input as (argv, stdin text)."""
    name: str
    sysctls: List[Tuple[str, str]] = field(default_factory=list)
    ip_batch: List[str] = field(default_factory=list)
    late_sysctls: List[Tuple[str, str]] = field(default_factory=list)   # per interface
    firewall: List[Tuple[List[str], str]] = field(default_factory=list)


def ns_name(prefix: str, path: str, what: str) -> str:
    """A namespace of the lab: PREFIX-TAG-WHAT (the prefix lets `down` find it)."""
    return f"{prefix}-{PATH_TAG[path]}-{what}"


def router_ns(prefix: str, path: str, tenant: str) -> str:
    return ns_name(prefix, path, "r" + tenant)


def version_of(net) -> Optional[int]:
    """4 or 6 for a prefix that names a family; None for "any"."""
    return None if net == ANY else net.version


def rule_families(rule: Rule) -> Tuple[int, ...]:
    """The IP versions a rule applies to (a rule with no address or ICMP kind: both)."""
    fams = {version_of(rule.src), version_of(rule.dst)} - {None}
    if rule.proto == 1:
        fams.add(4)
    elif rule.proto == 58:
        fams.add(6)
    return tuple(sorted(fams)) if fams else (4, 6)


def rule_order(state: State, tenant: str) -> List[Rule]:
    """The datapath's order: the highest priority wins, at equal priority the lower id."""
    return sorted((r for r in state.rules if r.tenant == tenant),
                  key=lambda r: (-r.priority, r.id))


# -- VMs --------------------------------------------------------------------------------

def vm_setup(spec: LabSpec, vm: VM, path: str) -> NsSetup:
    """A VM's namespace, the same on every path but for its name."""
    s = NsSetup(ns_name(spec.prefix, path, vm.name), sysctls=list(QUIET_SYSCTLS))
    if vm.mtu:
        s.ip_batch.append(f"link set {VM_IFNAME} mtu {vm.mtu}")
    for a in vm.addrs:
        v = ipaddress.ip_address(a).version
        s.ip_batch.append(f"addr add {a}/{VM_PREFIXLEN[v]} dev {VM_IFNAME}"
                          + (" nodad" if v == 6 else ""))
    for e in spec.state.endpoints:
        if e.tenant == vm.tenant and e.port != vm.port:
            s.ip_batch.append(f"neigh replace {e.ip} lladdr {vm.port_mac} dev {VM_IFNAME} "
                              f"nud permanent")
    # The tenant's routes (as a cloud's DHCP would push them), through their next hop,
    # whose neighbour entry above is the gateway MAC; not on the next hop's own VM.
    own = set(vm.addrs)
    for r in spec.state.routes:
        if r.tenant == vm.tenant and r.action == "via" and str(r.via) not in own:
            s.ip_batch.append(f"route add {r.prefix} via {r.via} dev {VM_IFNAME}")
    s.ip_batch += external.vm_default_route(spec, vm)
    return s


# -- the router namespace ---------------------------------------------------------------

def tenant_vms(spec: LabSpec, tenant: str) -> List[VM]:
    return [v for v in spec.vms if v.tenant == tenant]


def router_setup(spec: LabSpec, tenant: str, variant: str, nft_sets: bool = False) -> NsSetup:
    """nft_sets: the nftables variant folds runs of rules that differ only in their source
    into one statement over a set (`nft_rule_runs`); the lab's comparison keeps one
    statement per rule, the benchmark measures the folded form."""
    if variant not in VARIANTS:
        raise RenderError(f"unknown kernel variant {variant!r} (known: {', '.join(VARIANTS)})")
    check_renderable(spec, tenant)
    st = spec.state
    vms = tenant_vms(spec, tenant)
    s = NsSetup(router_ns(spec.prefix, variant, tenant), sysctls=list(QUIET_SYSCTLS) + [
        ("net.ipv4.ip_forward", "1"),
        ("net.ipv6.conf.all.forwarding", "1"),
        ("net.ipv6.conf.all.proxy_ndp", "1"),
        ("net.ipv6.conf.default.proxy_ndp", "1"),
    ])
    for vm in vms:
        s.late_sysctls.append((f"net.ipv4.conf.{vm.port}.proxy_arp", "1"))
        # Answer proxy requests at once, not after a random delay of up to 0.8 s (a
        # namespace has no neigh/default: per interface).
        s.late_sysctls.append((f"net.ipv4.neigh.{vm.port}.proxy_delay", "0"))
        s.late_sysctls.append((f"net.ipv6.neigh.{vm.port}.proxy_delay", "0"))
    by_port = {vm.port: vm for vm in vms}
    for e in st.endpoints:
        if e.tenant != tenant:
            continue
        if e.port not in by_port:
            raise RenderError(f"endpoint {tenant}/{e.ip}: port {e.port} has no VM in the lab")
        host = "/32" if e.ip.version == 4 else "/128"
        s.ip_batch.append(f"route add {e.ip}{host} dev {e.port}")
        s.ip_batch.append(f"neigh replace {e.ip} lladdr {e.mac} dev {e.port} nud permanent")
        if e.ip.version == 6:
            for other in vms:
                if other.port != e.port:
                    s.ip_batch.append(f"neigh add proxy {e.ip} dev {other.port}")
    for r in st.routes:
        if r.tenant != tenant:
            continue
        if r.action == "via":
            via_port = next(e.port for e in st.endpoints
                            if e.tenant == tenant and e.ip == r.via)
            s.ip_batch.append(f"route add {r.prefix} via {r.via} dev {via_port}")
        else:
            # `kernel`: the node's own stack, which forwards nothing for tenants in the lab.
            s.ip_batch.append(f"route add blackhole {r.prefix}")
    # A tenant with floating IPs or SNAT reaches the external network through the
    # gateway namespace (netns_lab/external.py); any other: nowhere.
    s.ip_batch += external.router_uplink(spec, tenant, variant) or ["route add blackhole default"]
    s.ip_batch.append("route add blackhole ::/0")
    default = st.tenant(tenant).default
    if variant == "iptables":
        s.firewall.append((["iptables-restore"], iptables(spec, tenant, 4, default)))
        s.firewall.append((["ip6tables-restore"], iptables(spec, tenant, 6, default)))
        s.firewall.append((["arptables-restore"], arptables(spec, tenant)))
    else:
        s.firewall.append((["nft", "-f", "-"], nftables(spec, tenant, default, nft_sets)))
    return s


def _ports(lo_hi: Tuple[int, int]) -> Optional[str]:
    return None if lo_hi == (0, 65535) else (
        str(lo_hi[0]) if lo_hi[0] == lo_hi[1] else f"{lo_hi[0]}:{lo_hi[1]}")


def _comment(rule: Rule) -> str:
    text = f"rule {rule.id}" + (f": {rule.comment}" if rule.comment else "")
    return '"' + text.replace('"', "'")[:250] + '"'


def _verdict(rule: Rule) -> str:
    # `pass` hands a flow to the node's stack, which forwards nothing for tenants here.
    return "ACCEPT" if rule.action == "allow" else "DROP"


def iptables_match(rule: Rule) -> List[str]:
    """A rule's match as iptables arguments."""
    a = []
    if rule.in_port:
        a.append(f"-i {rule.in_port}")
    if rule.src != ANY:
        a.append(f"-s {rule.src}")
    if rule.dst != ANY:
        a.append(f"-d {rule.dst}")
    if rule.proto:
        a.append("-p " + {1: "icmp", 6: "tcp", 17: "udp", 58: "ipv6-icmp"}.get(
            rule.proto, str(rule.proto)))
    if _ports(rule.sport):
        a.append(f"--sport {_ports(rule.sport)}")
    if _ports(rule.dport):
        a.append(f"--dport {_ports(rule.dport)}")
    if rule.icmp_type is not None:
        kind = f"{rule.icmp_type}" + ("" if rule.icmp_code is None else f"/{rule.icmp_code}")
        a.append(("--icmp-type " if rule.proto == 1 else "--icmpv6-type ") + kind)
    return a


def iptables_rule(rule: Rule, family: int, chain: str) -> Optional[str]:
    """One rule as an iptables-restore line, or None when it is of the other family."""
    if family not in rule_families(rule):
        return None
    return " ".join([f"-A {chain}"] + iptables_match(rule) +
                    [f"-m comment --comment {_comment(rule)}", f"-j {_verdict(rule)}"])


# Rate limits. The datapath charges a packet it passes or forwards to the limit of the
# rule that allowed its flow (the flow's own direction: the first rule in the datapath's
# order its original direction matches) and then to its tenant's; denied traffic costs
# nothing. The kernel path does the same in a chain before conntrack's shortcut, so
# established packets are charged too: replies and related ICMP errors go straight to the
# tenant's limit, an original-direction packet walks the rules in order and the first match decides (an
# allow: its own limit, then the tenant's; a deny or pass: nothing). iptables uses
# hashlimit with one bucket (no --hashlimit-mode), nftables `limit rate over`.
# Their buckets are token buckets like the datapath's GCRA: `burst` packets (or bytes)
# deep, full at the start. Byte limits differ: the kernel's hold a second's worth more
# than the burst (hashlimit wants a burst of at least a second; nft_limit sizes its byte
# buckets rate + burst), so the comparison's scenarios use packet limits.

def _limited(spec: LabSpec, tenant: str) -> bool:
    t = spec.state.tenant(tenant)
    return (t is not None and t.rate is not None) or any(
        r.rate is not None for r in rule_order(spec.state, tenant))


def _hashlimit(name: str, rate: str, burst: Optional[int]) -> str:
    unit, n = rate_value(rate)
    b = burst_of(rate, burst)
    if unit == "pps":
        return f"-m hashlimit --hashlimit-above {n}/second --hashlimit-burst {b} " \
               f"--hashlimit-name {name}"
    # Byte mode: a rate in bytes/s ("b/s"), a burst in bytes ("b"), which hashlimit
    # wants at least a second's worth: its bucket is a second's worth deeper than ours.
    return f"-m hashlimit --hashlimit-above {n // 8}b/s --hashlimit-burst {n // 8 + b}b " \
           f"--hashlimit-name {name}"


def iptables_limits(spec: LabSpec, tenant: str, family: int) -> Tuple[List[str], List[str]]:
    """The filter table's rate-limit chains of a tenant: their declarations, and their
    lines with the FORWARD jump that goes first; nothing when nothing is limited."""
    if not _limited(spec, tenant):
        return [], []
    t = spec.state.tenant(tenant)
    rl, rt = f"xf-rl-{tenant}"[:28], f"xf-rlt-{tenant}"[:28]
    out = [f"-A FORWARD -j {rl}", f"-A {rl} -m conntrack --ctdir REPLY -g {rt}",
           f"-A {rl} -m conntrack --ctstate RELATED -g {rt}"]
    for rule in rule_order(spec.state, tenant):
        if family not in rule_families(rule):
            continue
        m = " ".join([f"-A {rl}"] + iptables_match(rule))
        if rule.rate is not None:
            out.append(f"{m} {_hashlimit(f'xf{family}-r{rule.id}', rule.rate, rule.burst)} "
                       f"-m comment --comment \"rate limit of rule {rule.id}\" -j DROP")
        out.append(f"{m} -g {rt}" if rule.action == "allow" else f"{m} -j RETURN")
    if t.rate is not None:
        # One bucket for both families: hashlimit buckets are per name and family, so the
        # IPv6 side shares it only in the datapath (a documented gap of the kernel path).
        out.append(f"-A {rt} {_hashlimit(f'xf{family}-t{t.id}', t.rate, t.burst)} "
                   f"-m comment --comment \"rate limit of tenant {tenant}\" -j DROP")
    return [f":{rl} - [0:0]", f":{rt} - [0:0]"], out


# IPv6 link-local sources: a VM's own (neighbour discovery comes from it), tied to the
# port by the MAC check, as the datapath's port security allows them.
LINK_LOCAL = "fe80::/64"


def _port(spec: LabSpec, vm: VM):
    return next(p for p in spec.state.ports if p.name == vm.port)


def port_secured(spec: LabSpec, vm: VM) -> bool:
    """Port security is on unless the port says `port_security = false` (a state
    without the field: on)."""
    return getattr(_port(spec, vm), "port_security", True)


def allowed_sources(spec: LabSpec, vm: VM, family: int) -> List[str]:
    """The source prefixes a VM's port accepts: its endpoints' addresses, the port's
    `allow` prefixes (allowed address pairs) and, for IPv6, link-local."""
    host = "/32" if family == 4 else "/128"
    srcs = [a + host for a in vm.addrs if ipaddress.ip_address(a).version == family]
    srcs += [str(n) for n in getattr(_port(spec, vm), "allow", ()) if n.version == family]
    if family == 6:
        srcs.append(LINK_LOCAL)
    return srcs


def check_renderable(spec: LabSpec, tenant: str) -> None:
    for vm in tenant_vms(spec, tenant):
        if getattr(_port(spec, vm), "allow_vlan", False):
            raise RenderError(f"port {vm.port}: allow_vlan has no kernel-path rendering (this "
                              f"kernel path has no 802.1Q devices: it drops tagged frames)")


def iptables(spec: LabSpec, tenant: str, family: int, default: str) -> str:
    """iptables-restore (family 4) or ip6tables-restore (6) input for a tenant's router."""
    ttl = "-m ttl --ttl-lt 2" if family == 4 else "-m hl --hl-lt 2"
    out = ["*raw", ":PREROUTING ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
           ":xf-ports - [0:0]",
           f"-A PREROUTING {ttl} -m comment --comment \"TTL would expire: the node's stack, "
           f"which answers nothing here\" -j DROP",
           "-A PREROUTING -j xf-ports"]
    for vm in tenant_vms(spec, tenant):
        if not port_secured(spec, vm):
            continue
        out.append(f"-A xf-ports -i {vm.port} -m mac ! --mac-source {vm.mac} "
                   f"-m comment --comment \"spoof: {vm.name}'s MAC only\" -j DROP")
        for src in allowed_sources(spec, vm, family):
            out.append(f"-A xf-ports -i {vm.port} -s {src} -j RETURN")
        out.append(f"-A xf-ports -i {vm.port} -m comment --comment "
                   f"\"spoof: {vm.name}'s addresses only\" -j DROP")
    out.append("COMMIT")
    chain = f"xf-sg-{tenant}"[:28]
    rl_chains, rl_lines = iptables_limits(spec, tenant, family)
    out += ["*filter",
            # The router answers nothing itself but neighbour solicitations (proxy ND).
            ":INPUT DROP [0:0]", ":FORWARD DROP [0:0]", ":OUTPUT ACCEPT [0:0]",
            f":{chain} - [0:0]"] + rl_chains
    if family == 6:
        out.append("-A INPUT -p ipv6-icmp --icmpv6-type 135 -m hl --hl-eq 255 -j ACCEPT")
    out += rl_lines
    out.append("-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT")
    out.append(f"-A FORWARD -j {chain}")
    for rule in rule_order(spec.state, tenant):
        line = iptables_rule(rule, family, chain)
        if line:
            out.append(line)
    out.append(f"-A FORWARD -m comment --comment \"tenant default: {default} (pass: the "
               f"node's stack, which forwards nothing here)\" -j DROP")
    out.append("COMMIT")
    return "\n".join(out) + "\n"


def arp_sources(spec: LabSpec, vm: VM) -> List[str]:
    """The sender addresses an ARP packet from a VM may claim: its IPv4 sources, and
    0.0.0.0 (a probe claims none)."""
    return allowed_sources(spec, vm, 4) + ["0.0.0.0/32"]


def arptables(spec: LabSpec, tenant: str) -> str:
    """arptables-restore input: ARP from a VM port carries its MAC as sender and one of its
    addresses (Neutron's ARP spoofing protection); anything else is not answered."""
    out = ["*filter", ":INPUT ACCEPT", ":OUTPUT ACCEPT", ":FORWARD ACCEPT"]
    for vm in tenant_vms(spec, tenant):
        if not port_secured(spec, vm):
            continue
        out.append(f"-A INPUT -i {vm.port} ! --source-mac {vm.mac} -j DROP")
        out += [f"-A INPUT -i {vm.port} -s {a} -j ACCEPT" for a in arp_sources(spec, vm)]
        out.append(f"-A INPUT -i {vm.port} -j DROP")
    out.append("COMMIT")
    return "\n".join(out) + "\n"


def nft_rule(rule: Rule) -> List[str]:
    """One rule as nft statements, one per family it applies to."""
    verdict = "accept" if rule.action == "allow" else "drop"
    return [" ".join(m + [f"counter {verdict}", f"comment {_comment(rule)}"])
            for m in nft_matches(rule)]


def nft_matches(rule: Rule) -> List[List[str]]:
    """A rule's match as nft expressions, one list per family it applies to."""
    out = []
    for fam in rule_families(rule):
        ipk = "ip" if fam == 4 else "ip6"
        m = []
        if rule.in_port:
            m.append(f'iifname "{rule.in_port}"')
        if rule.src != ANY:
            m.append(f"{ipk} saddr {rule.src}")
        if rule.dst != ANY:
            m.append(f"{ipk} daddr {rule.dst}")
        if rule.src == ANY and rule.dst == ANY and rule.proto not in (1, 58):
            m.append(f"meta nfproto ipv{fam}")      # an inet chain sees both families
        if rule.proto in (6, 17):
            l4 = "tcp" if rule.proto == 6 else "udp"
            m.append(f"meta l4proto {l4}")
            for key, rng in (("sport", rule.sport), ("dport", rule.dport)):
                if _ports(rng):
                    m.append(f"{l4} {key} {_ports(rng).replace(':', '-')}")
        elif rule.proto in (1, 58):
            kw = "icmp" if rule.proto == 1 else "icmpv6"
            m.append(f"meta l4proto {kw}")
            if rule.icmp_type is not None:
                m.append(f"{kw} type {rule.icmp_type}")
                if rule.icmp_code is not None:
                    m.append(f"{kw} code {rule.icmp_code}")
        elif rule.proto:
            m.append(f"meta l4proto {rule.proto}")
        out.append(m)
    return out


def _nft_limit(name: str, rate: str, burst: Optional[int]) -> str:
    """A named limit object: the statements of both families share its one bucket."""
    unit, n = rate_value(rate)
    b = burst_of(rate, burst)
    spec = f"{n}/second burst {b} packets" if unit == "pps" else \
        f"{n // 8} bytes/second burst {b} bytes"
    return f"  limit {name} {{ rate over {spec} }}"


def nft_limits(spec: LabSpec, tenant: str) -> Tuple[List[str], List[str]]:
    """A tenant's rate limits (see iptables_limits): the forward chain's first statement,
    and the limit objects and two chains, or nothing when nothing of the tenant is
    limited."""
    if not _limited(spec, tenant):
        return [], []
    t = spec.state.tenant(tenant)
    rl, rt = f"rl_{tenant}", f"rlt_{tenant}"
    objs, lines = [], [f"  chain {rl} {{", f"    ct direction reply goto {rt}",
                       f"    ct state related goto {rt}"]
    for rule in rule_order(spec.state, tenant):
        if rule.rate is not None:
            objs.append(_nft_limit(f"rule{rule.id}", rule.rate, rule.burst))
        for m in nft_matches(rule):
            if rule.rate is not None:
                lines.append("    " + " ".join(m + [f'limit name "rule{rule.id}" counter drop',
                                                   f'comment "rate limit of rule {rule.id}"']))
            lines.append("    " + " ".join(m + [f"goto {rt}" if rule.action == "allow"
                                                  else "return"]))
    lines += ["  }", f"  chain {rt} {{"]
    if t.rate is not None:
        objs.append(_nft_limit(f"tenant{t.id}", t.rate, t.burst))
        lines.append(f'    limit name "tenant{t.id}" counter drop '
                     f'comment "rate limit of tenant {tenant}"')
    lines.append("  }")
    return [f"    jump {rl}"], objs + lines


def _fold_key(rule: Rule) -> Tuple:
    """What a rule is besides its source (and id and comment): rules alike in all of it
    and next to each other in the datapath's order give the same verdict to any packet
    either matches, so one statement over a set of their sources is the same chain."""
    return (rule.action, rule.dst, rule.proto, rule.sport, rule.dport, rule.icmp_type,
            rule.icmp_code, rule.in_port, rule_families(rule))


def nft_rule_runs(rules: List[Rule]) -> List[str]:
    """nft statements for rules in the datapath's order, each run of two or more rules
    that differ only in a (non-"any") source folded into one statement over a set."""
    out: List[str] = []
    i = 0
    while i < len(rules):
        run = [rules[i]]
        while (i + len(run) < len(rules) and rules[i].src != ANY
               and rules[i + len(run)].src != ANY
               and _fold_key(rules[i + len(run)]) == _fold_key(rules[i])):
            run.append(rules[i + len(run)])
        first = run[0]
        if len(run) == 1:
            out += nft_rule(first)
        else:
            ipk = "ip" if first.src.version == 4 else "ip6"
            srcs = ", ".join(str(r.src) for r in run)
            comment = f'"rules {first.id}..{run[-1].id}: {len(run)} sources as a set"'
            for stmt in nft_rule(first):
                out.append(stmt.replace(f"{ipk} saddr {first.src} ", f"{ipk} saddr {{ {srcs} }} ")
                           .replace(_comment(first), comment))
        i += len(run)
    return out


def nftables(spec: LabSpec, tenant: str, default: str, sets: bool = False) -> str:
    """`nft -f` input for a tenant's router: one inet table, sets for the ports' allowed
    sources, one chain for the tenant's rules."""
    vms = [vm for vm in tenant_vms(spec, tenant) if port_secured(spec, vm)]
    chain = f"sg_{tenant}"

    def src_set(name: str, family: int) -> str:
        elems = [f'"{vm.port}" . {vm.mac} . {a}' for vm in vms
                 for a in allowed_sources(spec, vm, family)]
        return (f"  set {name} {{ type ifname . ether_addr . ipv{family}_addr; flags interval; "
                + (f"elements = {{ {', '.join(elems)} }} " if elems else "") + "}")
    ports = ", ".join(f'"{vm.port}"' for vm in vms)
    rl_jump, rl_chains = nft_limits(spec, tenant)
    lines = ["table inet xdpflow {",
             "  set vm_ports { type ifname; " + (f"elements = {{ {ports} }} " if ports else "")
             + "}",
             src_set("vm_src4", 4), src_set("vm_src6", 6),
             "  chain prerouting {",
             "    type filter hook prerouting priority raw; policy accept;",
             "    ip ttl < 2 drop comment \"TTL would expire: the node's stack answers "
             "nothing here\"",
             "    ip6 hoplimit < 2 drop",
             "    iifname != @vm_ports accept",
             "    meta nfproto ipv4 iifname . ether saddr . ip saddr != @vm_src4 drop "
             "comment \"spoof\"",
             "    meta nfproto ipv6 iifname . ether saddr . ip6 saddr != @vm_src6 drop "
             "comment \"spoof\"",
             "  }",
             "  chain input {",
             "    type filter hook input priority filter; policy drop;",
             "    icmpv6 type nd-neighbor-solicit ip6 hoplimit 255 accept",
             "  }",
             "  chain forward {",
             "    type filter hook forward priority filter; policy drop;"] + rl_jump + [
             "    ct state established,related accept",
             f"    jump {chain}",
             "  }"] + rl_chains + [
             f"  chain {chain} {{"]
    ordered = rule_order(spec.state, tenant)
    stmts = nft_rule_runs(ordered) if sets else [st for r in ordered for st in nft_rule(r)]
    lines += [f"    {stmt}" for stmt in stmts]
    lines += [f"    counter drop comment \"tenant default: {default}\"", "  }", "}"]
    arp = [f'"{vm.port}" . {vm.mac} . {a}' for vm in vms for a in arp_sources(spec, vm)]
    lines += ["table arp xdpflow {",
              "  set vm_ports { type ifname; " + (f"elements = {{ {ports} }} " if ports else "")
              + "}",
              "  set vm_arp { type ifname . ether_addr . ipv4_addr; flags interval; "
              + (f"elements = {{ {', '.join(arp)} }} " if arp else "") + "}",
              "  chain input {",
              "    type filter hook input priority filter; policy accept;",
              "    iifname != @vm_ports accept",
              "    iifname . arp saddr ether . arp saddr ip != @vm_arp drop comment \"spoof\"",
              "  }",
              "}"]
    return "\n".join(lines) + "\n"


def kernel_setups(spec: LabSpec, variant: str) -> List[NsSetup]:
    """Every router, then the gateway to the external network if the lab has one (its
    setup uses the links the routers' setups make)."""
    gw = external.gw_setup(spec, variant)
    return [router_setup(spec, t.name, variant) for t in spec.state.tenants
            if tenant_vms(spec, t.name)] + ([gw] if gw else [])


def all_tenants(spec: LabSpec) -> Iterable[str]:
    return [t.name for t in spec.state.tenants]


def vm_ports_by_ns(spec: LabSpec, path: str) -> Dict[str, Tuple[str, str]]:
    """VM namespace -> (the node-side namespace, port) of its wire on this path."""
    out = {}
    for vm in spec.vms:
        side = (ns_name(spec.prefix, path, "node") if path == "offload"
                else router_ns(spec.prefix, path, vm.tenant))
        out[ns_name(spec.prefix, path, vm.name)] = (side, vm.port)
    return out
