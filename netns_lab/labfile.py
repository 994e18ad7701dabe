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

Pure: no root, no kernel."""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from agent.model import KINDS, Invalid, State

from . import external

LAB_KEYS = ("prefix",)
VM_KEYS = ("name", "port")
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
    external: List[Any] = field(default_factory=list)   # external.ExternalHost

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
    unknown = set(data) - set(KINDS) - {"lab", "vms", "external"}
    if unknown:
        raise bad(f"unknown section(s) {', '.join(sorted(unknown))} (known: lab, vms, external, "
                  f"{', '.join(KINDS)})")
    lab = data.get("lab") or {}
    if not isinstance(lab, dict) or set(lab) - set(LAB_KEYS):
        raise bad(f"[lab] takes only {', '.join(LAB_KEYS)}")
    prefix = prefix or lab.get("prefix")
    if check_prefix(prefix):
        raise bad(check_prefix(prefix))
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
        if not isinstance(d, dict) or set(d) != set(VM_KEYS):
            raise bad(f"{where}: needs exactly the fields {', '.join(VM_KEYS)}")
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
                      port_mac(state.tenant(tenant).id, index[port]), addrs))
    try:
        hosts = external.parse(data.get("external"), state, [v.name for v in vms], source)
    except external.ExternalError as e:
        raise LabFileError(str(e)) from None
    if (state.fips or state.snats) and not hosts:
        raise bad("fips and snats need an external network: an [[external]] host behind an "
                  "uplink port")
    return LabSpec(prefix, state, vms, source, hosts)


def load(path: str, prefix: Optional[str] = None) -> LabSpec:
    from ctl.cli import UsageError, load_state_file   # the one TOML reader of the project
    try:
        data = load_state_file(path)
    except UsageError as e:
        raise LabFileError(str(e)) from None
    return parse(data, source=path, prefix=prefix)


DEMO_LAB = str(Path(__file__).parent / "labs" / "demo.toml")
