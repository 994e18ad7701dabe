"""The desired state users configure (tenants, ports, endpoints, routes, rules) as plain,
validated types, and the cross-checks that make a whole state consistent.

Every value that comes from outside (CLI, API, TOML, SQLite) enters through `from_dict`,
which names the field that is wrong; nothing here touches the kernel.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import re
import socket
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

IPAddr = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNet = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

MAX_TENANT_ID = 65535
MAX_VNI = (1 << 24) - 1
MAX_FLOW_QUOTA = (1 << 32) - 1   # a u32 in the tenant entry
MAX_PRIORITY = 65535
MAX_RULE_ID = (1 << 31) - 1
IFNAMSIZ = 15

VERDICTS = ("drop", "pass")
RULE_ACTIONS = ("allow", "deny", "pass")
ROUTE_ACTIONS = ("via", "kernel", "drop")
PROTOCOLS = {"any": 0, "icmp": 1, "tcp": 6, "udp": 17, "icmpv6": 58}
PROTOCOL_NAMES = {v: k for k, v in PROTOCOLS.items()}

ANY = ipaddress.ip_network("::/0")   # "any address", of either family, in rules

_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,31}$")
_IFNAME_RE = re.compile(r"^[^\s/:]{1,15}$")
_MAC_RE = re.compile(r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$")


class Invalid(ValueError):
    """A value that cannot be accepted; `where` names the object and field.

    Raised for an object of an apply file, it also says where in the file it is (`at`:
    "rules[3].dport"; `first_at`: the first of an object given twice), so the client
    can name the file's line without checking the file itself (State.from_apply)."""
    at: Optional[str] = None
    first_at: Optional[str] = None

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}")
        self.where = where
        self.message = message


class Conflict(Invalid):
    """Well-formed, but at odds with the current state: a duplicate, a missing reference,
    something that does not exist. The agent refuses it (ctl exit 1, not 2)."""


# ---------------------------------------------------------------------------------------
# Field parsers: each takes the raw value and the place it came from, for the error.

def parse_name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise Invalid(where, f"{value!r} is not a name (a letter, then up to 31 letters, "
                             "digits, '_', '.', '-')")
    return value


def parse_ifname(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _IFNAME_RE.match(value) or value in (".", ".."):
        raise Invalid(where, f"{value!r} is not an interface name (1-15 characters, "
                             "no spaces, '/' or ':')")
    return value


def parse_int(value: Any, where: str, lo: int, hi: int) -> int:
    # Strict on purpose: TOML and JSON have real numbers, so "10" where 10 belongs is a
    # mistake worth naming (the CLI turns what is typed into numbers before sending).
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        raise Invalid(where, f"{value!r} is text where a number belongs (write {value.strip()} "
                             "without quotes)")
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(where, f"{value!r} is not an integer")
    if not lo <= value <= hi:
        raise Invalid(where, f"{value} is out of range {lo}..{hi}")
    return value


def parse_choice(value: Any, where: str, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise Invalid(where, f"{value!r} is not one of {', '.join(choices)}")
    return value


def parse_ip(value: Any, where: str) -> IPAddr:
    if not isinstance(value, str):
        raise Invalid(where, f"{value!r} is not an IP address")
    try:
        return ipaddress.ip_address(value)
    except (ValueError, TypeError):
        raise Invalid(where, f"{value!r} is not an IP address") from None


class Net4(ipaddress.IPv4Network):
    """An IPv4 prefix read by parse_prefix's fast path: an IPv4Network in every respect
    (equal to, hashed and ordered as one; ipaddress's methods work on it) that was built
    without ipaddress's parsing and keeps its canonical text and address. A 100,000-rule
    state has 200,000 prefixes; building them through IPv4Network() and formatting each
    for the store and the datapath key again took a third of an apply (measured)."""

    def __str__(self) -> str:
        try:
            return self.__dict__["_text"]
        except KeyError:        # made by ipaddress (supernet(), subnets()): its own text
            return super().__str__()

    def __repr__(self) -> str:
        return f"IPv4Network('{self}')"

    def hosts(self):
        # IPv4Network.__init__ gives /31 and /32 their own hosts(); built here without it.
        if self._prefixlen >= 31:
            return [self.network_address] if self._prefixlen == 32 else iter(self)
        return super().hosts()


_MASK4 = [ipaddress.IPv4Network._make_netmask(n) for n in range(33)]   # (mask, length)
# An IPv4 prefix length as written canonically -> the length ("08" is left to ipaddress).
_PREFIX_LENGTHS = {str(n): n for n in range(33)}
_new = object.__new__
_pton = socket.inet_pton


def _net4(n: int, plen: int, text: str) -> Optional[Net4]:
    """The prefix n/plen (text: its canonical form) when its host bits are zero."""
    mask = _MASK4[plen][0]
    if n & ~mask._ip:
        return None             # the general path says what is wrong
    addr = _new(ipaddress.IPv4Address)
    addr._ip = n
    net = _new(Net4)
    net.__dict__ = {"network_address": addr, "netmask": mask, "_prefixlen": plen,
                    "_text": text}
    return net


def parse_prefix(value: Any, where: str) -> IPNet:
    """A prefix; a bare address means the host prefix. Host bits must be zero."""
    if value in (None, "", "any"):
        return ANY
    if not isinstance(value, str):
        raise Invalid(where, f"{value!r} is not a prefix")
    # The common case, IPv4, at 3x ipaddress's speed (a 100,000-rule state has 200,000
    # prefixes): inet_pton is as strict as ipaddress (4 decimal octets, no leading zeros);
    # what it refuses (IPv6, mistakes) or a prefix with host bits takes the general path,
    # whose error names what is wrong.
    addr, slash, length = value.partition("/")
    plen = _PREFIX_LENGTHS.get(length) if slash else 32
    if plen is not None:
        try:
            n = int.from_bytes(_pton(socket.AF_INET, addr), "big")
        except (OSError, ValueError):       # ValueError: a NUL or a lone surrogate
            n = -1
        if n >= 0:
            # The address is canonical (inet_pton's), and so is the length (_PREFIX_LENGTHS).
            net = _net4(n, plen, value if slash else value + "/32")
            if net is not None:
                return net
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as e:
        if "has host bits set" in str(e):
            raise Invalid(where, f"{value!r} has host bits set") from None
        raise Invalid(where, f"{value!r} is not a prefix (address/length)") from None


def parse_mac(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _MAC_RE.match(value):
        raise Invalid(where, f"{value!r} is not a MAC address (xx:xx:xx:xx:xx:xx)")
    mac = value.lower()
    if int(mac[:2], 16) & 1:
        raise Invalid(where, f"{value!r} is a multicast MAC address")
    return mac


def parse_port_range(value: Any, where: str) -> Tuple[int, int]:
    """'22', 22, '1000-1999', [1000, 1999], None/'any' -> (lo, hi)."""
    if value in (None, "", "any"):
        return (0, 65535)
    if isinstance(value, (list, tuple)) and len(value) == 2:
        lo, hi = value
    elif isinstance(value, int) and not isinstance(value, bool):
        lo = hi = value
    elif isinstance(value, str) and re.fullmatch(r"\d+", value.strip()):
        lo = hi = int(value)
    elif isinstance(value, str) and re.fullmatch(r"\d+\s*-\s*\d+", value.strip()):
        lo, hi = (int(x) for x in value.split("-"))
    else:
        raise Invalid(where, f"{value!r} is not a port or port range (N or LO-HI)")
    lo = parse_int(lo, where, 0, 65535)
    hi = parse_int(hi, where, 0, 65535)
    if lo > hi:
        raise Invalid(where, f"range {lo}-{hi} is empty (low end above high end)")
    return (lo, hi)


def parse_protocol(value: Any, where: str) -> int:
    if value is None:
        return 0
    if isinstance(value, str) and value.lower() in PROTOCOLS:
        return PROTOCOLS[value.lower()]
    if isinstance(value, str) and re.fullmatch(r"\d+", value.strip()):
        value = int(value)      # "--proto 47" is typed text; a protocol number is meant
    if isinstance(value, int) and not isinstance(value, bool):
        return parse_int(value, where, 0, 255)
    raise Invalid(where, f"{value!r} is not a protocol (tcp, udp, icmp, icmpv6, or a "
                         "number 0..255)")


# Rate limits: packets per second, or bits per second with a decimal (tc-style) prefix.
_RATE_RE = re.compile(r"^(\d+)(pps|bit|kbit|mbit|gbit)$")
_RATE_SCALE = {"pps": 1, "bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}
MAX_PPS = 10**9
MAX_BPS = 400 * 10**9
MAX_BURST = (1 << 32) - 1


def parse_rate(value: Any, where: str) -> Optional[str]:
    """'10000pps', '100mbit' (also bit, kbit, gbit) or None -> the same text, checked."""
    if value is None:
        return None
    m = _RATE_RE.match(value) if isinstance(value, str) else None
    if not m:
        raise Invalid(where, f"{value!r} is not a rate (N followed by pps, bit, kbit, mbit "
                             "or gbit, e.g. 10000pps or 100mbit)")
    n = int(m.group(1)) * _RATE_SCALE[m.group(2)]
    hi = MAX_PPS if m.group(2) == "pps" else MAX_BPS
    if not 1 <= n <= hi:
        raise Invalid(where, f"{value!r} is out of range (1 .. {hi} "
                             f"{'packets' if hi == MAX_PPS else 'bits'} per second)")
    return value


def rate_value(rate: str) -> Tuple[str, int]:
    """('pps', packets per second) or ('bps', bits per second) of a checked rate."""
    m = _RATE_RE.match(rate)
    n = int(m.group(1)) * _RATE_SCALE[m.group(2)]
    return ("pps", n) if m.group(2) == "pps" else ("bps", n)


def burst_of(rate: str, burst: Optional[int]) -> int:
    """The burst in the rate's units (packets for pps, bytes for bit rates): as given, or
    a tenth of a second's worth (at least one packet, or one 1500-byte frame)."""
    if burst is not None:
        return burst
    unit, n = rate_value(rate)
    return max(1, n // 10) if unit == "pps" else max(1500, n // 80)


def parse_limit(d: Dict[str, Any], where: str) -> Tuple[Optional[str], Optional[int]]:
    """The (rate, burst) fields of a tenant or rule; a burst needs a rate."""
    rate = parse_rate(d.get("rate"), f"{where}: rate")
    burst = d.get("burst")
    if burst is not None:
        if rate is None:
            raise Invalid(f"{where}: burst", "needs a rate")
        burst = parse_int(burst, f"{where}: burst", 1, MAX_BURST)
    return rate, burst


def limit_dict(obj) -> Dict[str, Any]:
    """The rate/burst fields of a tenant's or rule's dict: left out when it has no limit,
    so what objects without one print is as it always was."""
    if obj.rate is None:
        return {}
    return {"rate": obj.rate, "burst": obj.burst}


def _check_keys(d: Any, where: str, allowed: Iterable[str], required: Iterable[str] = ()):
    if not isinstance(d, dict):
        raise Invalid(where, f"expected a table of fields, got {type(d).__name__}")
    allowed = set(allowed)
    for k in d:
        if k not in allowed:
            raise Invalid(where, f"unknown field {k!r} (known: {', '.join(sorted(allowed))})")
    for k in required:
        if d.get(k) is None:
            raise Invalid(where, f"field {k!r} is required")


def _fmt_range(r: Tuple[int, int]) -> Optional[str]:
    if r == (0, 65535):
        return None
    return str(r[0]) if r[0] == r[1] else f"{r[0]}-{r[1]}"


def prefix_str(p: IPNet) -> Optional[str]:
    text = p.__dict__.get("_text")      # a Net4's own, without two property calls
    if text is not None:
        return text
    return None if p.prefixlen == 0 and p.version == 6 else str(p)


# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tenant:
    """A VPC: its id is in every datapath key, so tenants never see each other."""
    name: str
    id: int
    vni: Optional[int] = None
    default: str = "drop"
    rate: Optional[str] = None       # rate limit of what its rules let through (parse_rate)
    burst: Optional[int] = None      # packets (pps) or bytes (bit rates); None: burst_of

    # Flow-table entries it may hold (a flow and its reply are two); over it, its new
    # flows are judged but not cached. None: the config's [flows] max_per_tenant; 0: none.
    max_flows: Optional[int] = None


    FIELDS = ("name", "id", "vni", "default", "rate", "burst", "max_flows")

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Tenant":
        where = f"tenant {d.get('name', '?')}" if isinstance(d, dict) else "tenant"
        _check_keys(d, where, cls.FIELDS, ("name", "id"))
        rate, burst = parse_limit(d, where)
        return cls(
            name=parse_name(d["name"], f"{where}: name"),
            id=parse_int(d["id"], f"{where}: id", 1, MAX_TENANT_ID),
            vni=None if d.get("vni") is None else parse_int(d["vni"], f"{where}: vni", 1, MAX_VNI),
            default=parse_choice(d.get("default", "drop"), f"{where}: default", VERDICTS),
            rate=rate, burst=burst,
            max_flows=None if d.get("max_flows") is None else
            parse_int(d["max_flows"], f"{where}: max_flows", 0, MAX_FLOW_QUOTA),
        )

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "id": self.id, "vni": self.vni, "default": self.default,
                "max_flows": self.max_flows, **limit_dict(self)}


def parse_bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise Invalid(where, f"{value!r} is not true or false")
    return value


@dataclass(frozen=True)
class Port:
    """A node interface: a tenant's (a VM's veth or tap), or an uplink.

    Port security (on unless `port_security` is false): what the port sends must come from
    the MAC and address of one of its endpoints, or from an address in `allow` (allowed
    address pairs, with the MAC of one of its endpoints). `allow_vlan`: accept VLAN-tagged
    frames (dropped otherwise).

    An uplink (`uplink` true) faces the underlay or external network and belongs to no
    tenant; `local_ip` is the node's address on it (the VTEP address of the overlay, the
    source of what the node sends there). Tenant-port settings do not apply to it."""
    name: str
    tenant: Optional[str] = None
    allow: Tuple[IPNet, ...] = ()
    port_security: bool = True
    allow_vlan: bool = False
    uplink: bool = False
    local_ip: Optional[IPAddr] = None

    FIELDS = ("name", "tenant", "allow", "port_security", "allow_vlan", "uplink", "local_ip")

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Port":
        where = f"port {d.get('name', '?')}" if isinstance(d, dict) else "port"
        _check_keys(d, where, cls.FIELDS, ("name",))
        uplink = parse_bool(d.get("uplink", False), f"{where}: uplink")
        if uplink:
            return cls._uplink_from_dict(d, where)
        if d.get("tenant") is None:
            raise Invalid(where, "field 'tenant' is required (or 'uplink' with 'local_ip')")
        if d.get("local_ip") is not None:
            raise Invalid(f"{where}: local_ip", "only an uplink port has a local address")
        allow = d.get("allow") or []
        if isinstance(allow, str):
            allow = [allow]
        if not isinstance(allow, (list, tuple)):
            raise Invalid(f"{where}: allow", f"{allow!r} is not a list of prefixes")
        nets = []
        for a in allow:
            net = parse_prefix(a, f"{where}: allow")
            if a in (None, "", "any"):
                raise Invalid(f"{where}: allow", f"{a!r} is not a prefix")
            if net not in nets:
                nets.append(net)
        return cls(name=parse_ifname(d["name"], f"{where}: name"),
                   tenant=parse_name(d["tenant"], f"{where}: tenant"),
                   allow=tuple(sorted(nets, key=lambda n: (n.version, n))),
                   port_security=parse_bool(d.get("port_security", True),
                                            f"{where}: port_security"),
                   allow_vlan=parse_bool(d.get("allow_vlan", False), f"{where}: allow_vlan"))

    @classmethod
    def _uplink_from_dict(cls, d: Dict[str, Any], where: str) -> "Port":
        # An uplink carries every tenant's traffic (and the node's own): a tenant, or a
        # VM port's settings, on it would mean something it cannot do.
        for k in ("tenant", "allow"):
            if d.get(k):
                raise Invalid(f"{where}: {k}", "an uplink port belongs to no tenant; "
                                               f"{k!r} is for tenant ports")
        if d.get("allow_vlan"):
            raise Invalid(f"{where}: allow_vlan", "is for tenant ports, not an uplink")
        if d.get("port_security") is False:
            raise Invalid(f"{where}: port_security", "is for tenant ports, not an uplink")
        if d.get("local_ip") is None:
            raise Invalid(where, "an uplink needs 'local_ip' (the node's address on it)")
        ip = parse_ip(d["local_ip"], f"{where}: local_ip")
        if ip.is_multicast or ip.is_unspecified or ip.is_loopback:
            raise Invalid(f"{where}: local_ip", f"{ip} is not a unicast address")
        return cls(name=parse_ifname(d["name"], f"{where}: name"), uplink=True, local_ip=ip)

    def to_dict(self) -> Dict[str, Any]:
        # Each kind of port shows its own fields (a tenant port's are unchanged by uplinks).
        if self.uplink:
            return {"name": self.name, "tenant": None, "uplink": True,
                    "local_ip": str(self.local_ip)}
        return {"name": self.name, "tenant": self.tenant, "allow": [str(a) for a in self.allow],
                "port_security": self.port_security, "allow_vlan": self.allow_vlan}


@dataclass(frozen=True)
class Endpoint:
    """(tenant, IP) -> where it lives: behind a local port, or behind a remote node's VTEP
    (`vtep`, reached over VXLAN with the tenant's VNI through the uplink); and its MAC."""
    tenant: str
    ip: IPAddr
    port: Optional[str]
    mac: str
    vtep: Optional[IPAddr] = None

    FIELDS = ("tenant", "ip", "port", "mac", "vtep")

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Endpoint":
        where = (f"endpoint {d.get('tenant', '?')}/{d.get('ip', '?')}"
                 if isinstance(d, dict) else "endpoint")
        _check_keys(d, where, cls.FIELDS, ("tenant", "ip", "mac"))
        if (d.get("port") is None) == (d.get("vtep") is None):
            raise Invalid(where, "needs one of 'port' (a local port) or 'vtep' (a remote "
                                 "node's VTEP address)")
        vtep = None
        if d.get("vtep") is not None:
            vtep = parse_ip(d["vtep"], f"{where}: vtep")
            # The datapath's underlay is IPv4 (outer IPv4/UDP/VXLAN).
            if vtep.version != 4 or vtep.is_multicast or vtep.is_unspecified or \
                    vtep.is_loopback:
                raise Invalid(f"{where}: vtep", f"{vtep} is not a unicast IPv4 address")
        return cls(tenant=parse_name(d["tenant"], f"{where}: tenant"),
                   ip=parse_ip(d["ip"], f"{where}: ip"),
                   port=None if vtep else parse_ifname(d["port"], f"{where}: port"),
                   mac=parse_mac(d["mac"], f"{where}: mac"), vtep=vtep)

    def to_dict(self) -> Dict[str, Any]:
        d = {"tenant": self.tenant, "ip": str(self.ip), "port": self.port, "mac": self.mac}
        if self.vtep is not None:      # a local endpoint's fields are unchanged by remotes
            d["vtep"] = str(self.vtep)
        return d


@dataclass(frozen=True)
class Route:
    """(tenant, prefix) -> a next hop that is one of the tenant's endpoints, the node's
    kernel, or a blackhole."""
    tenant: str
    prefix: IPNet
    action: str = "via"
    via: Optional[IPAddr] = None

    FIELDS = ("tenant", "prefix", "action", "via")
    # The CLI's switches `--kernel` and `--drop`, written `kernel = true` / `drop = true`
    # in an apply file: the same names as the flags, another spelling of `action`.
    SWITCHES = ("kernel", "drop")

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Route":
        where = (f"route {d.get('tenant', '?')}/{d.get('prefix', '?')}"
                 if isinstance(d, dict) else "route")
        _check_keys(d, where, cls.FIELDS + cls.SWITCHES, ("tenant", "prefix"))
        d = cls._switches_as_action(d, where)
        prefix = d["prefix"]
        if prefix == "default":
            prefix = "0.0.0.0/0"
        if prefix in ("", "any") or not isinstance(prefix, str):
            raise Invalid(f"{where}: prefix", f"{prefix!r} is not a prefix (address/length; "
                                              "0.0.0.0/0 or ::/0 for a default route)")
        pfx = parse_prefix(prefix, f"{where}: prefix")
        action = d.get("action") or ("via" if d.get("via") is not None else None)
        if action is None:
            raise Invalid(where, "needs a next hop: 'via' an endpoint address, or action "
                                 "'kernel' or 'drop'")
        action = parse_choice(action, f"{where}: action", ROUTE_ACTIONS)
        via = None
        if action == "via":
            if d.get("via") is None:
                raise Invalid(where, "action 'via' needs field 'via' (a next-hop address)")
            via = parse_ip(d["via"], f"{where}: via")
            if via.version != pfx.version:
                raise Invalid(f"{where}: via", f"{via} is IPv{via.version} but the prefix is "
                                               f"IPv{pfx.version}")
        elif d.get("via") is not None:
            raise Invalid(f"{where}: via", f"action {action!r} takes no next hop")
        return cls(tenant=parse_name(d["tenant"], f"{where}: tenant"), prefix=pfx,
                   action=action, via=via)

    @classmethod
    def _switches_as_action(cls, d: Dict[str, Any], where: str) -> Dict[str, Any]:
        on = []
        for name in cls.SWITCHES:
            v = d.get(name)
            if v is not None and not isinstance(v, bool):
                raise Invalid(f"{where}: {name}", f"{v!r} is not true or false")
            if v:
                on.append(name)
        given = on + (["via"] if d.get("via") is not None else [])
        if len(given) > 1:
            raise Invalid(where, f"{' and '.join(given)} exclude each other (one next hop)")
        if on and d.get("action") not in (None, on[0]):
            raise Invalid(where, f"{on[0]} = true and action {d['action']!r} disagree")
        d = {k: v for k, v in d.items() if k not in cls.SWITCHES}
        if on:
            d["action"] = on[0]
        return d

    def to_dict(self) -> Dict[str, Any]:
        return {"tenant": self.tenant, "prefix": str(self.prefix), "action": self.action,
                "via": None if self.via is None else str(self.via)}


@dataclass(frozen=True)
class Rule:
    """A security-group entry. The highest priority number wins; at equal priority the
    lower id wins. `allow` is stateful: replies of an allowed flow pass without a rule."""
    id: int
    tenant: str
    priority: int
    action: str
    src: IPNet = ANY
    dst: IPNet = ANY
    proto: int = 0
    sport: Tuple[int, int] = (0, 65535)
    dport: Tuple[int, int] = (0, 65535)
    icmp_type: Optional[int] = None
    icmp_code: Optional[int] = None
    in_port: Optional[str] = None
    comment: str = ""
    rate: Optional[str] = None       # rate limit of the flows it allows (forward direction)
    burst: Optional[int] = None

    FIELDS = ("id", "tenant", "priority", "action", "src", "dst", "proto", "sport", "dport",
              "icmp_type", "icmp_code", "in_port", "comment", "rate", "burst")

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Rule":
        where = f"rule {d.get('id', '?')}" if isinstance(d, dict) else "rule"
        _check_keys(d, where, cls.FIELDS, ("id", "tenant", "priority", "action"))
        src = parse_prefix(d.get("src"), f"{where}: src")
        dst = parse_prefix(d.get("dst"), f"{where}: dst")
        anyp = ANY
        if src != anyp and dst != anyp and src.version != dst.version:
            raise Invalid(where, f"src {src} and dst {dst} are of different IP versions")
        proto = parse_protocol(d.get("proto"), f"{where}: proto")
        sport = parse_port_range(d.get("sport"), f"{where}: sport")
        dport = parse_port_range(d.get("dport"), f"{where}: dport")
        if proto not in (6, 17) and ((0, 65535) != sport or (0, 65535) != dport):
            raise Invalid(where, "ports (sport/dport) need proto tcp or udp")
        icmp_type = d.get("icmp_type")
        icmp_code = d.get("icmp_code")
        if icmp_type is not None or icmp_code is not None:
            if proto not in (1, 58):
                raise Invalid(where, "icmp_type/icmp_code need proto icmp or icmpv6")
            if icmp_type is None:
                raise Invalid(where, "icmp_code needs icmp_type")
            icmp_type = parse_int(icmp_type, f"{where}: icmp_type", 0, 255)
            if icmp_code is not None:
                icmp_code = parse_int(icmp_code, f"{where}: icmp_code", 0, 255)
        version = src.version if src != anyp else (dst.version if dst != anyp else None)
        if proto == 1 and version == 6:
            raise Invalid(where, "proto icmp is IPv4; use icmpv6 with IPv6 prefixes")
        if proto == 58 and version == 4:
            raise Invalid(where, "proto icmpv6 is IPv6; use icmp with IPv4 prefixes")
        comment = d.get("comment")
        comment = "" if comment is None else comment
        if not isinstance(comment, str) or len(comment) > 256:
            raise Invalid(f"{where}: comment", "must be text of at most 256 characters")
        rate, burst = parse_limit(d, where)
        if rate is not None and d.get("action") != "allow":
            raise Invalid(f"{where}: rate", "a rate limit needs action allow (it limits "
                                            "what the rule lets through)")
        return cls(
            id=parse_int(d["id"], f"{where}: id", 1, MAX_RULE_ID),
            tenant=parse_name(d["tenant"], f"{where}: tenant"),
            priority=parse_int(d["priority"], f"{where}: priority", 0, MAX_PRIORITY),
            action=parse_choice(d["action"], f"{where}: action", RULE_ACTIONS),
            src=src, dst=dst, proto=proto, sport=sport, dport=dport,
            icmp_type=icmp_type, icmp_code=icmp_code,
            in_port=None if d.get("in_port") is None else parse_ifname(d["in_port"], f"{where}: in_port"),
            comment=comment, rate=rate, burst=burst,
        )

    def to_dict(self) -> Dict[str, Any]:
        return {
            "id": self.id, "tenant": self.tenant, "priority": self.priority,
            "action": self.action, "src": prefix_str(self.src), "dst": prefix_str(self.dst),
            "proto": PROTOCOL_NAMES.get(self.proto, self.proto) if self.proto else None,
            "sport": _fmt_range(self.sport), "dport": _fmt_range(self.dport),
            "icmp_type": self.icmp_type, "icmp_code": self.icmp_code,
            "in_port": self.in_port, "comment": self.comment, **limit_dict(self),
        }

    def same_match(self, other: "Rule") -> bool:
        a, b = self.to_dict(), other.to_dict()
        for k in ("id", "priority", "action", "comment", "rate", "burst"):
            a.pop(k, None), b.pop(k, None)
        return a == b



# NAT (issue 11): the external side of a node is IPv4 behind its uplink.
SNAT_PORTS = (20000, 60000)     # the default range SNAT allocates source ports from


def parse_ipv4(value: Any, where: str) -> ipaddress.IPv4Address:
    ip = parse_ip(value, where)
    if ip.version != 4:
        raise Invalid(where, f"{ip} is IPv6; NAT is IPv4 only")
    if ip.is_multicast or ip.is_unspecified or ip.is_loopback or ip == ipaddress.ip_address(
            "255.255.255.255"):
        raise Invalid(where, f"{ip} is not a unicast address")
    return ip


@dataclass(frozen=True)
class Fip:
    """A floating IP (1:1 NAT): external address `ip`, reached through the uplink, is the
    tenant's endpoint `to`; what `to` sends outside the tenant leaves as `ip`."""
    tenant: str
    ip: ipaddress.IPv4Address
    to: ipaddress.IPv4Address

    FIELDS = ("tenant", "ip", "to")

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Fip":
        where = (f"fip {d.get('tenant', '?')}/{d.get('ip', '?')}"
                 if isinstance(d, dict) else "fip")
        _check_keys(d, where, cls.FIELDS, cls.FIELDS)
        return cls(tenant=parse_name(d["tenant"], f"{where}: tenant"),
                   ip=parse_ipv4(d["ip"], f"{where}: ip"),
                   to=parse_ipv4(d["to"], f"{where}: to"))

    def to_dict(self) -> Dict[str, Any]:
        return {"tenant": self.tenant, "ip": str(self.ip), "to": str(self.to)}


@dataclass(frozen=True)
class Snat:
    """Source NAT of a tenant (one each): its connections to the external network leave
    as address `to` with a source port the datapath allocates from `ports`."""
    tenant: str
    to: ipaddress.IPv4Address
    ports: Tuple[int, int] = SNAT_PORTS

    FIELDS = ("tenant", "to", "ports")

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Snat":
        where = f"snat {d.get('tenant', '?')}" if isinstance(d, dict) else "snat"
        _check_keys(d, where, cls.FIELDS, ("tenant", "to"))
        ports = d.get("ports")
        if ports is None:
            rng = SNAT_PORTS
        else:
            if ports in ("", "any"):
                raise Invalid(f"{where}: ports", f"{ports!r} is not a port range (LO-HI)")
            rng = parse_port_range(ports, f"{where}: ports")
            if rng[0] < 1:
                raise Invalid(f"{where}: ports", "port 0 cannot be allocated (1-65535)")
        return cls(tenant=parse_name(d["tenant"], f"{where}: tenant"),
                   to=parse_ipv4(d["to"], f"{where}: to"), ports=rng)

    def to_dict(self) -> Dict[str, Any]:
        return {"tenant": self.tenant, "to": str(self.to),
                "ports": f"{self.ports[0]}-{self.ports[1]}"}


KINDS = {"tenants": Tenant, "ports": Port, "endpoints": Endpoint, "routes": Route,
         "rules": Rule, "fips": Fip, "snats": Snat}


def _placed(e: Invalid, kind: str, i: int) -> Invalid:
    """`e` with the place of object `i` of `kind` in an apply file: "rules[3].dport" (the
    field its `where` or an unknown-field message names, if any)."""
    field = e.where.partition(": ")[2] if ": " in e.where else ""
    unknown = re.match(r"unknown field '([^']+)'", e.message)
    field = unknown.group(1) if unknown else field
    e.at = f"{kind}[{i}]" + (f".{field}" if field else "")
    return e


def _refuse_twice(kind: str, objs: list) -> None:
    """An object whose identity an earlier one of the same list has: refused, naming both
    places."""
    if kind == "rules":
        idents = [(r.id,) for r in objs]
    else:
        idents = [identity(kind, o) for o in objs]
    if len(set(idents)) == len(idents):
        return
    seen: Dict[Tuple, int] = {}
    for i, ident in enumerate(idents):
        j = seen.setdefault(ident, i)
        if j != i:
            e = Invalid(f"{kind[:-1]} {'/'.join(str(x) for x in ident)}",
                        f"given twice (first at {kind}[{j}])")
            e.at, e.first_at = f"{kind}[{i}]", f"{kind}[{j}]"
            raise e


# -- rules in bulk (apply): the same checks as Rule.from_dict, at a third of its cost ----
# A 100,000-rule file repeats most of its values (tenant, action, protocol, ports): each
# distinct value is parsed once per request. Anything but the plain case (rate limits,
# ICMP types, unhashable values, any error) goes through Rule.from_dict, which names what
# is wrong; a test checks both build equal rules.

_RULE_KEYS = frozenset(Rule.FIELDS)
_NOT_PLAIN = ("rate", "burst", "icmp_type", "icmp_code")
_PLAIN_KEYS = _RULE_KEYS - frozenset(_NOT_PLAIN)
_rule_new = object.__new__
_set = object.__setattr__


def rules_from_dicts(items: List[Any]) -> List[Rule]:
    """Rules of an apply request, in order; an error names the rule's place (`at`)."""
    memo: Dict[Tuple, Any] = {}
    out = []
    append = out.append
    for i, d in enumerate(items):
        r = _plain_rule(d, memo)
        if r is None:
            try:
                r = Rule.from_dict(d)
            except Invalid as e:
                raise _placed(e, "rules", i) from None
        append(r)
    return out


def _plain_fields(action: Any, tenant: Any, proto: Any, sport: Any, dport: Any,
                  in_port: Any) -> Optional[Tuple]:
    """The fields rules share, parsed; None when any is wrong (or not plainly given), or
    ports are given without tcp or udp."""
    try:
        out = (parse_choice(action, "action", RULE_ACTIONS), parse_name(tenant, "tenant"),
               parse_protocol(proto, "proto"), parse_port_range(sport, "sport"),
               parse_port_range(dport, "dport"),
               None if in_port is None else parse_ifname(in_port, "in_port"))
    except Invalid:
        return None
    if out[2] not in (6, 17) and (out[3] != (0, 65535) or out[4] != (0, 65535)):
        return None
    return out


def _plain_prefix(value: Any) -> Optional[IPNet]:
    if value is None:
        return ANY
    try:
        return parse_prefix(value, "prefix")
    except Invalid:
        return None


def _plain_rule(d: Any, memo: Dict[Tuple, Any]) -> Optional[Rule]:
    """The rule `d` describes when it is a plain one and valid; None otherwise."""
    if type(d) is not dict:
        return None
    get = d.get
    if not d.keys() <= _PLAIN_KEYS and (not d.keys() <= _RULE_KEYS or any(
            get(k) is not None for k in _NOT_PLAIN)):
        return None
    rid, prio = get("id"), get("priority")
    if type(rid) is not int or not 1 <= rid <= MAX_RULE_ID or \
            type(prio) is not int or not 0 <= prio <= MAX_PRIORITY:
        return None
    comment = get("comment")
    if comment is None:
        comment = ""
    elif type(comment) is not str or len(comment) > 256:
        return None
    # Parsed once per distinct combination (types too: True is not 1 here).
    action, tenant, proto, sport, dport, in_port = raw = (
        get("action"), get("tenant"), get("proto"), get("sport"), get("dport"), get("in_port"))
    key = raw + (type(proto), type(sport), type(dport))
    try:
        shared = memo[key]
    except KeyError:
        shared = memo[key] = _plain_fields(*raw)
    except TypeError:           # a list: Rule.from_dict reads it
        return None
    if shared is None:
        return None
    action, tenant, proto, sport, dport, in_port = shared
    src = _plain_prefix(get("src"))
    dst = _plain_prefix(get("dst"))
    if src is None or dst is None:
        return None
    # _version: ipaddress's class constant (version is a property call).
    if src is not ANY and dst is not ANY and src._version != dst._version:
        return None
    if proto == 1 or proto == 58:
        version = src._version if src is not ANY else (
            dst._version if dst is not ANY else None)
        if (proto == 1 and version == 6) or (proto == 58 and version == 4):
            return None
    # Rule's own __init__ sets its 15 frozen fields one by one (a third of the cost);
    # a dataclass without slots is its __dict__, made here whole.
    r = _rule_new(Rule)
    _set(r, "__dict__", {"id": rid, "tenant": tenant, "priority": prio, "action": action,
                         "src": src, "dst": dst, "proto": proto, "sport": sport,
                         "dport": dport, "icmp_type": None, "icmp_code": None,
                         "in_port": in_port, "comment": comment, "rate": None,
                         "burst": None})
    return r


def identity(kind: str, obj) -> Tuple:
    """The key that names one object of a kind (what `del` takes)."""
    if kind == "tenants":
        return (obj.name,)
    if kind == "ports":
        return (obj.name,)
    if kind == "endpoints":
        return (obj.tenant, str(obj.ip))
    if kind == "routes":
        return (obj.tenant, str(obj.prefix))
    if kind == "rules":
        return (obj.id,)
    if kind == "fips":
        return (obj.tenant, str(obj.ip))
    if kind == "snats":
        return (obj.tenant,)
    raise KeyError(kind)


def identities(kind: str, objs: Iterable[Any]) -> List[Tuple]:
    """identity() of each object, a rule's (id,) without a call per rule (an apply of a
    100,000-rule state takes them three times)."""
    if kind == "rules":
        return [(o.id,) for o in objs]
    return [identity(kind, o) for o in objs]


@dataclass
class State:
    """A whole desired state. `validate()` checks the references between objects."""
    tenants: List[Tenant] = field(default_factory=list)
    ports: List[Port] = field(default_factory=list)
    endpoints: List[Endpoint] = field(default_factory=list)
    routes: List[Route] = field(default_factory=list)
    rules: List[Rule] = field(default_factory=list)
    fips: List[Fip] = field(default_factory=list)
    snats: List[Snat] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: Dict[str, Any], where: str = "state") -> "State":
        if d is None:
            d = {}
        _check_keys(d, where, KINDS)
        st = cls()
        for kind, typ in KINDS.items():
            items = d.get(kind) or []
            if not isinstance(items, list):
                raise Invalid(f"{where}: {kind}", "must be a list")
            setattr(st, kind, [typ.from_dict(x) for x in items])
        return st

    @classmethod
    def from_apply(cls, d: Dict[str, Any], no_duplicates: bool = False) -> "State":
        """An apply request's state: from_dict, with each object's place in the file on
        its error (Invalid.at); with `no_duplicates`, an object given twice in it is
        refused (an apply file's rule; an API caller's later object replaces the
        earlier). The one check of an apply file's objects: the client sends the file as
        it parsed it and turns `at` into a line."""
        if d is None:
            d = {}
        _check_keys(d, "state", KINDS)
        st = cls()
        for kind, typ in KINDS.items():
            items = d.get(kind) or []
            if not isinstance(items, list):
                raise Invalid(f"state: {kind}", "must be a list")
            objs = [] if kind != "rules" else rules_from_dicts(items)
            if kind != "rules":
                for i, x in enumerate(items):
                    try:
                        objs.append(typ.from_dict(x))
                    except Invalid as e:
                        raise _placed(e, kind, i) from None
            if no_duplicates:
                _refuse_twice(kind, objs)
            setattr(st, kind, objs)
        return st

    def to_dict(self) -> Dict[str, Any]:
        return {kind: [o.to_dict() for o in self.sorted(kind)] for kind in KINDS}

    def sorted(self, kind: str) -> list:
        return sorted(getattr(self, kind), key=lambda o: tuple(str(x) for x in identity(kind, o))
                      if kind != "rules" else (o.id,))

    def copy(self) -> "State":
        return State(*(list(getattr(self, k)) for k in KINDS))

    def tenant(self, name: str) -> Optional[Tenant]:
        for t in self.tenants:
            if t.name == name:
                return t
        return None

    def validate(self) -> None:
        names, ids, vnis = {}, {}, {}
        for t in self.tenants:
            if t.name in names:
                raise Conflict(f"tenant {t.name}", "defined twice")
            if t.id in ids:
                raise Conflict(f"tenant {t.name}", f"id {t.id} is already tenant {ids[t.id]}")
            if t.vni is not None and t.vni in vnis:
                raise Conflict(f"tenant {t.name}", f"vni {t.vni} is already tenant {vnis[t.vni]}")
            names[t.name], ids[t.id] = t, t.name
            if t.vni is not None:
                vnis[t.vni] = t.name
        ports, local_ips = {}, {}
        for p in self.ports:
            if p.name in ports:
                raise Conflict(f"port {p.name}", "defined twice")
            if p.uplink and p.local_ip in local_ips:
                raise Conflict(f"port {p.name}", f"local_ip {p.local_ip} is already uplink "
                                                 f"{local_ips[p.local_ip]}'s")
            if p.uplink:
                local_ips[p.local_ip] = p.name
            if not p.uplink and p.tenant not in names:
                raise Conflict(f"port {p.name}", f"unknown tenant {p.tenant!r}")
            ports[p.name] = p
        eps = {}
        for e in self.endpoints:
            where = f"endpoint {e.tenant}/{e.ip}"
            if e.tenant not in names:
                raise Conflict(where, f"unknown tenant {e.tenant!r}")
            if e.vtep is not None:
                self._check_remote(e, where, names[e.tenant], local_ips)
                if (e.tenant, e.ip) in eps:
                    raise Conflict(where, "defined twice")
                eps[(e.tenant, e.ip)] = e
                continue
            if e.port not in ports:
                raise Conflict(where, f"unknown port {e.port!r}")
            if ports[e.port].uplink:
                raise Conflict(where, f"port {e.port} is an uplink, not a tenant's port")
            if ports[e.port].tenant != e.tenant:
                raise Conflict(where, f"port {e.port} belongs to tenant {ports[e.port].tenant}")
            if (e.tenant, e.ip) in eps:
                raise Conflict(where, "defined twice")
            eps[(e.tenant, e.ip)] = e
        seen = set()
        for r in self.routes:
            where = f"route {r.tenant}/{r.prefix}"
            if r.tenant not in names:
                raise Conflict(where, f"unknown tenant {r.tenant!r}")
            if (r.tenant, r.prefix) in seen:
                raise Conflict(where, "defined twice")
            seen.add((r.tenant, r.prefix))
            if r.action == "via" and (r.tenant, r.via) not in eps:
                raise Conflict(where, f"next hop {r.via} is not an endpoint of tenant {r.tenant}")
        rule_ids = set()
        for r in self.rules:
            if r.id in rule_ids:
                raise Conflict(f"rule {r.id}", "id used twice")
            rule_ids.add(r.id)
            _check_rule(r, names, ports)
        self._check_nat(names, eps, local_ips)

    def _check_nat(self, names, eps, local_ips) -> None:
        """Floating IPs and SNAT: each external address means one thing on the node."""
        snat_addrs, snat_tenants = {}, set()
        for s in self.snats:
            where = f"snat {s.tenant}"
            if s.tenant not in names:
                raise Conflict(where, f"unknown tenant {s.tenant!r}")
            if s.tenant in snat_tenants:
                raise Conflict(where, "defined twice (one SNAT per tenant)")
            snat_tenants.add(s.tenant)
            # Tenants may share an address (the node's): the datapath allocates ports
            # across all of them.
            snat_addrs.setdefault(s.to, s.tenant)
        fip_ips, fip_tos = {}, {}
        for f in self.fips:
            where = f"fip {f.tenant}/{f.ip}"
            if f.tenant not in names:
                raise Conflict(where, f"unknown tenant {f.tenant!r}")
            if f.ip in fip_ips:
                raise Conflict(where, f"{f.ip} is already a floating IP of tenant "
                                      f"{fip_ips[f.ip]}")
            if f.ip in snat_addrs:
                raise Conflict(where, f"{f.ip} is the SNAT address of tenant "
                                      f"{snat_addrs[f.ip]}")
            if f.ip in local_ips:
                raise Conflict(where, f"{f.ip} is this node's own (uplink "
                                      f"{local_ips[f.ip]}'s local_ip)")
            e = eps.get((f.tenant, f.to))
            if e is None or e.vtep is not None:
                raise Conflict(f"{where}: to", f"{f.to} is not an endpoint of tenant "
                                               f"{f.tenant} on this node")
            if (f.tenant, f.to) in fip_tos:
                raise Conflict(f"{where}: to", f"{f.to} already has floating IP "
                                               f"{fip_tos[(f.tenant, f.to)]}")
            fip_ips[f.ip] = f.tenant
            fip_tos[(f.tenant, f.to)] = f.ip

    def rule_index(self) -> Dict[int, "Rule"]:
        """Rule id -> rule, kept with this state while its rule list is unchanged (a
        state made by one rule's change gets its own from this one's, not from a scan)."""
        held = self.__dict__.get("_rule_index")
        if held is None or held[0] is not self.rules or held[1] != len(self.rules):
            held = (self.rules, len(self.rules), {r.id: r for r in self.rules})
            self.__dict__["_rule_index"] = held
        return held[2]

    def _with_rules(self, rules: List["Rule"], index: Dict[int, "Rule"]) -> "State":
        """This state with another rule list (the other lists shared: states are values,
        never changed in place once made)."""
        st = State(self.tenants, self.ports, self.endpoints, self.routes, rules, self.fips,
                   self.snats)
        st.__dict__["_rule_index"] = (rules, len(rules), index)
        return st

    def _with_rule_added(self, r: "Rule") -> "State":
        """with_added for one rule, checked on its own in time independent of the rule
        count (the rest of the state is valid already)."""
        index = self.rule_index()
        if r.id in index:
            raise Conflict(f"rule {r.id}", "already exists")
        _check_rule(r, {t.name for t in self.tenants}, {p.name: p for p in self.ports})
        index = self._hand_over_index()
        index[r.id] = r
        return self._with_rules(self.rules + [r], index)

    def _with_rule_removed(self, rid: int) -> "State":
        r = self.rule_index().get(rid)
        if r is None:
            raise Conflict(f"rule {rid}", "does not exist")
        pos = list(map(id, self.rules)).index(id(r))     # by identity, at C speed
        index = self._hand_over_index()
        del index[rid]
        return self._with_rules(self.rules[:pos] + self.rules[pos + 1:], index)

    def _hand_over_index(self) -> Dict[int, "Rule"]:
        """This state's rule index, given up to the state made from it (the usual next
        state: a copy of 100,000 entries would cost more than the change); asked again,
        this state builds its own anew."""
        return self.__dict__.pop("_rule_index")[2]

    def uplink(self) -> Optional[Port]:
        """The uplink remote endpoints are reached through (the first, by name)."""
        ups = [p for p in self.sorted("ports") if p.uplink and p.local_ip.version == 4]
        return ups[0] if ups else None

    def _check_remote(self, e: Endpoint, where: str, tenant: Tenant, local_ips) -> None:
        if tenant.vni is None:
            raise Conflict(where, f"tenant {tenant.name} has no VNI (tenant add --vni) to "
                                  "reach a remote endpoint with")
        if self.uplink() is None:
            raise Conflict(where, "a remote endpoint needs an uplink port with an IPv4 "
                                  "local_ip (port add IFNAME --uplink --local-ip IP)")
        if e.vtep in local_ips:
            raise Conflict(f"{where}: vtep", f"{e.vtep} is this node's own (uplink "
                                             f"{local_ips[e.vtep]})")

    def users_of_tenant(self, name: str) -> Dict[str, int]:
        """How many objects of each kind belong to tenant `name` (kinds with none left out)."""
        out = {}
        for kind in KINDS:
            if kind != "tenants":
                n = sum(1 for o in getattr(self, kind) if o.tenant == name)
                if n:
                    out[kind] = n
        return out

    def without_tenant(self, name: str, cascade: bool = False) -> "State":
        """The state without tenant `name`; with `cascade`, without everything of it too.
        Without it, a tenant still in use is refused naming what uses it."""
        if self.tenant(name) is None:
            raise Conflict(f"tenant {name}", "does not exist")
        users = self.users_of_tenant(name)
        if users and not cascade:
            raise Conflict(f"tenant {name}", f"still has {count_phrase(users)}; delete those "
                                             "first, or delete with --cascade")
        st = self.copy()
        for kind in KINDS:
            key = (lambda o: o.name) if kind == "tenants" else (lambda o: o.tenant)
            setattr(st, kind, [o for o in getattr(st, kind) if key(o) != name])
        st.validate()
        return st

    def merged(self, other: "State") -> "State":
        """This state with every object of `other` added or replacing the one of the same
        identity; objects `other` does not mention are kept (apply without --prune)."""
        st = State()
        for kind in KINDS:
            mine, theirs = getattr(self, kind), getattr(other, kind)
            items = dict(zip(identities(kind, mine), mine))
            items.update(zip(identities(kind, theirs), theirs))
            setattr(st, kind, list(items.values()))
        return st

    # -- changes: each returns a new State and leaves this one as it was ------------------
    def with_added(self, kind: str, obj) -> "State":
        if kind == "rules":
            return self._with_rule_added(obj)
        st = self.copy()
        ident = identity(kind, obj)
        for o in getattr(st, kind):
            if identity(kind, o) == ident:
                raise Conflict(f"{kind[:-1]} {'/'.join(str(x) for x in ident)}", "already exists")
        getattr(st, kind).append(obj)
        st.validate()
        return st

    def with_removed(self, kind: str, ident: Tuple) -> "State":
        ident = tuple(ident)
        if kind == "rules" and len(ident) == 1 and isinstance(ident[0], int):
            return self._with_rule_removed(ident[0])
        st = self.copy()
        items = getattr(st, kind)
        keep = [o for o in items if identity(kind, o) != ident]
        if len(keep) == len(items):
            raise Conflict(f"{kind[:-1]} {'/'.join(str(x) for x in ident)}", "does not exist")
        setattr(st, kind, keep)
        # Removing a tenant or port removes what hangs off it only when asked explicitly;
        # otherwise validate() names what still refers to it.
        st.validate()
        return st


def matching_rule(rules: Iterable["Rule"], proto: int, src_ip: IPAddr, dst_ip: IPAddr,
                  sport: int, dport: int, in_port: Optional[str]) -> Optional["Rule"]:
    """The rule a packet matches, read plainly: of the rules that match, the highest
    priority, then the lowest id. What the compiled classifier must agree with (ICMP:
    `dport` is type << 8 | code)."""
    best = None
    for r in rules:
        if r.proto and r.proto != proto:
            continue
        if r.src != ANY and (src_ip.version != r.src.version or src_ip not in r.src):
            continue
        if r.dst != ANY and (dst_ip.version != r.dst.version or dst_ip not in r.dst):
            continue
        if r.proto in (6, 17):
            if not (r.sport[0] <= sport <= r.sport[1] and r.dport[0] <= dport <= r.dport[1]):
                continue
        if r.proto in (1, 58) and r.icmp_type is not None:
            if dport >> 8 != r.icmp_type or (r.icmp_code is not None and
                                             dport & 0xFF != r.icmp_code):
                continue
        if r.in_port is not None and r.in_port != in_port:
            continue
        if best is None or (-r.priority, r.id) < (-best.priority, best.id):
            best = r
    return best


def _check_rule(r: "Rule", tenants, ports: Dict[str, "Port"]) -> None:
    """A rule's references: its tenant, and its in_port (a port of that tenant)."""
    where = f"rule {r.id}"
    if r.tenant not in tenants:
        raise Conflict(where, f"unknown tenant {r.tenant!r}")
    if r.in_port is not None:
        if r.in_port not in ports:
            raise Conflict(where, f"in_port: unknown port {r.in_port!r}")
        if ports[r.in_port].uplink:
            raise Conflict(where, f"in_port: port {r.in_port} is an uplink, not a "
                                  "tenant's port")
        if ports[r.in_port].tenant != r.tenant:
            raise Conflict(where, f"in_port: port {r.in_port} belongs to tenant "
                                  f"{ports[r.in_port].tenant}")


def count_phrase(counts: Dict[str, int]) -> str:
    """{"ports": 1, "rules": 2} -> "1 port, 2 rules"."""
    return ", ".join(f"{n} {kind if n != 1 else kind[:-1]}" for kind, n in counts.items())


def count_changes(d: Dict[str, Dict[str, list]]) -> int:
    """How many objects a diff adds, removes or changes (kept ones are no change); of a
    kind whose lists were cut (diff's `limit`), its "counts"."""
    n = 0
    for part in d.values():
        if not isinstance(part, dict):
            continue
        counts = part.get("counts")
        if isinstance(counts, dict):
            n += sum(v for k, v in counts.items() if k != "keep" and isinstance(v, int))
        else:
            n += sum(len(v) for k, v in part.items() if k != "keep" and isinstance(v, list))
    return n


def _ident_order(ident: Tuple):
    return tuple((0, x, "") if isinstance(x, int) else (1, 0, str(x)) for x in ident)


def diff(old: State, new: State, kept: Optional[State] = None,
         limit: Optional[int] = None) -> Dict[str, Dict[str, list]]:
    """What `apply` would change: per kind, added / removed / changed identities. With
    `kept` (the file's own state, when apply does not prune), objects of `old` the file
    does not mention are listed under "keep": they stay, and the diff says so.

    With `limit`, each list shows its first `limit` objects (in identity order), and a
    kind with a longer list also says how many each holds: "counts": {"add": N, ...}.
    A 100,000-rule apply's diff is 20 MB of JSON that nobody reads whole."""
    out = {}
    for kind in KINDS:
        part = out.setdefault(kind, {})
        if kept is not None:
            have = getattr(old, kind)
            named = set(identities(kind, getattr(kept, kind))) if have else set()
            part["keep"] = [o for i, o in sorted(zip(identities(kind, have), have),
                                                 key=lambda io: _ident_order(io[0]))
                            if i not in named]
        if kind == "rules":
            # Keyed by id (an identity of one int): sorted as _ident_order sorts (id,),
            # without a key or a tuple built per rule.
            a = {o.id: o for o in old.rules}
            b = {o.id: o for o in new.rules}
            order = None
        else:
            a = {identity(kind, o): o for o in getattr(old, kind)}
            b = {identity(kind, o): o for o in getattr(new, kind)}
            order = _ident_order
        part["add"] = [b[k] for k in sorted(b.keys() - a.keys(), key=order)]
        part["remove"] = [a[k] for k in sorted(a.keys() - b.keys(), key=order)]
        part["change"] = [k for k in sorted(a.keys() & b.keys(), key=order) if a[k] != b[k]]
        if limit is not None and any(len(v) > limit for v in part.values()):
            part["counts"] = {k: len(v) for k, v in part.items()}
        for k, objs in part.items():
            if k == "counts":
                continue
            objs = objs if limit is None else objs[:limit]
            part[k] = ([{"from": a[i].to_dict(), "to": b[i].to_dict()} for i in objs]
                       if k == "change" else [o.to_dict() for o in objs])
    return out


def replace(obj, **changes):
    return dataclasses.replace(obj, **changes)
