"""The flow table's entries, as bytes and as people read them: raw views the sweeper
unpacks a million times a sweep (offsets from the abi mirror, which a test checks against
the C), the reply key the datapath would make, and the dict `flow dump` prints. No BPF
here: the datapath layer reads and deletes entries, the sweeper decides which."""
from __future__ import annotations

import ctypes as ct
import ipaddress
import struct
import time
from typing import Any, Dict, Optional, Tuple

from . import abi

PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}
# Every reason an entry leaves the flow table (each is exported, at 0 until it happens):
# idle too long, TCP closed and idle, its tenant removed, flushed by an operator, or the
# oldest ones over the high watermark.
EVICTION_REASONS = ("idle", "closed", "rule_change", "flush", "table_full")
CLOCK_MONOTONIC_COARSE = 6


def now_coarse_ns() -> int:
    """The clock bpf_ktime_get_coarse_ns() reads (a flow's last_seen_ns)."""
    return time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE)


# Raw views of the flow structs, offsets taken from the mirror (checked against the C).
_KEY_HEAD = struct.Struct("<HB")                                  # tenant, proto
_PORTS = struct.Struct("<HH")                                     # sport, dport
_PORTS_AT = abi.FlowKey.sport.offset
_SRC_AT, _DST_AT = abi.FlowKey.src.offset, abi.FlowKey.dst.offset
_ADDR = abi.FlowKey.src.size
_AGE_AT = abi.Flow.last_seen_ns.offset
_FLOW_AGE = struct.Struct(                                        # last_seen, generation, flags
    f"<QI{abi.Flow.flags.offset - abi.Flow.generation.offset - 4}xB")
assert abi.Flow.generation.offset == _AGE_AT + 8
assert _DST_AT == _SRC_AT + _ADDR and _PORTS_AT == _DST_AT + _ADDR
# ICMP echo types and their replies (the key's dport carries type << 8 | code).
_REPLY_TYPE = {1: {8: 0, 0: 8}, 58: {128: 129, 129: 128}}


# NAT (issue 11): a NAT entry's rewrite sits in the overlay's bytes (bpf/xf_structs.h):
# vtep the address written (network order, as a key holds it), vni the VM's tenant,
# encap_sport the port written.
_NAT_ADDR_AT, _NAT_TENANT_AT = abi.Flow.vtep.offset, abi.Flow.vni.offset
_NAT_PORT_AT = abi.Flow.encap_sport.offset
_FLAGS_AT = abi.Flow.flags.offset
_U16, _U32 = struct.Struct("<H"), struct.Struct("<I")
_NAT_FLAGS = abi.FLOW_SNAT | abi.FLOW_DNAT


def flow_tenant(kb: bytes, fb: bytes) -> int:
    """The tenant an entry belongs to: its key's, or for an entry keyed on the external
    side (NAT: packets from outside), the VM's it translates to."""
    tenant = _U16.unpack_from(kb)[0]
    if tenant == abi.TENANT_EXTERNAL and fb[_FLAGS_AT] & abi.FLOW_DNAT:
        return _U32.unpack_from(fb, _NAT_TENANT_AT)[0]
    return tenant


def pair_key(kb: bytes, fb: bytes) -> Optional[bytes]:
    """The raw key of the other direction of an entry's flow, as the datapath installed
    it: the reply key, and for NAT the other side's terms (a VM's entry pairs with the one
    keyed on the external side at the translated address and port, and back)."""
    rkb = reverse_flow_key(kb)
    flags = fb[_FLAGS_AT]
    if rkb is None or not flags & _NAT_FLAGS:
        return rkb
    addr = fb[_NAT_ADDR_AT:_NAT_ADDR_AT + 4]
    port = fb[_NAT_PORT_AT:_NAT_PORT_AT + 2]
    icmp = kb[2] == 1
    if flags & abi.FLOW_SNAT:       # the VM's: its reply arrives at the NAT address, port
        head = _U16.pack(abi.TENANT_EXTERNAL) + rkb[2:]
        at = _DST_AT + _ADDR - 4
        out = head[:at] + addr + head[at + 4:]
        p = _PORTS_AT if icmp else _PORTS_AT + 2
    else:                           # from outside: its reply leaves the VM, from its port
        head = _U16.pack(_U32.unpack_from(fb, _NAT_TENANT_AT)[0]) + rkb[2:]
        at = _SRC_AT + _ADDR - 4
        out = head[:at] + addr + head[at + 4:]
        p = _PORTS_AT
    return out[:p] + port + out[p + 2:]


def flow_head(kb: bytes) -> Tuple[int, int]:
    """(tenant, proto) of a raw flow key."""
    return _KEY_HEAD.unpack_from(kb)


def flow_age(fb: bytes) -> Tuple[int, int, int]:
    """(last seen ns, generation, flags) of a raw flow entry."""
    return _FLOW_AGE.unpack_from(fb, _AGE_AT)


def reverse_flow_key(kb: bytes) -> Optional[bytes]:
    """The reply direction's raw key, as the datapath makes it (bpf xf_reverse_key), or
    None for a protocol without one."""
    proto = kb[2]
    sport, dport = _PORTS.unpack_from(kb, _PORTS_AT)
    if proto in (6, 17):
        ports = _PORTS.pack(dport, sport)
    else:
        t = _REPLY_TYPE.get(proto, {}).get(dport >> 8)
        if t is None:
            return None
        ports = _PORTS.pack(sport, t << 8)
    return (kb[:_SRC_AT] + kb[_DST_AT:_PORTS_AT] + kb[_SRC_AT:_DST_AT] + ports
            + kb[_PORTS_AT + _PORTS.size:])


def flow_dict(k: abi.FlowKey, f: abi.Flow, tenants: Dict[int, str], slots: Dict[int, str],
              now: int, generation: int) -> Dict[str, Any]:
    """One flow as `flow dump` shows it."""
    flags = []
    if f.flags & abi.FLOW_REVERSE:
        flags.append("reply")
    if f.flags & abi.FLOW_CLOSING:
        flags.append("closing")
    if f.generation != generation:
        flags.append("stale")
    owner = k.tenant
    if f.flags & abi.FLOW_DNAT:
        flags.append("dnat")
        owner = f.vni
    if f.flags & abi.FLOW_SNAT:
        flags.append("snat")
    d = {
        "tenant": tenants.get(owner, str(owner)),
        "proto": PROTO_NAMES.get(k.proto, str(k.proto)),
        "src": str(abi.get_addr(k.src)), "dst": str(abi.get_addr(k.dst)),
        "sport": k.sport, "dport": k.dport,
        "verdict": abi.VERDICTS.get(f.verdict, str(f.verdict)),
        "in_port": slots.get(f.in_port, ""), "out_port": slots.get(f.out_port, ""),
        "rule": f.rule_id or None, "packets": f.packets, "bytes": f.bytes,
        "idle_s": round(max(0, now - f.last_seen_ns) / 1e9, 1),
        "age_s": round(max(0, now - f.created_ns) / 1e9, 1),
        "flags": ",".join(flags),
    }
    if k.proto in (1, 58):
        d["icmp_type"], d["icmp_code"], d["icmp_id"] = k.dport >> 8, k.dport & 0xFF, k.sport
    if f.flags & _NAT_FLAGS:        # what it rewrites to: address and port (echo id)
        d["nat"] = f"{ipaddress.IPv4Address(bytes(ct.c_uint32(f.vtep)))}:{f.encap_sport}"
    return d
