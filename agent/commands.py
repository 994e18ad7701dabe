"""The one command table: every command the agent's control API serves, with its help,
examples, arguments and the controller call it maps to.

The API server dispatches from it and `xdpflowctl` builds its argparse parsers and help
from it, so a command cannot exist on one side only. Arguments are named in the field's own
words and are the keys of the request's `args` on the wire.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from agent import model


_JSON_TYPE = {"str": "string", "int": "integer", "float": "number", "flag": "boolean",
              "object": "object", "list": "array of strings"}


class BadArgs(Exception):
    """The request's arguments do not fit the command's spec (the API's "bad-request").

    Distinct from model.Invalid: these are shapes no CLI would send (a missing or unknown
    argument, a list where a string goes), while Invalid is a value the user typed wrong."""


@dataclass(frozen=True)
class Arg:
    """One argument of a command.

    `flags` empty means positional. `kind` is the JSON type on the wire: "str", "int",
    "float", "flag" (a boolean switch), "object" (a JSON table), "list" (strings; a
    repeatable flag). `wire=False` arguments exist only in the CLI, which turns them into wire arguments before sending (a TOML file becomes
    `state`, a Scapy expression becomes `hex`); `cli=False` ones exist only on the wire."""
    name: str
    help: str
    flags: Tuple[str, ...] = ()
    kind: str = "str"
    required: bool = False
    choices: Optional[Tuple[str, ...]] = None
    metavar: Optional[str] = None
    default: Any = None
    wire: bool = True
    cli: bool = True

    @property
    def positional(self) -> bool:
        return not self.flags


@dataclass(frozen=True)
class Stream:
    """What a streaming command's call returns: `head`, the result of its one reply, and
    `adopt(sock, reply_line)`, which takes the connection over: it writes the reply line
    once it is ready to stream, then one JSON object per line until either side closes."""
    head: Any
    adopt: Callable[[Any, bytes], None]


@dataclass(frozen=True)
class Command:
    """One command: `name` as typed ("rule add"), whether it changes state (then only root
    or the admin group may run it), a one-line help, examples for the CLI's epilog, its
    arguments, groups of arguments of which exactly one (`required`) or at most one must be
    given, and `run(controller, args)`, the controller call with checked arguments."""
    name: str
    mutating: bool
    help: str
    examples: str
    run: Callable[[Any, Dict[str, Any]], Any]
    args: Tuple[Arg, ...] = ()
    exclusive: Tuple[Tuple[Tuple[str, ...], bool], ...] = ()
    description: str = ""
    stream: bool = False       # the reply is followed by a stream of lines (a Stream)
    # Shows tenants' packet bytes (monitor): changes nothing, yet only root or the admin
    # group may run it, as only root may run tcpdump on the node.
    sees_packets: bool = False

    def changes_state(self, args: Dict[str, Any]) -> bool:
        # A dry run shows what would change and changes nothing, so anyone who may read
        # the state may ask for one.
        if self.name == "apply" and isinstance(args, dict) and args.get("dry_run") is True:
            return False
        return self.mutating

    def needs_admin(self, args: Dict[str, Any]) -> bool:
        return self.changes_state(args) or self.sees_packets

    def wire_args(self) -> List[Arg]:
        return [a for a in self.args if a.wire]

    def check_args(self, args: Any) -> Dict[str, Any]:
        """The request's args, checked against the spec, with defaults filled in."""
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise BadArgs(f"{self.name}: args must be a JSON object")
        spec = {a.name: a for a in self.wire_args()}
        unknown = sorted(set(args) - set(spec))
        if unknown:
            raise BadArgs(f"{self.name}: unknown argument(s) {', '.join(unknown)} "
                          f"(known: {', '.join(sorted(spec)) or 'none'})")
        out: Dict[str, Any] = {}
        for a in spec.values():
            v = args.get(a.name)
            if v is None:
                if a.required:
                    raise BadArgs(f"{self.name}: argument {a.name} is required")
                out[a.name] = False if a.kind == "flag" else a.default
                continue
            ok = {
                "str": lambda x: isinstance(x, str),
                # model.parse_int names the field when it is text or out of range; only
                # the JSON type is checked here.
                "int": lambda x: isinstance(x, (int, str)) and not isinstance(x, bool),
                "float": lambda x: isinstance(x, (int, float)) and not isinstance(x, bool),
                "flag": lambda x: isinstance(x, bool),
                "object": lambda x: isinstance(x, dict),
                "list": lambda x: isinstance(x, list) and all(isinstance(i, str) for i in x),
            }[a.kind](v)
            if not ok:
                raise BadArgs(f"{self.name}: argument {a.name} must be a JSON "
                              f"{_JSON_TYPE[a.kind]}")
            if a.choices is not None and v not in a.choices:
                raise model.Invalid(f"{self.name}: {a.name}",
                                    f"{v!r} is not one of {', '.join(a.choices)}")
            out[a.name] = v
        for names, required in self.exclusive:
            names = [n for n in names if n in spec]
            given = [n for n in names if out.get(n) not in (None, False)]
            if len(given) > 1:
                raise BadArgs(f"{self.name}: {' and '.join(given)} exclude each other")
            if required and not given:
                raise BadArgs(f"{self.name}: one of {', '.join(names)} is required")
        return out


# ---------------------------------------------------------------------------------------
# Controller calls. Each gets the controller and args checked by Command.check_args.

def _only(args: Dict[str, Any], *names: str) -> Dict[str, Any]:
    """The named args that were given, as the model's from_dict takes them."""
    return {n: args[n] for n in names if args.get(n) is not None}


def _list(kind: str, by_tenant: bool = True):
    def run(c, args):
        return c.list(kind, args.get("tenant") if by_tenant else None)
    return run


def _add(kind: str, *fields: str):
    def run(c, args):
        return c.add(kind, _only(args, *fields))
    return run


def _port_add(c, args):
    obj = _only(args, "name", "tenant", "allow", "allow_vlan", "local_ip")
    if args.get("uplink"):
        obj["uplink"] = True
    # An uplink has no port security to switch; --no-port-security on one is named as
    # wrong by the model rather than dropped.
    if not args.get("uplink") or args.get("no_port_security"):
        obj["port_security"] = not args.get("no_port_security")
    return c.add("ports", obj)


def _tenant_ident(args):
    return [model.parse_name(args["name"], "tenant: name")]


def _port_ident(args):
    return [model.parse_ifname(args["name"], "port: name")]


def _endpoint_ident(args):
    # The stored identity is the canonical text of the address ("2001:db8::5"); users may
    # type any spelling of it.
    return [model.parse_name(args["tenant"], "endpoint: tenant"),
            str(model.parse_ip(args["ip"], "endpoint: ip"))]


def _route_prefix(value: str, where: str) -> str:
    return str(model.parse_prefix("0.0.0.0/0" if value == "default" else value, where))


def _route_ident(args):
    return [model.parse_name(args["tenant"], "route: tenant"),
            _route_prefix(args["prefix"], "route: prefix")]


def _rule_ident(args):
    return [model.parse_int(args["id"], "rule: id", 1, model.MAX_RULE_ID)]


def _delete(kind: str, ident_of):
    def run(c, args):
        ident = ident_of(args)
        c.delete(kind, ident)
        return {"deleted": kind[:-1], "identity": ident}
    return run


def _tenant_del(c, args):
    ident = _tenant_ident(args)
    gone = c.delete("tenants", ident, cascade=bool(args.get("cascade")))
    return {"deleted": "tenant", "identity": ident, "cascaded": gone or {}}


def _route_add(c, args):
    obj = _only(args, "tenant", "prefix")
    if args.get("via") is not None:
        obj.update(action="via", via=args["via"])
    elif args.get("kernel"):
        obj["action"] = "kernel"
    else:
        obj["action"] = "drop"
    return c.add("routes", obj)


def next_rule_id(rules: List[Dict[str, Any]]) -> int:
    """The smallest id > 0 that no rule uses, so ids stay small and reuse freed ones."""
    used = {r.get("id") for r in rules}
    n = 1
    while n in used:
        n += 1
    return n


RULE_FIELDS = ("id", "tenant", "priority", "action", "src", "dst", "proto", "sport", "dport",
               "icmp_type", "icmp_code", "in_port", "comment", "rate", "burst")


def _limit_args(what: str) -> Tuple[Arg, Arg]:
    """--rate and --burst of `tenant add` and `rule add`."""
    return (Arg("rate", f"rate limit of {what}: N pps, or N bit|kbit|mbit|gbit (10000pps, "
                        "100mbit); over it packets are dropped (reason ratelimit)",
                flags=("--rate",), metavar="RATE"),
            Arg("burst", "bucket depth: packets for a pps rate, bytes for a bit rate "
                         "(default a tenth of a second's worth)",
                flags=("--burst",), kind="int", metavar="N"))


def _rule_add(c, args):
    obj = _only(args, *RULE_FIELDS)
    if "id" in obj:
        return c.add("rules", obj)
    # Rule ids are global across tenants (identity is the id alone), so the free one is
    # searched among all rules. The API server holds the controller lock around the whole
    # dispatch, so nothing can take this id between the list and the add.
    obj["id"] = next_rule_id(c.list("rules", None))
    try:
        return c.add("rules", obj)
    except model.Invalid as e:
        # The user gave no id: an error about "rule 3" would name one they never saw.
        picked = f"rule {obj['id']}"
        if not e.where.startswith(picked):
            raise
        raise type(e)("new rule" + e.where[len(picked):], e.message) from None


def _apply(c, args):
    limit = args.get("diff_limit")
    if limit is not None:
        model.parse_int(limit, "apply: diff_limit", 0, model.MAX_RULE_ID)
    return c.apply(args["state"], bool(args.get("dry_run")), prune=bool(args.get("prune")),
                   diff_limit=limit, no_duplicates=bool(args.get("no_duplicates")))


# What xdpflowctl asks an apply's diff to list of each kind's added, removed, changed and
# kept objects (the counts say the rest): what a person reads; --full-diff lists all.
DIFF_SHOWN = 1000


# What one `flow dump` may return: a client pages with --tenant/--limit, and a reply of a
# million flows would be hundreds of megabytes of JSON built by the agent.
MAX_FLOW_DUMP = 100_000


def _flow_dump(c, args):
    limit = model.parse_int(args.get("limit"), "flow dump: limit", 1, 10_000_000)
    filters = {}
    if args.get("port") is not None:
        filters["port"] = model.parse_ifname(args["port"], "flow dump: port")
    if args.get("proto") is not None:
        filters["proto"] = model.parse_protocol(args["proto"], "flow dump: proto")
    if args.get("ip") is not None:
        filters["ip"] = model.parse_ip(args["ip"], "flow dump: ip")
    if args.get("cursor") is not None:
        filters["cursor"] = args["cursor"]
    return c.flow_dump(args.get("tenant"), limit, **filters)


def _stats(c, args):
    if args.get("tenant") is None:
        return c.stats()
    return c.stats(tenant=model.parse_name(args["tenant"], "stats: tenant"))


def _flow_flush(c, args):
    return {"flushed": c.flow_flush(args.get("tenant"))}


_HEX_JUNK = re.compile(r"[\s:.-]")


def parse_hex(value: str, where: str = "trace: hex") -> bytes:
    """Packet bytes from hex; spaces, ':' '.' '-' separators and a 0x prefix are allowed,
    so the output of most hex dumpers can be pasted."""
    text = _HEX_JUNK.sub("", value)
    if text[:2].lower() == "0x":
        text = text[2:]
    try:
        data = bytes.fromhex(text)
    except ValueError:
        raise model.Invalid(where, "is not hex (pairs of 0-9a-f)") from None
    if len(data) < 14:
        raise model.Invalid(where, f"{len(data)} bytes is shorter than an Ethernet header")
    return data


def _trace(c, args):
    port = model.parse_ifname(args["port"], "trace: port")
    return c.trace(port, parse_hex(args["hex"]))


# ---------------------------------------------------------------------------------------
# Argument specs shared by several commands, in the field's own words.

def _tenant_opt(required: bool, help: str = "the tenant (VPC) by name") -> Arg:
    return Arg("tenant", help, flags=("--tenant", "-t"), required=required, metavar="TENANT")


_TENANT_FILTER = _tenant_opt(False, "only this tenant's")

COMMANDS: Dict[str, Command] = {}


def _cmd(*args, **kw) -> Command:
    c = Command(*args, **kw)
    COMMANDS[c.name] = c
    return c


_cmd("status", False, "show the agent's state: version, uptime, ports attached, flows",
     "  xdpflowctl status\n  xdpflowctl --json status",
     lambda c, a: c.status())

# -- tenants --
_cmd("tenant add", True, "add a tenant (a VPC; its id is in every datapath key)",
     "  xdpflowctl tenant add blue --id 10\n"
     "  xdpflowctl tenant add red --id 20 --vni 5020 --default pass\n"
     "  xdpflowctl tenant add green --id 30 --rate 100mbit --burst 1500000\n"
     "  xdpflowctl tenant add gray --id 40 --max-flows 100000",
     _add("tenants", "name", "id", "vni", "default", "rate", "burst", "max_flows"),
     args=(Arg("name", "the tenant's name", metavar="NAME", required=True),
           Arg("id", f"tenant id, 1..{model.MAX_TENANT_ID}", flags=("--id",), kind="int",
               required=True, metavar="ID"),
           Arg("vni", f"VXLAN VNI between nodes, 1..{model.MAX_VNI}", flags=("--vni",),
               kind="int", metavar="VNI"),
           Arg("default", "verdict for traffic no rule allows: drop (the cloud default) "
                          "or pass to the kernel", flags=("--default",),
               choices=model.VERDICTS),
           Arg("max_flows", "flow-table entries it may hold (a flow and its reply are two); "
                            "over it, new flows are judged but not cached. 0: no quota; "
                            "default: the config's [flows] max_per_tenant",
               flags=("--max-flows",), kind="int", metavar="N")) + _limit_args("all it lets through (what its rules allow, and their replies)"))
_cmd("tenant del", True, "delete a tenant (refused, naming them, while ports, endpoints, "
                         "routes or rules still belong to it, unless --cascade)",
     "  xdpflowctl tenant del blue\n  xdpflowctl tenant del blue --cascade",
     _tenant_del,
     args=(Arg("name", "the tenant's name", metavar="NAME", required=True),
           Arg("cascade", "also delete its ports, endpoints, routes and rules",
               flags=("--cascade",), kind="flag")))
_cmd("tenant list", False, "list tenants",
     "  xdpflowctl tenant list",
     _list("tenants", by_tenant=False))

# -- ports --
_cmd("port add", True, "put a node interface (a VM's veth or tap) in a tenant; what it sends "
     "must come from the MAC and address of one of its endpoints (port security). Or, with "
     "--uplink, make it the node's port to the underlay/external network",
     "  xdpflowctl port add veth-vm1 --tenant blue\n"
     "  xdpflowctl port add veth-vm2 --tenant blue --allow 10.0.0.64/26 --allow-vlan\n"
     "  xdpflowctl port add veth-fw --tenant blue --no-port-security\n"
     "  xdpflowctl port add eth1 --uplink --local-ip 192.0.2.1",
     _port_add,
     description="Prints what happened: attached (in native or generic mode), waiting for "
                 "the interface (it does not exist yet; attached when it appears), or "
                 "attaching failed and why. A failed attach exits 1; the port stays "
                 "configured (fix the cause, or delete the port).",
     args=(Arg("name", "interface name", metavar="IFNAME", required=True),
           _tenant_opt(False),
           Arg("allow", "also accept sources in this prefix, with the MAC of one of the "
               "port's endpoints (allowed address pairs; repeatable)", flags=("--allow",),
               kind="list", metavar="PREFIX"),
           Arg("no_port_security", "accept any source MAC and address from this port",
               flags=("--no-port-security",), kind="flag"),
           Arg("allow_vlan", "accept VLAN-tagged frames from this port (dropped otherwise)",
               flags=("--allow-vlan",), kind="flag"),
           Arg("uplink", "the port faces the underlay/external network and belongs to no "
               "tenant (needs --local-ip)", flags=("--uplink",), kind="flag"),
           Arg("local_ip", "the node's address on the uplink (its VTEP address)",
               flags=("--local-ip",), metavar="IP")),
     exclusive=((("tenant", "uplink"), True),))
_cmd("port del", True, "take an interface out of its tenant",
     "  xdpflowctl port del veth-vm1",
     _delete("ports", _port_ident),
     args=(Arg("name", "interface name", metavar="IFNAME", required=True),))
_cmd("port list", False, "list ports: whether attached, in which mode, and why not",
     "  xdpflowctl port list\n  xdpflowctl port list --tenant blue",
     _list("ports"), args=(_TENANT_FILTER,))

# -- endpoints --
_cmd("endpoint add", True, "say where a tenant address lives: behind a local port, or "
                           "behind another node's VTEP (over VXLAN), with its MAC",
     "  xdpflowctl endpoint add --tenant blue 10.0.0.5 --port veth-vm1 "
     "--mac 02:00:00:00:00:05\n"
     "  xdpflowctl endpoint add --tenant blue 10.0.1.7 --vtep 192.0.2.2 "
     "--mac 02:00:00:00:01:07",
     _add("endpoints", "tenant", "ip", "port", "mac", "vtep"),
     args=(_tenant_opt(True),
           Arg("ip", "the endpoint's address (IPv4 or IPv6)", metavar="IP", required=True),
           Arg("port", "the local port it lives behind", flags=("--port",),
               metavar="IFNAME"),
           Arg("vtep", "the remote node's VTEP address it lives behind (the tenant needs "
               "a VNI, the node an uplink)", flags=("--vtep",), metavar="IP"),
           Arg("mac", "its MAC address", flags=("--mac",), required=True, metavar="MAC")),
     exclusive=((("port", "vtep"), True),))
_cmd("endpoint del", True, "forget a tenant address",
     "  xdpflowctl endpoint del --tenant blue 10.0.0.5",
     _delete("endpoints", _endpoint_ident),
     args=(_tenant_opt(True),
           Arg("ip", "the endpoint's address", metavar="IP", required=True)))
_cmd("endpoint list", False, "list endpoints",
     "  xdpflowctl endpoint list --tenant blue",
     _list("endpoints"), args=(_TENANT_FILTER,))

# -- routes --
_cmd("route add", True, "add a tenant route: a prefix via one of the tenant's endpoints, "
                        "to the node's kernel, or dropped",
     "  xdpflowctl route add --tenant blue 0.0.0.0/0 --via 10.0.0.254\n"
     "  xdpflowctl route add --tenant blue 192.168.0.0/16 --kernel\n"
     "  xdpflowctl route add --tenant blue 10.9.0.0/16 --drop",
     _route_add,
     args=(_tenant_opt(True),
           Arg("prefix", "destination prefix (address/length, or 'default')",
               metavar="PREFIX", required=True),
           Arg("via", "next hop: an endpoint address of the same tenant", flags=("--via",),
               metavar="IP"),
           Arg("kernel", "hand matching traffic to the node's kernel", flags=("--kernel",),
               kind="flag"),
           Arg("drop", "drop matching traffic (a blackhole route)", flags=("--drop",),
               kind="flag")),
     exclusive=((("via", "kernel", "drop"), True),))
_cmd("route del", True, "delete a tenant route",
     "  xdpflowctl route del --tenant blue 0.0.0.0/0",
     _delete("routes", _route_ident),
     args=(_tenant_opt(True),
           Arg("prefix", "destination prefix", metavar="PREFIX", required=True)))
_cmd("route list", False, "list routes",
     "  xdpflowctl route list --tenant blue",
     _list("routes"), args=(_TENANT_FILTER,))

# -- rules --
_cmd("rule add", True, "add a security rule; the highest priority number wins (at equal "
                       "priority, the lower id)",
     "  xdpflowctl rule add --tenant blue --priority 100 --proto tcp --dport 22 "
     "--action allow\n"
     "  xdpflowctl rule add --tenant blue --priority 200 --src 10.0.0.0/24 --proto icmp "
     "--icmp-type 8 --action allow --comment 'ping from the subnet'\n"
     "  xdpflowctl rule add --tenant blue --priority 10 --id 99 --action deny\n"
     "  xdpflowctl rule add --tenant blue --priority 50 --proto udp --dport 53 "
     "--action allow --rate 10000pps --burst 100",
     _rule_add,
     description="A packet no rule matches gets the tenant's default verdict. The highest "
                 "priority number wins; at equal priority the lower id wins. 'allow' is "
                 "stateful: replies of an allowed flow pass without a rule. Without --id the "
                 "agent picks the smallest unused id.",
     args=(_tenant_opt(True),
           Arg("priority", f"0..{model.MAX_PRIORITY}; the highest number wins",
               flags=("--priority", "-p"), kind="int", required=True, metavar="N"),
           Arg("id", "stable rule id (default: the smallest unused one)", flags=("--id",),
               kind="int", metavar="N"),
           Arg("src", "source prefix (default any)", flags=("--src",), metavar="PREFIX"),
           Arg("dst", "destination prefix (default any)", flags=("--dst",),
               metavar="PREFIX"),
           Arg("proto", "tcp, udp, icmp, icmpv6 or a protocol number (default any)",
               flags=("--proto",), metavar="PROTO"),
           Arg("sport", "source port or range LO-HI (tcp/udp)", flags=("--sport",),
               metavar="RANGE"),
           Arg("dport", "destination port or range LO-HI (tcp/udp)", flags=("--dport",),
               metavar="RANGE"),
           Arg("icmp_type", "ICMP type (icmp/icmpv6)", flags=("--icmp-type",), kind="int",
               metavar="T"),
           Arg("icmp_code", "ICMP code (with --icmp-type)", flags=("--icmp-code",),
               kind="int", metavar="C"),
           Arg("in_port", "only packets that came in on this port", flags=("--in-port",),
               metavar="IFNAME"),
           Arg("action", "allow (stateful), deny, or pass to the kernel",
               flags=("--action", "-a"), required=True, choices=model.RULE_ACTIONS),
           Arg("comment", "free text, up to 256 characters", flags=("--comment",),
               metavar="TEXT")) + _limit_args("the flows it allows (what it "
                                              "matched; their replies are not charged)"))
_cmd("rule del", True, "delete a security rule by id",
     "  xdpflowctl rule del 12",
     _delete("rules", _rule_ident),
     args=(Arg("id", "the rule's id", kind="int", metavar="ID", required=True),))
def _rule_list(c, args):
    rules = c.list("rules", args.get("tenant"))
    if args.get("stats"):
        c.add_rule_stats(rules)
    return rules


_cmd("rule list", False, "list security rules",
     "  xdpflowctl rule list --tenant blue\n  xdpflowctl rule list --stats",
     _rule_list,
     description="--stats adds each rule's hits (flows and denied packets it decided) and "
                 "the time of its last hit; rules that never matched are marked.",
     args=(_TENANT_FILTER,
           Arg("stats", "show hits and the last hit time per rule", flags=("--stats",),
               kind="flag")))

# -- NAT (issue 11) --
def _fip_ident(args):
    return [model.parse_name(args["tenant"], "fip: tenant"),
            str(model.parse_ipv4(args["ip"], "fip: ip"))]


def _snat_ident(args):
    return [model.parse_name(args["tenant"], "snat: tenant")]


_cmd("fip add", True, "give a tenant's endpoint a floating IP (1:1 NAT): what the external "
                      "network (behind the uplink) sends to it reaches the endpoint, and "
                      "what the endpoint sends outside its tenant leaves as it",
     "  xdpflowctl fip add --tenant blue 203.0.113.10 --to 10.0.0.5",
     _add("fips", "tenant", "ip", "to"),
     description="IPv4. The endpoint's tenant's rules judge the translated packet (as a "
                 "security group on the endpoint's address). The node answers ARP for the "
                 "floating address on the uplink. A floating IP wins over the tenant's SNAT.",
     args=(_tenant_opt(True),
           Arg("ip", "the floating (external) IPv4 address", metavar="ADDR", required=True),
           Arg("to", "the tenant's endpoint it stands for", flags=("--to",), required=True,
               metavar="VMADDR")))
_cmd("fip del", True, "remove a floating IP",
     "  xdpflowctl fip del --tenant blue 203.0.113.10",
     _delete("fips", _fip_ident),
     args=(_tenant_opt(True),
           Arg("ip", "the floating address", metavar="ADDR", required=True)))
_cmd("fip list", False, "list floating IPs",
     "  xdpflowctl fip list\n  xdpflowctl --json fip list --tenant blue",
     _list("fips"), args=(_TENANT_FILTER,))
_cmd("snat add", True, "source NAT for a tenant (one each): its connections to the external "
                       "network leave with address --to and a source port the datapath "
                       "allocates from --ports",
     "  xdpflowctl snat add --tenant blue --to 198.51.100.1\n"
     "  xdpflowctl snat add --tenant red --to 198.51.100.1 --ports 10000-19999",
     _add("snats", "tenant", "to", "ports"),
     description="IPv4. Tenants may share an address (the node's own): ports are allocated "
                 "across all of them, never twice for the same remote address and port. "
                 "When the range is used up, new connections are dropped and counted "
                 "(reason nat_ports_exhausted). Traffic to the address at a port no flow "
                 "holds is the node's kernel's.",
     args=(_tenant_opt(True),
           Arg("to", "the IPv4 address its connections leave with", flags=("--to",),
               required=True, metavar="ADDR"),
           Arg("ports", f"source ports to allocate, LO-HI (default "
                        f"{model.SNAT_PORTS[0]}-{model.SNAT_PORTS[1]})", flags=("--ports",),
               metavar="LO-HI")))
_cmd("snat del", True, "remove a tenant's SNAT",
     "  xdpflowctl snat del --tenant blue",
     _delete("snats", _snat_ident), args=(_tenant_opt(True),))
_cmd("snat list", False, "list SNATs",
     "  xdpflowctl snat list\n  xdpflowctl --json snat list",
     _list("snats"), args=(_TENANT_FILTER,))

# -- the whole state --
_cmd("apply", True, "apply a desired state (TOML) atomically and show the difference; "
                    "with --prune it is the whole state",
     "  xdpflowctl apply node.toml --dry-run\n  xdpflowctl apply node.toml\n"
     "  xdpflowctl apply whole-node.toml --prune --dry-run",
     _apply,
     description="FILE is TOML with arrays of tables [[tenants]], [[ports]], [[endpoints]], "
                 "[[routes]], [[rules]], [[fips]], [[snats]]; their fields are the add commands' arguments, named "
                 "as the flags are without the dashes (--icmp-type is icmp_type; a route's "
                 "--kernel/--drop are kernel = true / drop = true, or action = \"kernel\"). "
                 "Numbers are TOML numbers (id = 10, not \"10\"). Objects in FILE are added "
                 "or changed; objects not in FILE are kept (the diff lists them with '=') "
                 "unless --prune, which makes FILE the whole state and removes them. Either "
                 "all of it is applied or none; errors name the file's line.",
     args=(Arg("file", "desired state, TOML ('-' for stdin)", metavar="FILE", required=True,
               wire=False),
           Arg("state", "desired state as tenants/ports/endpoints/routes/rules/fips/snats "
                        "lists",
               kind="object", required=True, cli=False),
           Arg("dry_run", "show what would change, change nothing", flags=("--dry-run", "-n"),
               kind="flag"),
           Arg("prune", "FILE is the whole state: remove objects it does not name",
               flags=("--prune",), kind="flag"),
           Arg("full_diff", f"list every object the diff holds (without it, the first "
                            f"{DIFF_SHOWN} of each list and the counts)",
               flags=("--full-diff",), kind="flag", wire=False),
           Arg("diff_limit", "list at most this many objects per list of the diff, with "
                             "\"counts\" when cut (absent: all)", kind="int", cli=False),
           Arg("no_duplicates", "refuse an object that `state` names twice, as an apply "
                                "file may not (without it the later one counts)",
               kind="flag", cli=False)))

# -- flows --
_cmd("flow dump", False, "show flow table entries, sorted, filtered by tenant, port, "
                        "protocol or address",
     "  xdpflowctl flow dump\n  xdpflowctl flow dump --tenant blue --limit 20\n"
     "  xdpflowctl flow dump --port veth-vm1 --proto icmp --ip 10.0.0.5\n"
     "  xdpflowctl --json flow dump --cursor start --limit 10000",
     _flow_dump,
     description="Rows are sorted by tenant, protocol, source, source port, destination, "
                 "destination port. ICMP flows show type, code and id instead of ports. "
                 "When more flows match than --limit, the table says so. --cursor pages "
                 "through a table of any size: start with --cursor start, go on with each "
                 "page's next cursor (JSON: {\"flows\": [...], \"next_cursor\": ...}, "
                 "null after the last page).",
     args=(_TENANT_FILTER,
           Arg("port", "only flows in or out of this port", flags=("--port",),
               metavar="IFNAME"),
           Arg("proto", "only this protocol: tcp, udp, icmp, icmpv6 or a number",
               flags=("--proto",), metavar="PROTO"),
           Arg("ip", "only flows from or to this address", flags=("--ip",), metavar="IP"),
           Arg("limit", f"at most this many flows (default 1000, at most {MAX_FLOW_DUMP})",
               flags=("--limit",),
               kind="int", default=1000, metavar="N"),
           Arg("cursor", "page: 'start', or the next cursor a page ended with",
               flags=("--cursor",), metavar="CURSOR")))
_cmd("flow flush", True, "empty the flow table (a pure cache: the next packets are "
                         "classified again)",
     "  xdpflowctl flow flush\n  xdpflowctl flow flush --tenant blue",
     _flow_flush, args=(_TENANT_FILTER,))

_cmd("stats", False, "show counters per tenant, port, verdict and reason, and flow table use",
     "  xdpflowctl stats\n  xdpflowctl stats --tenant blue\n  xdpflowctl --json stats",
     _stats, args=(_tenant_opt(False, "only this tenant's counters, flows and rule hits"),))

_cmd("trace", False, "run one packet through the loaded datapath without sending it",
     "  xdpflowctl trace --port veth-vm1 --hex 020000000005020000000006080045...\n"
     "  xdpflowctl trace --port veth-vm1 --scapy "
     "\"Ether(src='02:00:00:00:00:05')/IP(src='10.0.0.5', dst='10.0.0.6')/TCP(dport=22)\"",
     _trace,
     description="Prints the verdict, tenant, matched rule, the route or endpoint the "
                 "destination resolved to, output port, whether the flow table hit, the "
                 "reason, and the output packet (none when dropped). --scapy evaluates a "
                 "Scapy expression with only Scapy's layers in scope (no builtins) and says "
                 "which fields it filled with defaults. The first trace builds the trace "
                 "program, which takes a few seconds; later ones reuse it.",
     args=(Arg("port", "the ingress port the packet arrives on", flags=("--port",),
               required=True, metavar="IFNAME"),
           Arg("hex", "the packet as hex bytes, from the Ethernet header on", flags=("--hex",),
               metavar="HEX"),
           Arg("scapy", "the packet as a Scapy expression", flags=("--scapy",),
               metavar="EXPR", wire=False)),
     exclusive=((("hex", "scapy"), True),))


_cmd("monitor", False, "stream what the datapath does to packets, live (drops, passes, "
                      "redirects), with their rule and reason",
     "  xdpflowctl monitor --type drop\n"
     "  xdpflowctl monitor --tenant blue --port veth-vm1 --decode\n"
     "  xdpflowctl --json monitor --type drop --count 1 --duration 5",
     lambda c, a: c.monitor.open(a),
     description="Events come from the datapath's ring buffer, at most monitor.rate_limit "
                 "a second per CPU for all monitors together; events lost to that cap, to a "
                 "full ring or to a slow reader are counted and shown. Each event: time, "
                 "tenant, port, verdict, reason, rule, addresses, protocol, ports, length. "
                 "It shows tenants' packets: root or the admin group only.",
     sees_packets=True,
     args=(_TENANT_FILTER,
           Arg("port", "only packets that came in on this port", flags=("--port",),
               metavar="IFNAME"),
           Arg("type", "which verdicts (default all)", flags=("--type",),
               choices=("drop", "pass", "redirect", "all")),
           Arg("reason", "only this reason (rule_deny, default, no_route, ...)",
               flags=("--reason",), metavar="R"),
           Arg("decode", "also show the packet's first bytes decoded by Scapy",
               flags=("--decode",), kind="flag", wire=False),
           Arg("count", "stop after N events", flags=("--count",), kind="int", metavar="N",
               wire=False),
           Arg("duration", "stop after S seconds", flags=("--duration",), kind="float",
               metavar="S", wire=False)),
     stream=True)

_cmd("top", False, "the busiest flows by rate, from the flow table's counters",
     "  xdpflowctl top\n  xdpflowctl top --tenant blue --by bps --interval 2\n"
     "  xdpflowctl --json top --once",
     lambda c, a: c.top(a.get("tenant"), a["by"],
                        model.parse_int(a["limit"], "top: limit", 1, 1000)),
     description="Refreshed in place every --interval seconds (like ovs-dpctl-top) until "
                 "interrupted; --once prints one sample. Rates are the change of each "
                 "flow's counters between samples (the first sample: since the flow "
                 "began). Each sample reads at most 65,536 flows of a big table, going "
                 "on where the last sample stopped, plus the busiest flows found so far.",
     args=(_TENANT_FILTER,
           Arg("by", "order by packets (pps) or bytes (bps) a second", flags=("--by",),
               choices=("pps", "bps"), default="pps"),
           Arg("limit", "how many flows (default 20)", flags=("--limit",), kind="int",
               default=20, metavar="N"),
           Arg("interval", "seconds between refreshes (default 1)", flags=("--interval",),
               kind="float", default=1.0, metavar="S", wire=False),
           Arg("once", "print one sample and exit", flags=("--once",), kind="flag",
               wire=False)))


def get(name: str) -> Optional[Command]:
    return COMMANDS.get(name)


def dispatch(controller, name: str, args: Any) -> Any:
    """Check `args` against command `name`'s spec and make its controller call.

    Raises BadArgs for an unknown command or args that do not fit, model.Invalid /
    model.Conflict from the model or the controller. The caller serializes calls."""
    cmd = COMMANDS.get(name) if isinstance(name, str) else None
    if cmd is None:
        raise BadArgs(f"unknown command {name!r}")
    return cmd.run(controller, cmd.check_args(args))
