"""The Python mirror of what the datapath C shares with the agent: map key/value structs
and constants. tests/bpf/test_abi.py checks every struct against the types BCC builds from
bpf/xf_structs.h, field by field and offset by offset, and every constant against
bpf/xf_consts.h; so this file may be trusted where the C is not at hand (before loading,
to check pinned maps, and in unit tests of the compiler)."""
from __future__ import annotations

import ctypes as ct
import hashlib
import ipaddress
from typing import Dict, Union

u8, u16, u32, u64 = ct.c_uint8, ct.c_uint16, ct.c_uint32, ct.c_uint64

ABI_VERSION = 1
DEFAULT_MAX_MASKS = 32

# --- constants (bpf/xf_consts.h) ------------------------------------------------------

VERDICTS = {0: "none", 1: "drop", 2: "pass", 3: "redirect", 4: "tx"}
V_NONE, V_DROP, V_PASS, V_REDIRECT, V_TX = range(5)

REASONS = {
    1: "flow", 2: "rule_allow", 3: "rule_deny", 4: "rule_pass", 5: "default",
    6: "no_route", 7: "route_kernel", 8: "route_drop", 9: "local", 10: "ttl",
    11: "arp_reply", 12: "nd_reply", 13: "arp_other", 14: "nd_other", 15: "not_ip",
    16: "multicast", 17: "no_port", 18: "no_tenant", 19: "parse_eth", 20: "parse_vlan",
    21: "parse_ipv4", 22: "parse_ipv6", 23: "parse_ext", 24: "parse_l4", 25: "frag",
    26: "insert_failed", 27: "flow_stale", 28: "related", 29: "spoof", 30: "vlan",
    31: "icmp_mtu",
    # 32-39: the overlay (uplink ports, VXLAN)
    32: "uplink_other", 33: "vni_unknown", 34: "vtep_unknown", 35: "mtu_kernel",
    36: "parse_vxlan", 37: "no_neigh",
    # 40-47: NAT and rate limits
    40: "ratelimit",
    41: "nat_no_flow", 42: "nat_exhausted", 43: "nat_no_neigh", 44: "nat_no_route",
    45: "nat_frag", 46: "nat_forwarding_off",
    48: "flow_quota",       # issue 14: a tenant at its flow quota
}
REASON_IDS = {v: k for k, v in REASONS.items()}
R_MAX = 49
# Reasons that count events rather than packets (their verdict is "none").
EVENT_REASONS = ("insert_failed", "flow_stale", "flow_quota")

A_ALLOW, A_DENY, A_PASS = 1, 2, 3
RULE_ACTIONS = {"allow": A_ALLOW, "deny": A_DENY, "pass": A_PASS}
RT_VIA, RT_KERNEL, RT_DROP = 1, 2, 3
ROUTE_ACTIONS = {"via": RT_VIA, "kernel": RT_KERNEL, "drop": RT_DROP}
FLOW_REVERSE, FLOW_CLOSING, FLOW_ENCAP, FLOW_POLICED = 0x01, 0x02, 0x04, 0x08
FLOW_SNAT, FLOW_DNAT, FLOW_FIP = 0x10, 0x20, 0x40      # NAT (issue 11)
NAT_FIP, NAT_SNAT = 1, 2                               # xf_nat entry kinds
# xf_nat_stats kinds (key: tenant << 8 | kind)
NATC_FIP_IN, NATC_FIP_OUT, NATC_SNAT_IN, NATC_SNAT_OUT, NATC_EXHAUSTED = range(5)
NAT_KINDS = {NATC_FIP_IN: ("fip", "in"), NATC_FIP_OUT: ("fip", "out"),
             NATC_SNAT_IN: ("snat", "in"), NATC_SNAT_OUT: ("snat", "out")}
NAT_ENTRIES, NAT_STATS, NAT_TRIES = 65536, 65536, 8
TENANT_EXTERNAL = 0      # the tenant of flow keys of packets from the external network
EP_LOCAL, EP_REMOTE = 0x01, 0x02
ENCAP_LEN = 50           # VXLAN's outer Ethernet, IPv4, UDP, VXLAN headers
VNI_ENTRIES = 65536
VXLAN_PORT = 4789
PORT_SECURITY, PORT_VLAN, PORT_TENANT_DROP = 0x01, 0x02, 0x04
PORT_UPLINK = 0x08
IPV4_MIN_MTU, IPV6_MIN_MTU = 68, 1280
MAX_TENANTS = 65536
PORT_INDEX = 16384       # ifindexes below this are looked up in xf_port_index (an array)
MASK_SETS = 8192
V_MAX = 5
R_ROWS = 64


def stats_index(slot: int, verdict: int, reason: int) -> int:
    """Row of the per-CPU counter array for (port slot, verdict, reason)."""
    return (slot * V_MAX + verdict) * R_ROWS + reason


def stats_row(index: int):
    """(port slot, verdict, reason) of a counter row."""
    slot, rest = divmod(index, V_MAX * R_ROWS)
    verdict, reason = divmod(rest, R_ROWS)
    return slot, verdict, reason
FRAG_TABLE_SIZE = 8192
MAX_RULE_IDS = 262144
RULE_STATS = 65536       # per-rule counter slots; slot 0 counts nothing
EVENT_BYTES = 128          # packet bytes a monitor event carries
EVENT_RING_PAGES = 64
MAX_POLICERS = 16384     # tenants and rules with a rate limit, together
POLICER_RULE = 0x80000000  # a rule's xf_policers key: rule id | this; a tenant's: its id
POL_BYTES = 0x01

CONSTANTS = {  # name in xf_consts.h -> value here (checked by the abi test)
    "XF_V_NONE": V_NONE, "XF_V_DROP": V_DROP, "XF_V_PASS": V_PASS,
    "XF_V_REDIRECT": V_REDIRECT, "XF_V_TX": V_TX,
    "XF_A_ALLOW": A_ALLOW, "XF_A_DENY": A_DENY, "XF_A_PASS": A_PASS,
    "XF_RT_VIA": RT_VIA, "XF_RT_KERNEL": RT_KERNEL, "XF_RT_DROP": RT_DROP,
    "XF_FLOW_REVERSE": FLOW_REVERSE, "XF_FLOW_CLOSING": FLOW_CLOSING,
    "XF_FLOW_ENCAP": FLOW_ENCAP, "XF_FLOW_POLICED": FLOW_POLICED, "XF_EP_REMOTE": EP_REMOTE, "XF_ENCAP_LEN": ENCAP_LEN,
    "XF_VNI_ENTRIES": VNI_ENTRIES,
    "XF_EP_LOCAL": EP_LOCAL, "XF_MAX_TENANTS": MAX_TENANTS, "XF_PORT_INDEX": PORT_INDEX, "XF_MASK_SETS": MASK_SETS,
    "XF_V_MAX": V_MAX, "XF_R_ROWS": R_ROWS, "XF_FRAG_TABLE_SIZE": FRAG_TABLE_SIZE,
    "XF_MAX_RULE_IDS": MAX_RULE_IDS, "XF_R_MAX": R_MAX, "XF_RULE_STATS": RULE_STATS,
    "XF_PORT_SECURITY": PORT_SECURITY, "XF_PORT_VLAN": PORT_VLAN,
    "XF_PORT_TENANT_DROP": PORT_TENANT_DROP, "XF_PORT_UPLINK": PORT_UPLINK,
    "XF_IPV4_MIN_MTU": IPV4_MIN_MTU, "XF_IPV6_MIN_MTU": IPV6_MIN_MTU,
    "XF_EVENT_BYTES": EVENT_BYTES, "XF_EVENT_RING_PAGES": EVENT_RING_PAGES,
    "XF_MAX_POLICERS": MAX_POLICERS, "XF_POLICER_RULE": POLICER_RULE,
    "XF_POL_BYTES": POL_BYTES,
    "XF_FLOW_SNAT": FLOW_SNAT, "XF_FLOW_DNAT": FLOW_DNAT, "XF_FLOW_FIP": FLOW_FIP,
    "XF_NAT_FIP": NAT_FIP, "XF_NAT_SNAT": NAT_SNAT, "XF_NATC_FIP_IN": NATC_FIP_IN,
    "XF_NATC_FIP_OUT": NATC_FIP_OUT, "XF_NATC_SNAT_IN": NATC_SNAT_IN,
    "XF_NATC_SNAT_OUT": NATC_SNAT_OUT, "XF_NATC_EXHAUSTED": NATC_EXHAUSTED,
    "XF_NAT_ENTRIES": NAT_ENTRIES, "XF_NAT_STATS": NAT_STATS, "XF_NAT_TRIES": NAT_TRIES,
    "XF_TENANT_EXTERNAL": TENANT_EXTERNAL,
}
CONSTANTS.update({"XF_R_" + name.upper(): rid for rid, name in REASONS.items()})

# --- structs (bpf/xf_structs.h) -------------------------------------------------------

Addr = u32 * 4
Mac = u8 * 6


class FlowKey(ct.Structure):
    _fields_ = [("tenant", u16), ("proto", u8), ("pad", u8), ("src", Addr), ("dst", Addr),
                ("sport", u16), ("dport", u16)]


class Flow(ct.Structure):
    _fields_ = [("packets", u64), ("bytes", u64), ("created_ns", u64), ("last_seen_ns", u64),
                ("generation", u32), ("rule_id", u32), ("out_ifindex", u32),
                ("out_port", u16), ("verdict", u8), ("flags", u8), ("dmac", Mac),
                ("smac", Mac), ("in_port", u16), ("reason", u8), ("tcp_flags", u8),
                ("in_mac", Mac), ("rule_stat", u16),
                # overlay (VXLAN): network-order addresses, as in the outer header. A NAT
                # flow (FLOW_SNAT/FLOW_DNAT) keeps its rewrite here: vtep the address
                # written, encap_sport the port, vni the VM's tenant (bpf/xf_structs.h)
                ("vtep", u32), ("vni", u32), ("vtep_mac", Mac), ("encap_sport", u16)]


class NatKey(ct.Structure):
    _fields_ = [("tenant", u16), ("pad", u16), ("addr", u32)]   # addr: network order


class Nat(ct.Structure):
    _fields_ = [("addr", u32), ("tenant", u16), ("kind", u8), ("pad", u8),
                ("port_lo", u16), ("port_hi", u16)]


class Port(ct.Structure):
    _fields_ = [("tenant", u16), ("slot", u16), ("flags", u32), ("mac", Mac), ("pad", u16),
                # uplink ports (PORT_UPLINK)
                ("local_ip", Addr), ("mtu", u32)]


class Tenant(ct.Structure):
    _fields_ = [("generation", u32), ("default_verdict", u8), ("pad", u8), ("flags", u16),
                ("vni", u32), ("cls_generation", u32),
                # rate limits (issue 11)
                ("policer", u32), ("pad_rl", u32),
                ("max_flows", u32), ("flows", u32)]   # the flow quota (appended)


class Mask(ct.Structure):
    _fields_ = [("src", Addr), ("dst", Addr), ("sport", u16), ("dport", u16), ("proto", u8),
                ("key_idx", u8), ("in_port", u16), ("max_rank", u64)]


class MaskKey(ct.Structure):
    _fields_ = [("tenant", u16), ("pad", u16), ("generation", u32)]


_mask_sets: Dict[int, type] = {}


def mask_set_type(max_masks: int = DEFAULT_MAX_MASKS) -> type:
    """struct xf_mask_set for a given XF_MAX_MASKS (its array length is a -D setting)."""
    if max_masks not in _mask_sets:
        _mask_sets[max_masks] = type(f"MaskSet{max_masks}", (ct.Structure,), {
            "_fields_": [("count", u32), ("pad", u32), ("masks", Mask * max_masks)]})
    return _mask_sets[max_masks]


MaskSet = mask_set_type()


class RuleKey(ct.Structure):
    _fields_ = [("generation", u32), ("tenant", u16), ("mask_idx", u8), ("proto", u8),
                ("in_port", u16), ("pad", u16), ("src", Addr), ("dst", Addr),
                ("sport", u16), ("dport", u16)]


class Rule(ct.Structure):
    _fields_ = [("rank", u64), ("rule_id", u32), ("action", u8), ("pad", u8), ("stat", u16),
                # rate limits (issue 11)
                ("policer", u32), ("pad_rl", u32)]


class Policer(ct.Structure):
    _fields_ = [("tat_ns", u64), ("cost", u64), ("burst_ns", u64), ("dropped", u64),
                ("flags", u32), ("pad", u32)]


class EpKey(ct.Structure):
    _fields_ = [("tenant", u16), ("pad", u16), ("addr", Addr)]


class Endpoint(ct.Structure):
    _fields_ = [("ifindex", u32), ("port", u16), ("mac", Mac), ("port_mac", Mac),
                ("flags", u16),
                # remote endpoints (EP_REMOTE): network-order addresses
                ("vtep", u32), ("vni", u32), ("vtep_mac", Mac), ("pad_overlay", u16)]


class VniKey(ct.Structure):
    _fields_ = [("vni", u32), ("vtep", u32)]


class RouteKey(ct.Structure):
    _fields_ = [("prefixlen", u32), ("tenant", u16), ("pad", u16), ("addr", Addr)]


class Route(ct.Structure):
    _fields_ = [("action", u8), ("pad", u8 * 3), ("via", Addr)]


class Counter(ct.Structure):
    _fields_ = [("packets", u64), ("bytes", u64)]


class RuleStat(ct.Structure):
    _fields_ = [("hits", u64), ("last_hit_ns", u64)]


class FragKey(ct.Structure):
    _fields_ = [("tenant", u16), ("proto", u8), ("pad", u8), ("id", u32), ("src", Addr),
                ("dst", Addr)]


class Frag(ct.Structure):
    _fields_ = [("sport", u16), ("dport", u16), ("proto", u8), ("pad", u8 * 3)]


class SrcKey(ct.Structure):
    _fields_ = [("prefixlen", u32), ("slot", u16), ("mac", Mac), ("addr", Addr)]


class Meta(ct.Structure):
    # build_id: what the pinned program (xf_prog) was built from (Datapath.build_id); 0
    # while no pinned program matches. A meta without it (16 bytes) is an older layout:
    # its pins are rebuilt (the layout fingerprint covers this struct).
    _fields_ = [("abi_version", u64), ("layout_hash", u64), ("build_id", u64)]


class Trace(ct.Structure):
    _fields_ = [("tenant", u32), ("rule_id", u32), ("out_ifindex", u32), ("out_port", u16),
                ("in_port", u16), ("verdict", u8), ("reason", u8), ("flow_hit", u8),
                ("stale", u8), ("pad", u32),
                # rate limits (issue 11): [0] the rule's bucket, [1] the tenant's
                ("pol_key", u32 * 2), ("pol_credit_ns", u64 * 2), ("pol_cost_ns", u64 * 2),
                ("pol_ok", u8 * 2), ("pad_rl", u8 * 6),
                # NAT (issue 11): the translation made
                ("nat_addr", u32), ("nat_port", u16), ("nat_flags", u8), ("pad_nat", u8)]


class MonCfg(ct.Structure):
    _fields_ = [("listeners", u32), ("verdicts", u32), ("reasons", u64), ("tenant", u16),
                ("port", u16), ("pad", u32), ("cost_ns", u64), ("burst_ns", u64)]


class MonCpu(ct.Structure):
    _fields_ = [("last_ns", u64), ("credit_ns", u64), ("sent", u64), ("lost_rate", u64),
                ("lost_ring", u64)]


class Event(ct.Structure):
    _fields_ = [("ts_ns", u64), ("rule_id", u32), ("len", u32), ("out_ifindex", u32),
                ("tenant", u16), ("port", u16), ("out_port", u16), ("cap_len", u16),
                ("verdict", u8), ("reason", u8), ("flow_hit", u8), ("pad", u8),
                ("data", u8 * EVENT_BYTES)]


# --- maps: name -> (BPF map type, key type, value type, size setting) -----------------

HASH, ARRAY, PROG_ARRAY, PERCPU_HASH, PERCPU_ARRAY, LRU_HASH, LPM_TRIE = 1, 2, 3, 5, 6, 9, 11
MAPS = {
    "xf_flows": (HASH, FlowKey, Flow, "XF_FLOW_TABLE_SIZE"),
    "xf_port_index": (ARRAY, u32, Port, "XF_PORT_INDEX"),
    "xf_ports": (HASH, u32, Port, "XF_MAX_PORTS"),
    "xf_tenants": (ARRAY, u32, Tenant, MAX_TENANTS),
    "xf_masks": (HASH, MaskKey, None, MASK_SETS),   # value: mask_set_type(max_masks)
    "xf_rules": (HASH, RuleKey, Rule, "XF_MAX_RULE_ENTRIES"),
    "xf_endpoints": (HASH, EpKey, Endpoint, "XF_MAX_ENDPOINTS"),
    "xf_routes": (LPM_TRIE, RouteKey, Route, "XF_MAX_ROUTES"),
    "xf_port_src": (LPM_TRIE, SrcKey, u32, "XF_PORT_SRC_ENTRIES"),
    "xf_stats": (PERCPU_ARRAY, u32, Counter, "XF_STATS_ROWS"),
    "xf_rule_hits": (PERCPU_HASH, u32, RuleStat, MAX_RULE_IDS),
    "xf_rule_stats": (PERCPU_ARRAY, u32, Counter, RULE_STATS),
    "xf_port_tx": (PERCPU_ARRAY, u32, Counter, "XF_MAX_PORTS"),
    "xf_frags": (LRU_HASH, FragKey, Frag, FRAG_TABLE_SIZE),
    "xf_vnis": (HASH, VniKey, u32, VNI_ENTRIES),
    "xf_meta": (ARRAY, u32, Meta, 1),
    "xf_policers": (HASH, u32, Policer, MAX_POLICERS),
    "xf_nat": (HASH, NatKey, Nat, NAT_ENTRIES),
    "xf_nat_stats": (PERCPU_HASH, u32, Counter, NAT_STATS),
    "xf_nat_prog": (PROG_ARRAY, u32, u32, 2),      # the NAT programs (tail calls)
}


def map_spec(name: str, defines: Dict[str, int]):
    """(type, key_size, value_size, max_entries) a map must have under these settings."""
    mtype, k, v, size = MAPS[name]
    if v is None:
        v = mask_set_type(defines.get("XF_MAX_MASKS", DEFAULT_MAX_MASKS))
    if size == "XF_PORT_INDEX":
        size = PORT_INDEX
    elif size == "XF_STATS_ROWS":
        size = defines["XF_MAX_PORTS"] * V_MAX * R_ROWS
    elif size == "XF_PORT_SRC_ENTRIES":
        size = 2 * defines["XF_MAX_ENDPOINTS"]
    elif isinstance(size, str):
        size = defines[size]
    return mtype, ct.sizeof(k), ct.sizeof(v), size


def _describe(t) -> str:
    if hasattr(t, "_fields_"):
        return "{" + ",".join(f"{n}@{getattr(t, n).offset}:{_describe(ft)}"
                              for n, ft in t._fields_) + "}"
    if hasattr(t, "_length_"):
        return f"{_describe(t._type_)}[{t._length_}]"
    return f"{t.__name__}/{ct.sizeof(t)}"


def layout_hash(name: str, defines: Dict[str, int]) -> int:
    """A fingerprint of one map's type and key/value layout, not its size: a map that only
    changed size can have its entries copied over."""
    mtype, k, v, _ = MAPS[name]
    if v is None:
        v = mask_set_type(defines.get("XF_MAX_MASKS", DEFAULT_MAX_MASKS))
    text = f"{ABI_VERSION}|{name}|{mtype}|{_describe(k)}|{_describe(v)}"
    if name == "xf_stats":      # a row's meaning depends on the reasons per (port, verdict)
        text += f"|rows/{R_ROWS}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


# --- addresses ------------------------------------------------------------------------

IPAddr = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


V4_MAPPED = b"\0" * 10 + b"\xff\xff"     # ::ffff:0:0/96, before an IPv4 address's 4 bytes


def addr16(ip: IPAddr) -> bytes:
    """16 bytes in network order; IPv4 mapped into ::ffff:0:0/96 as the datapath keys it."""
    if ip.version == 4:
        return V4_MAPPED + ip.packed
    return ip.packed


def set_addr(field, ip_or_bytes) -> None:
    raw = ip_or_bytes if isinstance(ip_or_bytes, (bytes, bytearray)) else addr16(ip_or_bytes)
    ct.memmove(field, raw, 16)


def get_addr(field) -> IPAddr:
    ip = ipaddress.IPv6Address(bytes(field))
    return ip.ipv4_mapped or ip


def mac_bytes(mac: str) -> bytes:
    return bytes(int(x, 16) for x in mac.split(":"))


def mac_str(raw) -> str:
    return ":".join(f"{b:02x}" for b in bytes(raw))
