"""Model -> datapath map entries. Pure Python, no BPF: rules become tuple-space masks and
exact-match entries (port ranges as prefixes), endpoints and routes become keys and values
of their maps. The output is bytes, ready for the map layer to diff and write in batches."""
from __future__ import annotations

import ctypes as ct
import functools
import ipaddress
import struct
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
    if type(net) is model.Net4:     # most prefixes of a big state: without ipaddress's calls
        return abi.V4_MAPPED + net.network_address._ip.to_bytes(4, "big"), \
            _mask16(4, net._prefixlen)
    if net.version == 6 and net.prefixlen == 0:
        return b"\0" * 16, b"\0" * 16             # any address, either family
    return abi.addr16(net.network_address), _mask16(net.version, net.prefixlen)


@functools.lru_cache(maxsize=None)          # 33 + 129 masks at most
def _mask16(version: int, prefixlen: int) -> bytes:
    bits = prefixlen + (96 if version == 4 else 0)
    return (((1 << 128) - 1) ^ ((1 << (128 - bits)) - 1)).to_bytes(16, "big")


@functools.lru_cache(maxsize=4096)
def _port_prefixes(r: Tuple[int, int]) -> Tuple[Tuple[int, int], ...]:
    """A port range's (value, mask) prefixes, (0, 0) for any port: rules share a few
    ranges, computed once each."""
    return ((0, 0),) if r == (0, 65535) else tuple(range_to_prefixes(*r))


def _and(a: bytes, m: bytes) -> bytes:
    return bytes(x & y for x, y in zip(a, m))


MaskTuple = Tuple[bytes, bytes, int, int, int, int]       # src, dst, sport, dport, proto, in_port
EntryKey = Tuple[int, int, bytes, bytes, int, int]        # proto, in_port, src, dst, sport, dport
Value = Tuple[int, int, int]                              # rank, rule id, action


# struct xf_rule_key and struct xf_rule with struct's speed (a 100,000-rule state is
# 100,000 of each); their sizes are checked against the abi's ctypes mirror at import.
_RULE_KEY = struct.Struct("<IHBBHH16s16sHH")
_RULE = struct.Struct("<QIBBHI4x")
assert _RULE_KEY.size == ct.sizeof(abi.RuleKey) and _RULE.size == ct.sizeof(abi.Rule)


def rule_rank(r: model.Rule) -> int:
    """Unique, higher wins: the priority, then the lower id. A function of the rule alone
    (64 bits in the datapath), so adding or removing a rule changes no other rule's entry."""
    return (r.priority << 32) | (0xFFFFFFFF - r.id)


def rule_entries(r: model.Rule, slots: Dict[str, int]) -> List[Tuple[MaskTuple, EntryKey]]:
    """The (mask, masked key) pairs a rule is written as: port ranges become prefixes, one
    entry per (source prefix, destination prefix) pair; a packet matches at most one."""
    src, srcm = prefix_mask(r.src)
    dst, dstm = prefix_mask(r.dst)
    # A prefix's address has no host bits (the model refuses them): it is its own
    # masked value.
    return [((srcm, dstm, spm, dpm, protom, inpm), (proto, inp, src, dst, sp, dp))
            for spm, dpm, protom, inpm, proto, inp, sp, dp in _match_entries(
                r.proto, None if r.in_port is None else slots[r.in_port], r.sport, r.dport,
                r.icmp_type, r.icmp_code)]


@functools.lru_cache(maxsize=4096)
def _match_entries(proto: int, in_slot: Optional[int], sport: Tuple[int, int],
                   dport: Tuple[int, int], icmp_type: Optional[int], icmp_code: Optional[int]
                   ) -> Tuple[Tuple[int, ...], ...]:
    """A rule's entries apart from its addresses: (sport mask, dport mask, proto mask,
    in_port mask, and the masked proto, in_port, sport, dport) each. Rules share a few of
    these (a 100,000-rule state has a handful): computed once each."""
    protom = 0xFF if proto else 0
    inp, inpm = (in_slot, FULL16) if in_slot is not None else (0, 0)
    if proto in (1, 58):
        sports = [(0, 0)]
        if icmp_type is None:
            dports = [(0, 0)]
        elif icmp_code is None:
            dports = [(icmp_type << 8, 0xFF00)]
        else:
            dports = [((icmp_type << 8) | icmp_code, FULL16)]
    elif proto in (6, 17):
        sports, dports = _port_prefixes(sport), _port_prefixes(dport)
    else:
        sports = dports = [(0, 0)]
    return tuple((spm, dpm, protom, inpm, proto & protom, inp & inpm, sp & spm, dp & dpm)
                 for sp, spm in sports for dp, dpm in dports)


def order_masks(max_rank: Dict[MaskTuple, int]) -> List[Tuple[MaskTuple, int]]:
    """The order the datapath searches masks in: highest best rank first (it stops once
    its best match outranks every mask left). The one place the order is decided."""
    return sorted(max_rank.items(), key=lambda mr: (-mr[1], mr[0]))


class Classifier:
    """One tenant's tuple space, independent of generation, kept so that one rule can be
    added or removed in time proportional to its own entries: per mask, the winning value
    of each masked key; the values a key's winner hides (rules whose entries coincide:
    every packet matching one matches the other), so removing the winner brings the next
    back; each mask's best rank; and the key index each mask's entries are keyed by (kept
    across reorderings; a from-scratch compile numbers masks in search order)."""

    def __init__(self):
        self.by_mask: Dict[MaskTuple, Dict[EntryKey, Value]] = {}
        self.hidden: Dict[Tuple[MaskTuple, EntryKey], List[Value]] = {}
        self.max_rank: Dict[MaskTuple, int] = {}
        self.key_idx: Dict[MaskTuple, int] = {}
        self.size = 0                      # entries (winning keys) in all masks
        self.reserved: Set[int] = set()    # key indexes a new mask may not take (yet)
        self.policed: Set[int] = set()     # ids of rules with a rate limit

    # -- changes: each returns the (mask, key) pairs whose winner it changed -----------
    def add_rule(self, r: model.Rule, slots: Dict[str, int]) -> List[Tuple[MaskTuple, EntryKey]]:
        touched: List[Tuple[MaskTuple, EntryKey]] = []
        self.insert((r,), slots, touched)
        for mask in self.by_mask:
            if mask not in self.key_idx:    # a new mask: the smallest index not in use
                used = set(self.key_idx.values()) | self.reserved
                self.key_idx[mask] = next(i for i in range(len(used) + 1) if i not in used)
        return touched

    def insert(self, rules: Iterable[model.Rule], slots: Dict[str, int],
               touched: Optional[List[Tuple[MaskTuple, EntryKey]]] = None,
               max_entries: Optional[int] = None, tenant: str = "") -> None:
        """The rules' entries in; each entry whose winner changed goes to `touched`. New
        masks get no key index (add_rule's, or number_masks' for a whole compile). Past
        `max_entries` entries: refused, the rest not built. One loop for one rule or a
        100,000 (no call per rule or entry)."""
        by_mask, hidden, max_rank, actions = self.by_mask, self.hidden, self.max_rank, \
            abi.RULE_ACTIONS
        size = self.size
        for r in rules:
            rank = rule_rank(r)
            value = (rank, r.id, actions[r.action])
            if r.rate is not None:
                self.policed.add(r.id)
            for mask, key in rule_entries(r, slots):
                entries = by_mask.get(mask)
                if entries is None:
                    entries = by_mask[mask] = {}
                    max_rank[mask] = rank
                old = entries.setdefault(key, value)    # one hash of the key, not two
                if old is value:
                    size += 1
                elif old[0] < rank:
                    hidden.setdefault((mask, key), []).append(old)
                    entries[key] = value
                else:
                    hidden.setdefault((mask, key), []).append(value)
                    continue
                if rank > max_rank[mask]:
                    max_rank[mask] = rank
                if touched is not None:
                    touched.append((mask, key))
            if max_entries is not None and size > max_entries:
                self.size = size
                raise entries_error(tenant, max_entries)
        self.size = size

    def remove_rule(self, r: model.Rule, slots: Dict[str, int]) -> List[Tuple[MaskTuple, EntryKey]]:
        self.policed.discard(r.id)
        touched = []
        for mask, key in rule_entries(r, slots):
            entries = self.by_mask[mask]
            cur = entries[key]
            hidden = self.hidden.get((mask, key))
            if cur[1] != r.id:
                hidden.remove(next(v for v in hidden if v[1] == r.id))
                if not hidden:
                    del self.hidden[(mask, key)]
                continue
            touched.append((mask, key))
            if hidden:
                hidden.sort()
                entries[key] = hidden.pop()
                if not hidden:
                    del self.hidden[(mask, key)]
            else:
                del entries[key]
                self.size -= 1
            if not entries:
                del self.by_mask[mask], self.max_rank[mask], self.key_idx[mask]
            elif cur[0] == self.max_rank[mask]:
                self.max_rank[mask] = max(v[0] for v in entries.values())
        return touched

    def number_masks(self) -> None:
        """Key indexes in search order (what a from-scratch compile writes)."""
        self.key_idx = {m: i for i, (m, _) in enumerate(self.masks)}

    # -- reading -------------------------------------------------------------------------
    @property
    def masks(self) -> List[Tuple[MaskTuple, int]]:
        """(mask, max_rank) in search order."""
        return order_masks(self.max_rank)

    @property
    def entries(self) -> Dict[Tuple, Value]:
        """(key index, proto, in_port, src, dst, sport, dport) -> (rank, rule id, action)."""
        return {(self.key_idx[m],) + k: v for m, ents in self.by_mask.items()
                for k, v in ents.items()}

    def mask_set(self, max_masks: int):
        """The xf_mask_set value: the one place a mask set is written."""
        ms = abi.mask_set_type(max_masks)()
        ms.count = len(self.max_rank)
        for i, ((src, dst, sp, dp, proto, inp), rank) in enumerate(self.masks):
            m = ms.masks[i]
            abi.set_addr(m.src, src)
            abi.set_addr(m.dst, dst)
            m.sport, m.dport, m.proto, m.in_port, m.max_rank = sp, dp, proto, inp, rank
            m.key_idx = self.key_idx[(src, dst, sp, dp, proto, inp)]
        return ms

    def rule_ids(self) -> Set[int]:
        return {v[1] for ents in self.by_mask.values() for v in ents.values()} | \
            {v[1] for vs in self.hidden.values() for v in vs}

    def entry_item(self, mask: MaskTuple, key: EntryKey, tenant_id: int, generation: int,
                   stat_of: Dict[int, int]) -> Tuple[bytes, Optional[bytes]]:
        """One classifier entry as map bytes; value None when the key holds no rule."""
        return self.key_bytes(self.key_idx.get(mask, 0), key, tenant_id, generation), \
            self.value_bytes(self.by_mask.get(mask, {}).get(key), stat_of)

    @staticmethod
    def key_bytes(idx: int, key: EntryKey, tenant_id: int, generation: int) -> bytes:
        proto, inp, src, dst, sp, dp = key
        return _RULE_KEY.pack(generation, tenant_id, idx, proto, inp, 0, src, dst, sp, dp)

    def value_bytes(self, v: Optional[Value], stat_of: Dict[int, int]) -> Optional[bytes]:
        if v is None:
            return None
        return _RULE.pack(v[0], v[1], v[2], 0, stat_of.get(v[1], 0),
                          rule_policer(v[1]) if v[1] in self.policed else 0)

    def rule_items(self, tenant_id: int, generation: int,
                   stat_of: Optional[Dict[int, int]] = None) -> Iterable[Tuple[bytes, bytes]]:
        """Classifier entries; stat_of: rule id -> its counter slot (the map layer's)."""
        stat_of = stat_of or {}
        # key_bytes and value_bytes inlined: 100,000 entries for a big state.
        pack_key, pack_value, slot, policed = _RULE_KEY.pack, _RULE.pack, stat_of.get, \
            self.policed
        for mask, ents in self.by_mask.items():
            idx = self.key_idx[mask]
            for (proto, inp, src, dst, sp, dp), (rank, rid, action) in ents.items():
                yield pack_key(generation, tenant_id, idx, proto, inp, 0, src, dst, sp, dp), \
                    pack_value(rank, rid, action, 0, slot(rid, 0),
                               rule_policer(rid) if rid in policed else 0)


def rule_policer(rule_id: int) -> int:
    """The xf_policers key of a rule's rate limit (a tenant's is its id)."""
    return rule_id | abi.POLICER_RULE


def policer_value(rate: str, burst: Optional[int]) -> bytes:
    """A bucket for a rate limit (model.parse_rate), full. Packets cost 1e9 / rate ns;
    bytes 8e9 / rate ns, kept with 16 fraction bits (100mbit: 80 ns a byte; 400gbit
    still 1,311 / 65,536 ns)."""
    unit, n = model.rate_value(rate)
    b = model.burst_of(rate, burst)
    if unit == "pps":
        cost = max(1, round(1e9 / n))
        return bytes(abi.Policer(cost=cost, burst_ns=b * cost))
    cost = max(1, round(8e9 * 65536 / n))
    return bytes(abi.Policer(cost=cost, burst_ns=(b * cost) >> 16, flags=abi.POL_BYTES))


def policer_config(value: bytes) -> Tuple[int, int, int]:
    """What the agent sets in a bucket (the rest is the datapath's state)."""
    p = abi.Policer.from_buffer_copy(value)
    return p.cost, p.burst_ns, p.flags


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
    return {r.id: rule_rank(r) for r in rules}


def check_masks(tenant: str, cls: Classifier, max_masks: int) -> None:
    if len(cls.by_mask) > max_masks:
        raise CompileError(
            f"tenant {tenant}",
            f"its rules need {len(cls.by_mask)} distinct masks (prefix lengths x port-range "
            f"prefixes x protocol x in_port); the datapath holds {max_masks} per tenant "
            f"(datapath.max_masks). Share prefix lengths or port ranges between rules.")


def entries_error(tenant: str, max_entries: int) -> CompileError:
    return CompileError(
        f"tenant {tenant}", f"its rules expand to more than {max_entries} "
        f"classifier entries (port ranges become prefixes); the datapath "
        f"holds {max_entries} (datapath.max_rule_entries)")


def compile_rules(tenant: str, rules: Sequence[model.Rule], slots: Dict[str, int],
                  max_masks: int, max_entries: Optional[int] = None) -> Classifier:
    """One tenant's classifier, from scratch. With `max_entries`, a rule set that expands
    (port ranges into prefixes) to more entries is refused as soon as it gets there, before
    the rest is built: an oversized state costs no more than the datapath could hold."""
    cls = Classifier()
    cls.insert(rules, slots, max_entries=max_entries, tenant=tenant)
    check_masks(tenant, cls, max_masks)
    cls.number_masks()
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
    policers: Dict[bytes, bytes] = field(default_factory=dict)     # rate limits, full
    nat: Dict[bytes, bytes] = field(default_factory=dict)          # floating IPs, SNATs


@dataclass
class TenantImage:
    id: int
    name: str
    default_verdict: int
    vni: int
    classifier: Classifier
    policer: int = 0            # its rate limit's xf_policers key, 0: none
    max_flows: int = 0          # the flow quota in force (0: none)


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


def nat_entries(state: model.State) -> Dict[bytes, bytes]:
    """NAT both ways (bpf/xf_structs.h struct xf_nat_key): a floating address -> its
    tenant and VM, the VM -> its floating address; a tenant -> its SNAT address and port
    range, the SNAT address -> "a SNAT address" (its flows say whose)."""
    ids = {t.name: t.id for t in state.tenants}
    out: Dict[bytes, bytes] = {}
    for f in state.sorted("fips"):
        tid = ids[f.tenant]
        out[bytes(abi.NatKey(tenant=abi.TENANT_EXTERNAL, addr=_be32(f.ip)))] = bytes(
            abi.Nat(addr=_be32(f.to), tenant=tid, kind=abi.NAT_FIP))
        out[bytes(abi.NatKey(tenant=tid, addr=_be32(f.to)))] = bytes(
            abi.Nat(addr=_be32(f.ip), tenant=tid, kind=abi.NAT_FIP))
    for n in state.sorted("snats"):
        tid = ids[n.tenant]
        out[bytes(abi.NatKey(tenant=tid))] = bytes(
            abi.Nat(addr=_be32(n.to), tenant=tid, kind=abi.NAT_SNAT, port_lo=n.ports[0],
                    port_hi=n.ports[1]))
        out[bytes(abi.NatKey(tenant=abi.TENANT_EXTERNAL, addr=_be32(n.to)))] = bytes(
            abi.Nat(kind=abi.NAT_SNAT))
    return out


def compile_state(state: model.State, links: Dict[str, PortLink],
                  max_masks: int = abi.DEFAULT_MAX_MASKS,
                  slots: Optional[Dict[str, int]] = None,
                  max_entries: Optional[int] = None,
                  classifiers: Optional[Dict[str, Classifier]] = None,
                  neighbours: Optional[Dict[str, str]] = None,
                  max_flows: int = 0, validated: bool = False) -> Image:
    """The whole image. Ports without a live interface (not in `links`) are left out, and
    so are endpoints behind them: nothing can be sent there yet. Rules name ports by
    `slots` (the store's, every configured port), so an in_port rule compiles whether or
    not its port's interface exists; without `slots`, the live links' slots. With
    `max_entries`, the classifier entries of all tenants together are bounded.
    `classifiers`: tenant name -> a classifier of its current rules, taken as it is.
    `neighbours`: VTEP address -> the underlay neighbour's MAC, as the node resolved it.
    A tenant without its own flow quota gets `max_flows` (the config's [flows]
    max_per_tenant). `validated`: the caller has validated `state` (a 100,000-rule state
    takes 0.1 s to validate)."""
    if not validated:
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
    img.nat = nat_entries(state)
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
    held = classifiers or {}
    for t in state.tenants:
        cls = held.get(t.name) or compile_rules(t.name, rules_by_tenant[t.name], slots,
                                                max_masks, left)
        if left is not None:
            left -= cls.size
        img.tenants[t.id] = TenantImage(
            id=t.id, name=t.name,
            default_verdict=abi.V_PASS if t.default == "pass" else abi.V_DROP,
            vni=t.vni or 0, classifier=cls, policer=t.id if t.rate is not None else 0,
            max_flows=max_flows if t.max_flows is None else t.max_flows)
        if t.rate is not None:
            img.policers[bytes(ct.c_uint32(t.id))] = policer_value(t.rate, t.burst)
    for r in state.rules:
        if r.rate is not None:
            img.policers[bytes(ct.c_uint32(rule_policer(r.id)))] = policer_value(r.rate, r.burst)
    if len(img.policers) > abi.MAX_POLICERS:
        raise CompileError("rate limits", f"{len(img.policers)} tenants and rules have one; "
                                          f"the datapath holds {abi.MAX_POLICERS}")
    return img
