"""A lab description (TOML): the desired state in exactly the schema of `xdpflowctl apply`
(tenants, ports, endpoints, routes, rules, fips, snats), plus `[lab]`, `[[vms]]` and
`[[external]]` (hosts behind an uplink: netns_lab/external.py). Both datapaths are
rendered from this one state; a VM only names its namespace and its port, and takes its
addresses and MAC from the endpoints behind that port, so nothing is written twice.

    [lab]
    prefix = "xfdemo"        # every namespace, interface and pin of the lab starts with it

    [[vms]]
    name = "blue1"           # the VM (its namespaces are PREFIX-PATH-NAME)
    port = "bvm1"            # the node port it sits behind: one of [[ports]]
    node = "a"               # two-node labs only: the node it runs on (see below)
    mtu = 1450               # optional: its eth0's MTU (default the veth's 1500)

A two-node lab (netns_lab/nodes.py) adds `[[nodes]]` (name, uplink, local_ip: the node's
uplink port and VTEP address) and a `node` for every VM; each node's `xdpflowctl apply`
state is derived (`node_state`): its own VMs' ports and endpoints local, the other node's
endpoints remote behind that node's VTEP, its uplink port, every tenant and rule.
`[lab] scenarios` names the scenario set the lab is written for (a package under
netns_lab/scenarios/; default: the shipped top-level ones, written for the demo lab).

Pure: no root, no kernel."""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from agent.model import KINDS, Invalid, State

from . import external

LAB_KEYS = ("prefix", "scenarios")
VM_KEYS = ("name", "port")
VM_OPTIONAL = ("node", "mtu")
NODE_KEYS = ("name", "uplink", "local_ip")
_NODE_RE = re.compile(r"^[a-z][a-z0-9]{0,3}$")
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{1,7}$")
_VM_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")
# The VM's interface: the same name on every path, so captured frames compare.
VM_IFNAME = "eth0"


class LabFileError(ValueError):
    """A lab file that cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class VM:
    name: str
    port: str
    tenant: str
    mac: str
    port_mac: str                  # the node side of the VM's wire (its gateway's MAC)
    addrs: Tuple[str, ...]         # IPv4 first, then IPv6
    node: Optional[str] = None     # a two-node lab's: where it runs
    mtu: Optional[int] = None

    def addr(self, version: int) -> Optional[str]:
        for a in self.addrs:
            if ipaddress.ip_address(a).version == version:
                return a
        return None

    @property
    def ip(self) -> str:
        return self.addrs[0]

    @property
    def ip6(self) -> Optional[str]:
        return self.addr(6)


@dataclass
class LabSpec:
    prefix: str
    state: State
    vms: List[VM] = field(default_factory=list)
    source: str = "?"
    nodes: List["Node"] = field(default_factory=list)
    scenarios: str = ""            # the scenario package ("" : the top-level ones)
    external: List[Any] = field(default_factory=list)   # external.ExternalHost

    def node(self, name: str) -> "Node":
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"lab {self.source}: no node named {name!r}")

    def node_state(self, node: str) -> Dict[str, List[Dict[str, Any]]]:
        """Node `node`'s `xdpflowctl apply` state (see the module doc): ports of its VMs,
        its uplink, endpoints of its VMs local and of the other nodes' VMs remote."""
        home = {v.port: v.node for v in self.vms}
        full = self.apply_dict()
        out = {k: v for k, v in full.items() if k not in ("ports", "endpoints")}
        out["ports"] = [p for p in full.get("ports", []) if home.get(p["name"]) == node]
        n = self.node(node)
        out["ports"].append({"name": n.uplink, "uplink": True, "local_ip": n.local_ip})
        out["endpoints"] = []
        for e in full.get("endpoints", []):
            where = home.get(e.get("port"))
            if where is not None and where != node:
                e = {k: v for k, v in e.items() if k != "port"}
                e["vtep"] = self.node(where).local_ip
            out["endpoints"].append(e)
        return out

    def with_vm_on(self, vm: str, node: str) -> "LabSpec":
        """The same lab with VM `vm` running on `node` (a VM that moved)."""
        import dataclasses
        self.node(node)
        moved = [dataclasses.replace(v, node=node) if v.name == vm else v for v in self.vms]
        return dataclasses.replace(self, vms=moved)

    def vm(self, name: str):
        """A VM, or an external host (scenarios send from and to both)."""
        for v in list(self.vms) + list(self.external):
            if v.name == name:
                return v
        raise KeyError(f"lab {self.source}: no VM named {name!r} "
                       f"(VMs: {', '.join(v.name for v in self.vms)}; external hosts: "
                       f"{', '.join(h.name for h in self.external) or 'none'})")

    def tenant_id(self, name: str) -> int:
        return self.state.tenant(name).id

    def apply_dict(self) -> Dict[str, List[Dict[str, Any]]]:
        """The desired state as `xdpflowctl apply` takes it (empty kinds left out)."""
        return {k: [{f: v for f, v in o.items() if v is not None} for o in objs]
                for k, objs in self.state.to_dict().items() if objs}


def port_mac(tenant_id: int, index: int) -> str:
    """The MAC of a port's node side, the same on every path: unique per (tenant, port)."""
    return f"02:aa:{tenant_id >> 8:02x}:{tenant_id & 0xff:02x}:{index >> 8:02x}:{index & 0xff:02x}"


@dataclass(frozen=True)
class Node:
    """A node of a two-node lab: its uplink port and VTEP address."""
    name: str
    uplink: str
    local_ip: str


def uplink_mac(spec: "LabSpec", node: str) -> str:
    """The MAC of a node's uplink, the same on every path."""
    return f"02:ee:00:00:00:{[n.name for n in spec.nodes].index(node) + 1:02x}"


def _nodes(raw: Any, bad) -> List[Node]:
    if raw is None:
        return []
    if not isinstance(raw, list) or len(raw) != 2:
        raise bad("[[nodes]] needs two nodes (name, uplink, local_ip): the lab's underlay "
                  "is one link between them")
    out: List[Node] = []
    for i, d in enumerate(raw):
        where = f"nodes[{i}]"
        if not isinstance(d, dict) or set(d) != set(NODE_KEYS):
            raise bad(f"{where}: needs exactly the fields {', '.join(NODE_KEYS)}")
        if not isinstance(d["name"], str) or not _NODE_RE.match(d["name"]):
            raise bad(f"{where}: name {d['name']!r} must be 1-4 lower-case letters and digits")
        try:
            addr = ipaddress.IPv4Address(d["local_ip"])
        except (ValueError, TypeError):
            raise bad(f"{where}: local_ip {d['local_ip']!r} is not an IPv4 address "
                      f"(the lab's underlay is IPv4)") from None
        if any(n.name == d["name"] or n.uplink == d["uplink"] or n.local_ip == str(addr)
               for n in out):
            raise bad(f"{where}: name, uplink and local_ip must differ between nodes")
        out.append(Node(d["name"], str(d["uplink"]), str(addr)))
    return out


def check_prefix(prefix) -> Optional[str]:
    """Why `prefix` cannot be a lab prefix, or None."""
    if not isinstance(prefix, str) or not _PREFIX_RE.match(prefix):
        return (f"lab prefix {prefix!r} must be 2-8 lower-case letters and digits, "
                f"starting with a letter (it starts every name the lab makes)")
    return None


def parse(data: Dict[str, Any], source: str = "?", prefix: Optional[str] = None) -> LabSpec:
    """A lab from the parsed TOML; `prefix` overrides [lab] prefix (tests use their own)."""
    def bad(msg: str) -> LabFileError:
        return LabFileError(f"{source}: {msg}")

    if not isinstance(data, dict):
        raise bad("not a table")
    unknown = set(data) - set(KINDS) - {"lab", "vms", "nodes", "external"}
    if unknown:
        raise bad(f"unknown section(s) {', '.join(sorted(unknown))} (known: lab, vms, nodes, "
                  f"external, "
                  f"{', '.join(KINDS)})")
    lab = data.get("lab") or {}
    if not isinstance(lab, dict) or set(lab) - set(LAB_KEYS):
        raise bad(f"[lab] takes only {', '.join(LAB_KEYS)}")
    prefix = prefix or lab.get("prefix")
    if check_prefix(prefix):
        raise bad(check_prefix(prefix))
    nodes = _nodes(data.get("nodes"), bad)
    scen = lab.get("scenarios", "")
    if not isinstance(scen, str) or (scen and not _VM_RE.match(scen)):
        raise bad(f"[lab] scenarios {scen!r} must name a package of netns_lab/scenarios/")
    try:
        state = State.from_dict({k: v for k, v in data.items() if k in KINDS})
        state.validate()
    except Invalid as e:
        raise bad(str(e)) from None
    ports = {p.name: p for p in state.ports}
    index = {p.name: i + 1 for i, p in enumerate(state.ports)}
    vms: List[VM] = []
    raw_vms = data.get("vms") or []
    if not isinstance(raw_vms, list) or not raw_vms:
        raise bad("needs at least one [[vms]] entry (name, port)")
    for i, d in enumerate(raw_vms):
        where = f"vms[{i}]"
        if not isinstance(d, dict) or not set(VM_KEYS) <= set(d) or \
                set(d) - set(VM_KEYS) - set(VM_OPTIONAL):
            raise bad(f"{where}: needs exactly the fields {', '.join(VM_KEYS)} (and "
                      f"optionally {', '.join(VM_OPTIONAL)})")
        node, mtu = d.get("node"), d.get("mtu")
        if nodes and node not in {n.name for n in nodes}:
            raise bad(f"{where}: VM {d['name']}: node {node!r} is not one of [[nodes]]")
        if not nodes and node is not None:
            raise bad(f"{where}: VM {d['name']}: `node` needs [[nodes]]")
        if mtu is not None and (not isinstance(mtu, int) or not 1280 <= mtu <= 9000):
            raise bad(f"{where}: VM {d['name']}: mtu {mtu!r} must be 1280-9000")
        name, port = d["name"], d["port"]
        if not isinstance(name, str) or not _VM_RE.match(name):
            raise bad(f"{where}: name {name!r} must be 1-12 lower-case letters and digits")
        if any(v.name == name for v in vms):
            raise bad(f"{where}: VM {name} defined twice")
        if port not in ports:
            raise bad(f"{where}: VM {name}: unknown port {port!r}")
        if any(v.port == port for v in vms):
            raise bad(f"{where}: VM {name}: port {port} already has a VM")
        eps = [e for e in state.endpoints if e.port == port]
        if not eps:
            raise bad(f"{where}: VM {name}: port {port} has no endpoint (the VM takes its "
                      f"addresses and MAC from its port's endpoints)")
        macs = {e.mac for e in eps}
        if len(macs) != 1:
            raise bad(f"{where}: VM {name}: the endpoints of port {port} have different MACs "
                      f"({', '.join(sorted(macs))}); a VM has one")
        addrs = tuple(str(e.ip) for e in sorted(eps, key=lambda e: (e.ip.version, e.ip)))
        tenant = ports[port].tenant
        vms.append(VM(name, port, tenant, macs.pop(),
                      port_mac(state.tenant(tenant).id, index[port]), addrs, node, mtu))
    for n in nodes:
        if n.uplink in ports:
            raise bad(f"node {n.name}: uplink {n.uplink} is derived, not one of [[ports]]")
    try:
        hosts = external.parse(data.get("external"), state, [v.name for v in vms], source)
    except external.ExternalError as e:
        raise LabFileError(str(e)) from None
    if (state.fips or state.snats) and not hosts:
        raise bad("fips and snats need an external network: an [[external]] host behind an "
                  "uplink port")
    if hosts and nodes:
        raise bad("[[external]] is for a one-node lab (a two-node lab's uplinks are its "
                  "nodes' underlay)")
    return LabSpec(prefix, state, vms, source, nodes, scen, hosts)


def load(path: str, prefix: Optional[str] = None) -> LabSpec:
    from ctl.cli import UsageError, load_state_file   # the one TOML reader of the project
    try:
        data = load_state_file(path)
    except UsageError as e:
        raise LabFileError(str(e)) from None
    return parse(data, source=path, prefix=prefix)


DEMO_LAB = str(Path(__file__).parent / "labs" / "demo.toml")
