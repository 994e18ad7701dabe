"""Model -> datapath map entries. Pure Python, no BPF: rules become tuple-space masks and
exact-match entries (port ranges as prefixes), endpoints and routes become keys and values
of their maps. The output is bytes, ready for the map layer to diff and write in batches."""
from __future__ import annotations

import ctypes as ct
import ipaddress
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

from . import abi, model

FULL16 = 0xFFFF


class CompileError(model.Conflict):
    """The state is well-formed but the datapath cannot hold it (e.g. too many masks)."""


@dataclass(frozen=True)
class PortLink:
    """What the node knows about a port's interface: the agent's links layer fills it."""
    name: str
    ifindex: int
    mac: str
    slot: int
    addrs: Tuple[str, ...] = ()   # addresses configured on it: the node's own, in-tenant
    mtu: int = 1500


def range_to_prefixes(lo: int, hi: int, bits: int = 16) -> List[Tuple[int, int]]:
    """Cover [lo, hi] with the fewest (value, mask) prefixes of a `bits`-wide field."""
    full = (1 << bits) - 1
    out = []
    while lo <= hi:
        size = lo & -lo if lo else 1 << bits
        while lo + size - 1 > hi:
            size >>= 1
        out.append((lo, full ^ (size - 1)))
        lo += size
    return out


def prefix_mask(net: model.IPNet) -> Tuple[bytes, bytes]:
    """(address, mask), 16 bytes each, in the IPv4-mapped space of the datapath keys."""
    if net.version == 6 and net.prefixlen == 0:
        return b"\0" * 16, b"\0" * 16             # any address, either family
    bits = net.prefixlen + (96 if net.version == 4 else 0)
    mask = ((1 << 128) - 1) ^ ((1 << (128 - bits)) - 1)
    return abi.addr16(net.network_address), mask.to_bytes(16, "big")


def _and(a: bytes, m: bytes) -> bytes:
    return bytes(x & y for x, y in zip(a, m))


MaskTuple = Tuple[bytes, bytes, int, int, int, int]       # src, dst, sport, dport, proto, in_port


@dataclass
class Classifier:
    """One tenant's tuple space, independent of generation: masks highest-ranked first,
    and entries keyed by (mask index, masked tuple)."""
    masks: List[Tuple[MaskTuple, int]] = field(default_factory=list)   # (mask, max_rank)
    entries: Dict[Tuple, Tuple[int, int, int]] = field(default_factory=dict)
    # entry key: (mask_idx, proto, in_port, src, dst, sport, dport) -> (rank, rule_id, action)

    def mask_set(self, max_masks: int):
        ms = abi.mask_set_type(max_masks)()
        ms.count = len(self.masks)
        for i, ((src, dst, sp, dp, proto, inp), rank) in enumerate(self.masks):
            m = ms.masks[i]
            abi.set_addr(m.src, src)
            abi.set_addr(m.dst, dst)
            m.sport, m.dport, m.proto, m.in_port, m.max_rank = sp, dp, proto, inp, rank
        return ms

    def rule_ids(self) -> Set[int]:
        return {rid for _, rid, _ in self.entries.values()}

    def rule_items(self, tenant_id: int, generation: int,
                   stat_of: Optional[Dict[int, int]] = None) -> Iterable[Tuple[bytes, bytes]]:
        """Classifier entries; stat_of: rule id -> its counter slot (the map layer's)."""
        stat_of = stat_of or {}
        for (idx, proto, inp, src, dst, sp, dp), (rank, rid, action) in self.entries.items():
            k = abi.RuleKey(generation=generation, tenant=tenant_id, mask_idx=idx, proto=proto,
                            in_port=inp, sport=sp, dport=dp)
            abi.set_addr(k.src, src)
            abi.set_addr(k.dst, dst)
            yield bytes(k), bytes(abi.Rule(rank=rank, rule_id=rid, action=action,
                                           stat=stat_of.get(rid, 0)))


def assign_stat_slots(rule_ids: Iterable[int], have: Dict[int, int],
                      capacity: int = abi.RULE_STATS) -> Tuple[Dict[int, int], List[int]]:
    """Counter slots for rules: those in `have` keep theirs, new ids get the smallest free
    ones (1 .. capacity - 1; beyond that 0, not counted). Returns (id -> slot, the slots
    newly assigned), which start from zero: a rule id given again counts afresh."""
    ids = set(rule_ids)
    out = {rid: slot for rid, slot in have.items() if rid in ids and slot}
    used = set(out.values())
    fresh, slot = [], 1
    for rid in sorted(ids - set(out)):
        while slot in used:
            slot += 1
        if slot >= capacity:
            out[rid] = 0
            continue
        out[rid] = slot
        used.add(slot)
        fresh.append(slot)
    return out, fresh


def rank_rules(rules: Sequence[model.Rule]) -> Dict[int, int]:
    """rule id -> rank: unique, higher wins; the highest priority first, then the lower id."""
    order = sorted(rules, key=lambda r: (-r.priority, r.id))
    return {r.id: len(order) - i for i, r in enumerate(order)}


def compile_rules(tenant: str, rules: Sequence[model.Rule], slots: Dict[str, int],
                  max_masks: int, max_entries: Optional[int] = None) -> Classifier:
    """One tenant's classifier. With `max_entries`, a rule set that expands (port ranges
    into prefixes) to more entries is refused as soon as it gets there, before the rest
    is built: an oversized state costs no more than the datapath could hold."""
    ranks = rank_rules(rules)
    by_mask: Dict[MaskTuple, Dict[Tuple, Tuple[int, int, int]]] = {}
    made = 0
    for r in rules:
        src, srcm = prefix_mask(r.src)
        dst, dstm = prefix_mask(r.dst)
        proto, protom = (r.proto, 0xFF) if r.proto else (0, 0)
        if r.in_port is not None:
            inp, inpm = slots[r.in_port], FULL16
        else:
            inp, inpm = 0, 0
        if r.proto in (1, 58):
            sports = [(0, 0)]
            if r.icmp_type is None:
                dports = [(0, 0)]
            elif r.icmp_code is None:
                dports = [(r.icmp_type << 8, 0xFF00)]
            else:
                dports = [((r.icmp_type << 8) | r.icmp_code, FULL16)]
        elif r.proto in (6, 17):
            sports = range_to_prefixes(*r.sport) if r.sport != (0, 65535) else [(0, 0)]
            dports = range_to_prefixes(*r.dport) if r.dport != (0, 65535) else [(0, 0)]
        else:
            sports = dports = [(0, 0)]
        value = (ranks[r.id], r.id, abi.RULE_ACTIONS[r.action])
        for sp, spm in sports:
            for dp, dpm in dports:
                mask = (srcm, dstm, spm, dpm, protom, inpm)
                key = (proto & protom, inp & inpm, _and(src, srcm), _and(dst, dstm),
                       sp & spm, dp & dpm)
                entries = by_mask.setdefault(mask, {})
                old = entries.get(key)
                # Same masked key: every packet matching one matches the other; keep the
                # one that would win.
                if old is None or old[0] < value[0]:
                    entries[key] = value
                made += old is None
                if max_entries is not None and made > max_entries:
                    raise CompileError(
                        f"tenant {tenant}", f"its rules expand to more than {max_entries} "
                        f"classifier entries (port ranges become prefixes); the datapath "
                        f"holds {max_entries} (datapath.max_rule_entries)")
    if len(by_mask) > max_masks:
        raise CompileError(
            f"tenant {tenant}",
            f"its rules need {len(by_mask)} distinct masks (prefix lengths x port-range "
            f"prefixes x protocol x in_port); the datapath holds {max_masks} per tenant "
            f"(datapath.max_masks). Share prefix lengths or port ranges between rules.")
    masks = sorted(((m, max(v[0] for v in ents.values())) for m, ents in by_mask.items()),
                   key=lambda mr: (-mr[1], mr[0]))
    cls = Classifier(masks=masks)
    for idx, (m, _) in enumerate(masks):
        for (proto, inp, src, dst, sp, dp), v in by_mask[m].items():
            cls.entries[(idx, proto, inp, src, dst, sp, dp)] = v
    return cls


@dataclass
class Image:
    """Everything the datapath's configuration maps should hold (flows and counters are
    the datapath's own). Keys and values are the bytes of the abi structs."""
    ports: Dict[bytes, bytes] = field(default_factory=dict)
    port_src: Dict[bytes, bytes] = field(default_factory=dict)     # port security
    endpoints: Dict[bytes, bytes] = field(default_factory=dict)
    routes: Dict[bytes, bytes] = field(default_factory=dict)
    vnis: Dict[bytes, bytes] = field(default_factory=dict)         # decap's checks
    tenants: Dict[int, "TenantImage"] = field(default_factory=dict)


@dataclass
class TenantImage:
    id: int
    name: str
    default_verdict: int
    vni: int
    classifier: Classifier


# IPv6 link-local sources (fe80::/64): a VM's own, tied to its MAC by the MAC check.
LINK_LOCAL = ipaddress.ip_network("fe80::/64")


def src_key(slot: int, mac: str, net: model.IPNet) -> bytes:
    bits = net.prefixlen + (96 if net.version == 4 else 0)
    k = abi.SrcKey(prefixlen=16 + 48 + bits, slot=slot)
    ct.memmove(k.mac, abi.mac_bytes(mac), 6)
    abi.set_addr(k.addr, net.network_address)
    return bytes(k)


def port_sources(state: model.State, links: Dict[str, PortLink]) -> Dict[bytes, bytes]:
    """Port security beyond the endpoints (which the datapath checks in xf_endpoints):
    the (slot, MAC, source prefix) entries of each secured port's allowed prefixes and
    link-local prefix, with the MAC of each of its endpoints."""
    out: Dict[bytes, bytes] = {}
    one = bytes(ct.c_uint32(1))
    ports = {p.name: p for p in state.ports if p.port_security and p.name in links}
    macs: Dict[str, List[str]] = {name: [] for name in ports}
    for e in state.sorted("endpoints"):
        if e.port in ports and e.mac not in macs[e.port]:
            macs[e.port].append(e.mac)
    for name, p in ports.items():
        for mac in macs[name]:
            for net in p.allow + (LINK_LOCAL,):
                out[src_key(links[name].slot, mac, net)] = one
    return out


def _be32(ip) -> int:
    """An IPv4 address as the datapath's __be32 field holds it (network order in memory)."""
    return int.from_bytes(ip.packed, "little")


def remote_endpoints(state: model.State, links: Dict[str, PortLink],
                     neighbours: Dict[str, str]) -> Dict[bytes, bytes]:
    """Remote endpoints: out of the uplink, with the outer headers' addresses, the VNI
    and the underlay neighbour's MAC (zero while unresolved: the datapath then hands
    the packet to the kernel, which resolves it). None while the uplink has no link."""
    up = state.uplink()
    link = links.get(up.name) if up is not None else None
    if link is None:
        return {}
    vnis = {t.name: (t.id, t.vni) for t in state.tenants}
    out = {}
    for e in state.sorted("endpoints"):
        if e.vtep is None:
            continue
        tid, vni = vnis[e.tenant]
        k = abi.EpKey(tenant=tid)
        abi.set_addr(k.addr, e.ip)
        v = abi.Endpoint(ifindex=link.ifindex, port=link.slot, flags=abi.EP_REMOTE,
                         vtep=_be32(e.vtep), vni=vni)
        ct.memmove(v.mac, abi.mac_bytes(e.mac), 6)
        ct.memmove(v.port_mac, abi.mac_bytes(link.mac), 6)
        nmac = neighbours.get(str(e.vtep))
        if nmac:
            ct.memmove(v.vtep_mac, abi.mac_bytes(nmac), 6)
        out[bytes(k)] = bytes(v)
    return out


def vni_entries(state: model.State) -> Dict[bytes, bytes]:
    """Decap's checks: (VNI, 0) -> tenant for every tenant with a VNI, and (VNI, VTEP) ->
    tenant for every VTEP behind which the tenant has a remote endpoint."""
    out = {}
    by_name = {t.name: t for t in state.tenants}
    for t in state.tenants:
        if t.vni is not None:
            out[bytes(abi.VniKey(vni=t.vni))] = bytes(ct.c_uint32(t.id))
    for e in state.endpoints:
        t = by_name[e.tenant]
        if e.vtep is not None and t.vni is not None:
            out[bytes(abi.VniKey(vni=t.vni, vtep=_be32(e.vtep)))] = bytes(ct.c_uint32(t.id))
    return out


def compile_state(state: model.State, links: Dict[str, PortLink],
                  max_masks: int = abi.DEFAULT_MAX_MASKS,
                  slots: Optional[Dict[str, int]] = None,
                  max_entries: Optional[int] = None,
                  neighbours: Optional[Dict[str, str]] = None) -> Image:
    """The whole image. Ports without a live interface (not in `links`) are left out, and
    so are endpoints behind them: nothing can be sent there yet. Rules name ports by
    `slots` (the store's, every configured port), so an in_port rule compiles whether or
    not its port's interface exists; without `slots`, the live links' slots. With
    `max_entries`, the classifier entries of all tenants together are bounded.
    `neighbours`: VTEP address -> the underlay neighbour's MAC, as the node resolved it."""
    state.validate()
    img = Image()
    tenants = {t.name: t for t in state.tenants}
    if slots is None:
        slots = {name: link.slot for name, link in links.items()}

    for p in state.sorted("ports"):
        link = links.get(p.name)
        if link is None:
            continue
        if p.uplink:
            v = abi.Port(tenant=0, slot=link.slot, flags=abi.PORT_UPLINK, mtu=link.mtu)
            ct.memmove(v.mac, abi.mac_bytes(link.mac), 6)
            abi.set_addr(v.local_ip, p.local_ip)
            img.ports[bytes(ct.c_uint32(link.ifindex))] = bytes(v)
            continue
        t = tenants[p.tenant]
        flags = (abi.PORT_SECURITY if p.port_security else 0) | \
            (abi.PORT_VLAN if p.allow_vlan else 0) | \
            (abi.PORT_TENANT_DROP if t.default != "pass" else 0)
        v = abi.Port(tenant=t.id, slot=link.slot, flags=flags)
        ct.memmove(v.mac, abi.mac_bytes(link.mac), 6)
        img.ports[bytes(ct.c_uint32(link.ifindex))] = bytes(v)
        # The node's own addresses on a tenant port: traffic to them is the kernel's.
        for a in link.addrs:
            ip = ipaddress.ip_address(a)
            k = abi.EpKey(tenant=t.id)
            abi.set_addr(k.addr, ip)
            img.endpoints[bytes(k)] = bytes(abi.Endpoint(ifindex=link.ifindex, port=link.slot,
                                                         flags=abi.EP_LOCAL))

    img.endpoints.update(remote_endpoints(state, links, neighbours or {}))
    img.vnis = vni_entries(state)
    for e in state.sorted("endpoints"):
        link = links.get(e.port)
        if e.vtep is not None or link is None:
            continue
        t = tenants[e.tenant]
        k = abi.EpKey(tenant=t.id)
        abi.set_addr(k.addr, e.ip)
        v = abi.Endpoint(ifindex=link.ifindex, port=link.slot, flags=0)
        ct.memmove(v.mac, abi.mac_bytes(e.mac), 6)
        ct.memmove(v.port_mac, abi.mac_bytes(link.mac), 6)
        img.endpoints[bytes(k)] = bytes(v)

    img.port_src = port_sources(state, links)

    for r in state.sorted("routes"):
        t = tenants[r.tenant]
        bits = r.prefix.prefixlen + (96 if r.prefix.version == 4 else 0)
        k = abi.RouteKey(prefixlen=32 + bits, tenant=t.id)
        abi.set_addr(k.addr, r.prefix.network_address)
        v = abi.Route(action=abi.ROUTE_ACTIONS[r.action])
        if r.via is not None:
            abi.set_addr(v.via, r.via)
        img.routes[bytes(k)] = bytes(v)

    rules_by_tenant: Dict[str, List[model.Rule]] = {t.name: [] for t in state.tenants}
    for r in state.rules:
        rules_by_tenant[r.tenant].append(r)
    left = max_entries
    for t in state.tenants:
        cls = compile_rules(t.name, rules_by_tenant[t.name], slots, max_masks, left)
        if left is not None:
            left -= len(cls.entries)
        img.tenants[t.id] = TenantImage(
            id=t.id, name=t.name,
            default_verdict=abi.V_PASS if t.default == "pass" else abi.V_DROP,
            vni=t.vni or 0, classifier=cls)
    return img
